"""Bearer-token authentication of the REST API."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence

from fastapi import HTTPException, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from pipeline.config import WorkflowConfig
from pipeline.errors import ConfigError

__all__ = ["token_checker", "token_matches"]

_BEARER = HTTPBearer(
    auto_error=False,
    description="One of the tokens in ASTR_API_TOKENS (when authentication is enabled).",
)


def token_matches(given: str, tokens: Sequence[str]) -> bool:
    """Whether ``given`` is one of ``tokens``, in time that does not depend on where they differ.

    Every token is compared, so the time does not reveal which one came close either.
    """
    given_bytes = given.encode()
    found = False
    for token in tokens:
        found |= hmac.compare_digest(given_bytes, token.encode())
    return found


def token_checker(config: WorkflowConfig) -> Callable[..., None]:
    """A FastAPI dependency refusing requests without a valid bearer token.

    401 without a token, 403 with a wrong one; no check at all when
    ``authentication_enabled`` is false.

    Raises
    ------
    ConfigError
        If authentication is enabled but ``ASTR_API_TOKENS`` holds no token.
    """
    tokens = tuple(token for token in config.api_tokens if token)
    if config.authentication_enabled and not tokens:
        raise ConfigError(
            "authentication_enabled is true but no API token is set: put one or more "
            "comma-separated tokens in ASTR_API_TOKENS (or set ASTR_AUTHENTICATION_ENABLED=false "
            "on a trusted machine)"
        )

    def require_token(
        credentials: HTTPAuthorizationCredentials | None = Security(_BEARER),
    ) -> None:
        if not config.authentication_enabled:
            return
        if credentials is None or not credentials.credentials:
            raise HTTPException(
                401,
                detail="this route needs 'Authorization: Bearer <token>' "
                "with a token from ASTR_API_TOKENS",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not token_matches(credentials.credentials, tokens):
            raise HTTPException(403, detail="the bearer token is not one of ASTR_API_TOKENS")

    return require_token
