"""The episode catalog: names, step counts and where each episode's steps start.

Plain numpy, no I/O. The store writes it as ``episodes/{name,steps,step_offsets}``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from .format import FormatError, validate_name

__all__ = ["Catalog"]


class Catalog:
    """Episodes ("datasets") in store order, with their steps concatenated along time.

    Episode ``e`` owns global steps ``step_offsets[e]:step_offsets[e + 1]`` of
    every robot series.
    """

    def __init__(self, names: Sequence[str], steps: Sequence[int] | np.ndarray) -> None:
        names = list(names)
        steps_arr = np.asarray(steps, dtype=np.int64)
        if steps_arr.ndim != 1 or len(steps_arr) != len(names):
            raise FormatError(
                f"catalog has {len(names)} names but {steps_arr.size} step counts; give one count per episode"
            )
        seen: dict[str, int] = {}
        for i, name in enumerate(names):
            validate_name(name, f"episode name #{i}")
            if name in seen:
                raise FormatError(
                    f"duplicate episode name {name!r} (episodes #{seen[name]} and #{i}); names must be unique"
                )
            seen[name] = i
        bad = np.flatnonzero(steps_arr < 0)
        if bad.size:
            raise FormatError(f"episode {names[bad[0]]!r} has {steps_arr[bad[0]]} steps; counts must be >= 0")
        self.names: tuple[str, ...] = tuple(names)
        self.steps: np.ndarray = steps_arr
        self.step_offsets: np.ndarray = np.concatenate([[0], np.cumsum(steps_arr)]).astype(np.int64)
        self._index = seen

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, int]]) -> Catalog:
        pairs = list(pairs)
        return cls([p[0] for p in pairs], [p[1] for p in pairs])

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Catalog) and self.names == other.names and np.array_equal(self.steps, other.steps)

    @property
    def total_steps(self) -> int:
        return int(self.step_offsets[-1])

    def index(self, name: str) -> int:
        """Position of episode ``name``.

        Raises:
            KeyError: naming the episode and a few that do exist.
        """
        try:
            return self._index[name]
        except KeyError:
            sample = ", ".join(repr(n) for n in self.names[:5])
            more = f" (and {len(self.names) - 5} more)" if len(self.names) > 5 else ""
            raise KeyError(
                f"unknown dataset {name!r}: the store has {len(self.names)} episodes, e.g. {sample}{more}"
            ) from None

    def resolve(self, episode: str | int) -> int:
        """Episode position from a name or a position (checked)."""
        if isinstance(episode, (bool, np.bool_)):
            raise TypeError(f"episode {episode!r}: give a name or a position (int), not a bool")
        if isinstance(episode, (int, np.integer)):
            e = int(episode)
            if not 0 <= e < len(self.names):
                raise IndexError(f"episode #{e} out of range: the store has {len(self.names)} episodes")
            return e
        return self.index(episode)

    def step_range(self, episode: str | int) -> tuple[int, int]:
        """Global ``[start, stop)`` of an episode's steps in the series arrays."""
        e = self.resolve(episode)
        return int(self.step_offsets[e]), int(self.step_offsets[e + 1])
