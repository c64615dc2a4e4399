"""vlastore: robot episodes and precomputed VLA features in one chunked, checksummed Zarr v3 store.

``import vlastore`` does not import torch; the reader and the training Dataset do.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .catalog import Catalog  # noqa: E402
from .format import FamilySpec, FormatError, Producer  # noqa: E402
from .store import EpisodeData, VLAStore  # noqa: E402

__all__ = ["__version__", "Catalog", "EpisodeData", "FamilySpec", "FormatError", "Producer", "VLAStore"]
