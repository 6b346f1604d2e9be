"""The library's version, recorded in every store's manifest."""

__version__ = "0.1.0"
