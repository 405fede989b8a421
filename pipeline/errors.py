"""Exceptions raised by astr-pipeline, all in one place."""

__all__ = [
    "AstrError",
    "BandMismatchError",
    "CatalogueError",
    "ConfigError",
    "ConflictError",
    "EmptyImageError",
    "FlowStepError",
    "FootprintError",
    "ImageNotFoundError",
    "ImageTooLargeError",
    "InvalidOverrideError",
    "KernelDiedError",
    "NoImageError",
    "NotFitsError",
    "NotFoundError",
    "NotebookCancelledError",
    "NotebookCellError",
    "NotebookError",
    "NotebookTimeoutError",
    "ObservationDataError",
    "ParameterError",
    "ScienceError",
    "ServerError",
    "StorageError",
    "StorageKeyError",
    "UpstreamProductError",
    "WCSError",
]


class AstrError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(AstrError, ValueError):
    """A setting is missing, malformed or outside its allowed values."""


class StorageError(AstrError):
    """An artifact could not be written, read or verified."""


class StorageKeyError(StorageError, ValueError):
    """An artifact key would escape the storage root or is malformed."""


class CatalogueError(AstrError):
    """The observation catalogue rejected a read or a write."""


class NotFoundError(CatalogueError, LookupError):
    """A catalogue record with the given id does not exist."""


class ServerError(AstrError):
    """A service the pipeline needs (the Prefect server) cannot be started, reached or stopped."""


class ScienceError(AstrError):
    """An image or a science step's input cannot be used; the message says why."""


class ImageNotFoundError(ScienceError, FileNotFoundError):
    """An image file does not exist or cannot be opened for reading."""


class NotFitsError(ScienceError):
    """A file is not FITS, or is truncated or corrupt."""


class NoImageError(ScienceError):
    """A FITS file holds no usable 2-D image HDU (none at all, a table, or a real cube)."""


class EmptyImageError(ScienceError):
    """An image has no finite pixels, or every finite pixel has the same value."""


class WCSError(ScienceError):
    """An image has no celestial WCS, or its WCS cannot map pixels to the sky."""


class FootprintError(ScienceError):
    """A science image covers too little of its reference image."""


class BandMismatchError(ScienceError):
    """A science image and its reference were taken in different bands."""


class ImageTooLargeError(ScienceError):
    """An image has more pixels than the configured limit."""


class InvalidOverrideError(ScienceError, ValueError):
    """A header override has an unknown key or a value outside its allowed range."""


class NotebookError(AstrError):
    """A notebook could not be run to the end.

    ``attempts`` holds the runner's record of every attempt (executed notebooks and
    HTML reports included), so a caller can publish the failed reports too.
    """

    def __init__(self, message: str, *, attempts: tuple[object, ...] = ()) -> None:
        super().__init__(message)
        self.attempts = attempts


class NotebookCellError(NotebookError):
    """Code in a notebook cell raised an exception (a bug or bad input: never retried)."""


class NotebookTimeoutError(NotebookError, TimeoutError):
    """A notebook, or one of its cells, ran past its time limit."""


class KernelDiedError(NotebookError):
    """The notebook's kernel died or could not be started."""


class NotebookCancelledError(NotebookError):
    """The run was cancelled; its kernel was stopped."""


class FlowStepError(AstrError):
    """A pipeline step could not run or record its products."""


class UpstreamProductError(FlowStepError):
    """A step's input product from an earlier step is missing or that step failed."""


class ObservationDataError(AstrError, ValueError):
    """``observation_data`` is malformed: an unknown key, a missing path, a bad value."""


class ParameterError(AstrError, ValueError):
    """The parameters given to start a flow are malformed.

    Parameters
    ----------
    errors : list of (location, message)
        One entry per bad field; a location is the path to it, e.g.
        ``("observation_data", "science_path")``.
    """

    def __init__(self, errors: list[tuple[tuple[str, ...], str]]) -> None:
        self.errors = list(errors)
        super().__init__(
            "; ".join(f"{'.'.join(loc) or 'body'}: {message}" for loc, message in self.errors)
        )


class ConflictError(AstrError):
    """The request cannot be done in the run's present state (cancel a finished run...)."""
