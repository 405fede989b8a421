"""Exceptions raised by astr-pipeline, all in one place."""

__all__ = [
    "AstrError",
    "CatalogueError",
    "ConfigError",
    "NotFoundError",
    "ScienceError",
    "StorageError",
    "StorageKeyError",
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


class ScienceError(AstrError):
    """An image or a science step's input cannot be used; the message says why."""
