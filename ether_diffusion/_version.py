"""The package version, declared once: ``pyproject.toml`` reads it, files written by the library record it."""

__version__ = "0.1.0"
