"""vlastore: robot episodes and precomputed VLA features in one chunked, checksummed Zarr v3 store.

``import vlastore`` does not import torch; the reader and the training Dataset do.
"""

from __future__ import annotations

from .catalog import Catalog
from .format import FamilySpec, FormatError, Producer
from .store import EpisodeData, VLAStore
from .version import __version__

__all__ = ["__version__", "Catalog", "EpisodeData", "FamilySpec", "FormatError", "Producer", "VLAStore"]
