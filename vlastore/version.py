"""The package version (written into every manifest as ``vlastore_version``)."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
