"""astr-pipeline: find astronomical transients with parameterized notebooks."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("astr-pipeline")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
