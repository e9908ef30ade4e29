"""The package version (recorded in checkpoints and experiment indexes)."""

__version__ = "0.1.0"
