"""The package version, below every other module so any of them can report it."""

__version__ = "0.1.0"
