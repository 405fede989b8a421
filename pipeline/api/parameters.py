"""Check the parameters of a flow start request before any run is created.

The body of ``POST /workflows/flows/{flow_type}/start`` holds the flow's parameters as
a JSON object. Each is checked against the flow function's signature (unknown names,
missing required ones, types) and, for the parameters that have one, against the
pipeline's own validator (``observation_data``, ``search_space``, model ids), so a
mistake is answered 422 with the field named instead of becoming a failed run.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import TypeAdapter, ValidationError

from pipeline.errors import AstrError, ParameterError

__all__ = ["check_parameters", "parameter_checks"]

Location = tuple[str, ...]


def check_parameters(flow: Any, body: Any) -> dict[str, Any]:
    """Validate a start request's parameters for ``flow``.

    Parameters
    ----------
    flow : prefect.Flow
        The flow to start.
    body : Any
        The decoded JSON body.

    Returns
    -------
    dict
        The parameters, as given (JSON values), ready for the flow run.

    Raises
    ------
    ParameterError
        Listing every bad field with what is wrong with it.
    """
    if not isinstance(body, Mapping):
        raise ParameterError(
            [((), f"the body must be a JSON object of the flow's parameters, got {_kind(body)}")]
        )
    signature = _signature(flow.fn)
    errors: list[tuple[Location, str]] = []
    for name in body:
        if name not in signature:
            errors.append(
                ((str(name),), f"unknown parameter of {flow.name}; it takes {_names(signature)}")
            )
    for name, (adapter, required) in signature.items():
        if name not in body:
            if required:
                errors.append(((name,), f"required parameter of {flow.name} is missing"))
            continue
        value = body[name]
        try:
            adapter.validate_python(value)
        except ValidationError as exc:
            errors.append(((name,), _first_error(exc)))
            continue
        check = parameter_checks().get(name)
        if check is not None and value is not None:
            try:
                check(value)
            except (AstrError, ValueError, TypeError) as exc:
                errors.append(((name, *_sub_location(name, exc)), str(exc)))
    if errors:
        raise ParameterError(errors)
    return dict(body)


@functools.cache
def parameter_checks() -> dict[str, Callable[[Any], Any]]:
    """Parameter name -> the pipeline's validator for it (raises on a bad value)."""
    from pipeline.flows.batch import validate_manifest
    from pipeline.flows.steps import parse_observation_data
    from pipeline.ml.search import validate_search_space

    return {
        "observation_data": parse_observation_data,
        "manifest": validate_manifest,  # an existing, readable CSV whose rows all check out
        "search_space": validate_search_space,
        "model_id": _model_id,
        "model_type": _model_type,
    }


def _model_id(value: Any) -> None:
    text = str(value).removeprefix("v")
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"must be a version number of realbogus (e.g. '3'), got {value!r}")


def _model_type(value: Any) -> None:
    from pipeline.flows.training import MODEL_TYPES

    if value not in MODEL_TYPES:
        raise ValueError(f"unknown model type {value!r}; expected one of {', '.join(MODEL_TYPES)}")


@functools.cache
def _signature(fn: Callable[..., Any]) -> dict[str, tuple[TypeAdapter[Any], bool]]:
    hints = typing.get_type_hints(fn)
    parameters = {}
    for name, parameter in inspect.signature(fn).parameters.items():
        annotation = hints.get(name, Any)
        required = parameter.default is inspect.Parameter.empty
        parameters[name] = (TypeAdapter(annotation), required)
    return parameters


def _sub_location(name: str, exc: Exception) -> Location:
    """The key inside an object parameter that a validator's message names, if any."""
    message = str(exc)
    prefix = f"{name}["
    if message.startswith(prefix):
        key = message[len(prefix) :].split("]", 1)[0].strip("'\"")
        return (key,)
    return ()


def _first_error(exc: ValidationError) -> str:
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in error.get("loc", ()))
    return f"{error['msg']}{f' (at {where})' if where else ''}"


def _names(signature: Mapping[str, Any]) -> str:
    return ", ".join(signature) or "no parameters"


def _kind(value: Any) -> str:
    return {list: "an array", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), "a number" if isinstance(value, int | float) else type(value).__name__
    )
