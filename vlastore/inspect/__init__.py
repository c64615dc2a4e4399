"""Looking at what a store holds, for notebooks: tables, statistics, projections, drift.

Every function returns plain numpy arrays, dicts or pandas objects, so users can
call them from their own notebooks; ``notebooks/inspect_store.ipynb`` is one
such notebook. The tables of the store and its families are built from
:func:`vlastore.report.store_info`, so they show the same figures as
``vlastore info``. Plot helpers take an optional matplotlib ``ax`` and return it.

pandas and matplotlib (the ``[notebook]`` extra) are imported inside the
functions that need them: ``import vlastore`` does not need them. Feature
values are read as float32 (bfloat16 from its bits, no torch needed); large
families are sampled (``max_rows`` rows, drawn with a seeded RNG).
"""

from __future__ import annotations

# each module lists its public names once, in its own __all__
from . import _common, drift, episodes, plots, tables, values
from ._common import *  # noqa: F403
from .drift import *  # noqa: F403
from .episodes import *  # noqa: F403
from .plots import *  # noqa: F403
from .tables import *  # noqa: F403
from .values import *  # noqa: F403

__all__ = [*_common.__all__, *tables.__all__, *values.__all__, *episodes.__all__, *drift.__all__, *plots.__all__]
