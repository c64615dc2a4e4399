"""Which steps a training sample reads: pure numpy functions, no I/O.

A sample is one ``(episode, step)``. Around it each windowed robot series is
read at a list of offsets (LeRobot's ``delta_timestamps``): step offsets, or
seconds converted to steps through the episode's fps, or seconds resolved
against per-step timestamps (nearest step within ``tolerance_s``). Near an
episode's edges a window is padded by repeating the first/last step, and a
boolean ``is_pad`` marks the padded entries (LeRobot's ``<key>_is_pad``
convention; Diffusion Policy's ``SequenceSampler`` pads the same way).

``n_obs_steps``/``horizon`` are the short form: :func:`obs_deltas` and
:func:`action_deltas`. :class:`WindowPlan` concatenates the offsets of every
key into one table so that the windows of a whole batch, all keys together,
come out of one numpy pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

__all__ = [
    "obs_deltas",
    "action_deltas",
    "window_indices",
    "seconds_to_steps",
    "timestamp_window_indices",
    "WindowPlan",
    "EdgePadding",
    "sample_table",
    "feature_rows",
    "split_episodes",
]

DEFAULT_TOLERANCE_S = 1e-4
"""LeRobot's default ``tolerance_s``."""


def obs_deltas(n_obs_steps: int) -> np.ndarray:
    """Step offsets of an observation window: ``-(n-1) .. 0``."""
    if n_obs_steps < 1:
        raise ValueError(f"n_obs_steps must be >= 1, got {n_obs_steps}")
    return np.arange(-(n_obs_steps - 1), 1, dtype=np.int64)


def action_deltas(horizon: int) -> np.ndarray:
    """Step offsets of an action chunk: ``0 .. horizon-1`` (the current step's action first)."""
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    return np.arange(horizon, dtype=np.int64)


def window_indices(
    step_offsets: np.ndarray, episodes: np.ndarray, steps: np.ndarray, deltas: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Global step index of every ``(sample, delta)`` and whether it is padding.

    Args:
        step_offsets: ``[E + 1]`` start of each episode's steps in the series
            arrays (``Catalog.step_offsets``).
        episodes: ``[B]`` episode position of each sample.
        steps: ``[B]`` step of each sample within its episode.
        deltas: ``[W]`` step offsets to read (e.g. :func:`obs_deltas`), or
            ``[E, W]`` offsets per episode (seconds converted at each
            episode's own fps, see :func:`seconds_to_steps`).

    Returns:
        ``(index, is_pad)``, both ``[B, W]``: ``index`` is clamped into the
        sample's episode (edge steps repeat), ``is_pad`` is True where
        ``step + delta`` falls outside it.
    """
    episodes = np.asarray(episodes, dtype=np.int64)
    steps = np.asarray(steps, dtype=np.int64)
    deltas = np.asarray(deltas, dtype=np.int64)
    first = step_offsets[episodes]
    count = step_offsets[episodes + 1] - first
    wanted = steps[:, None] + (deltas[episodes] if deltas.ndim == 2 else deltas[None, :])
    is_pad = (wanted < 0) | (wanted >= count[:, None])
    clamped = np.clip(wanted, 0, np.maximum(count[:, None] - 1, 0))
    return first[:, None] + clamped, is_pad


def seconds_to_steps(
    deltas_s: Sequence[float] | np.ndarray,
    fps: float | Sequence[float] | np.ndarray,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
) -> np.ndarray:
    """Step offsets of time offsets at a frame rate: ``round(delta * fps)``, checked like LeRobot.

    Args:
        deltas_s: ``[W]`` offsets in seconds.
        fps: one frame rate, or ``[E]`` one per episode.
        tolerance_s: how far (seconds) a delta may be from a multiple of ``1/fps``.

    Returns:
        ``[W]`` int64 offsets for one fps, ``[E, W]`` for one fps per episode.

    Raises:
        ValueError: an fps that is not a positive number, or a delta that is
            not a multiple of ``1/fps`` within ``tolerance_s``.
    """
    deltas = np.asarray(deltas_s, dtype=np.float64).reshape(-1)
    rates = np.asarray(fps, dtype=np.float64)
    bad_rate = ~np.isfinite(rates) | (rates <= 0)
    if bad_rate.any():
        where = "" if rates.ndim == 0 else f" (episode #{int(np.flatnonzero(bad_rate)[0])})"
        raise ValueError(
            f"fps must be a positive number, got {float(rates[bad_rate].reshape(-1)[0])}{where}; "
            "pass fps= for episodes whose store does not record it"
        )
    if not np.isfinite(deltas).all():
        raise ValueError(f"delta_timestamps must be finite numbers of seconds, got {deltas.tolist()}")
    steps = np.rint(deltas[None, :] * rates.reshape(-1, 1))
    error = np.abs(deltas[None, :] - steps / rates.reshape(-1, 1))
    bad = np.argwhere(error > tolerance_s)
    if bad.size:
        e, w = (int(i) for i in bad[0])
        rate = float(rates.reshape(-1)[e])
        where = "" if rates.ndim == 0 else f" in episode #{e}"
        raise ValueError(
            f"delta {float(deltas[w])!r} s is not a multiple of 1/fps = 1/{rate:g} s within tolerance_s={tolerance_s:g}"
            f"{where} (nearest: {int(steps[e, w])} steps = {float(steps[e, w]) / rate:.6g} s); use multiples of "
            f"1/{rate:g} s, step offsets (delta_steps=), or a larger tolerance_s"
        )
    out = steps.astype(np.int64)
    return out[0] if rates.ndim == 0 else out


def timestamp_window_indices(
    step_offsets: np.ndarray,
    timestamps: np.ndarray,
    episodes: np.ndarray,
    steps: np.ndarray,
    deltas_s: np.ndarray,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest step to ``timestamp[step] + delta`` for every ``(sample, delta)``, within the episode.

    Args:
        step_offsets: ``[E + 1]`` as in :func:`window_indices`.
        timestamps: ``[total_steps]`` time of every step in seconds,
            non-decreasing within each episode.
        episodes, steps: ``[B]`` the samples.
        deltas_s: ``[W]`` offsets in seconds.
        tolerance_s: how far the nearest step may be from the time asked for.

    Returns:
        ``(index, is_pad, off_grid)``, all ``[B, W]``: ``index`` the global
        step nearest in time (the earlier one on a tie); ``is_pad`` True where
        the time lies more than ``tolerance_s`` before the episode's first or
        after its last step (``index`` is then that edge step); ``off_grid``
        True where the time lies inside the episode but no step is within
        ``tolerance_s`` of it (a gap in the recording).
    """
    episodes = np.asarray(episodes, dtype=np.int64)
    steps = np.asarray(steps, dtype=np.int64)
    deltas = np.asarray(deltas_s, dtype=np.float64)
    ts = np.asarray(timestamps, dtype=np.float64)
    first = step_offsets[episodes][:, None]
    last = step_offsets[episodes + 1][:, None] - 1
    query = ts[step_offsets[episodes] + steps][:, None] + deltas[None, :]
    # A binary search per (sample, delta) inside its own episode, all at once: exact (no global
    # time axis built by adding offsets to the timestamps) and log2(episode length) numpy passes.
    lo = np.broadcast_to(first, query.shape).copy()
    hi = np.broadcast_to(last + 1, query.shape).copy()
    while True:
        open_ = lo < hi
        if not open_.any():
            break
        mid = (lo + hi) // 2
        below = open_ & (ts[np.minimum(mid, last)] < query)
        lo = np.where(below, mid + 1, lo)
        hi = np.where(open_ & ~below, mid, hi)
    after = np.minimum(lo, last)  # first step at or after the query (the last if none)
    before = np.maximum(lo - 1, first)
    take_before = np.abs(ts[before] - query) <= np.abs(ts[after] - query)
    index = np.where(take_before, before, after)
    is_pad = (query < ts[first] - tolerance_s) | (query > ts[last] + tolerance_s)
    off_grid = ~is_pad & (np.abs(ts[index] - query) > tolerance_s)
    return index, is_pad, off_grid


@dataclass(frozen=True)
class EdgePadding:
    """The steps of every episode on a *padded axis*: each episode preceded by ``before`` copies of its
    first step and followed by ``after`` copies of its last, episodes back to back.

    A window whose offsets lie within ``[-before, after]`` is then one gather at
    ``starts[episode] + step + offsets``: no clamping, and ``is_pad`` is one more gather. A
    series laid out this way (:meth:`pad`) costs ``before + after`` extra rows per episode.
    """

    before: int
    after: int
    starts: np.ndarray
    """``[E]`` position of each episode's step 0 on the padded axis."""
    source: np.ndarray
    """``[P]`` the global step each position of the padded axis repeats."""
    is_pad: np.ndarray
    """``[P]`` True on the copies."""

    @classmethod
    def build(cls, step_offsets: np.ndarray, before: int, after: int) -> EdgePadding:
        """Lay out the episodes of ``step_offsets`` (``[E + 1]``) with ``before``/``after`` copies at their edges.

        Episodes without steps get no copies (nothing can be read from them).
        """
        if before < 0 or after < 0:
            raise ValueError(f"before={before}, after={after}: both must be >= 0")
        offsets = np.asarray(step_offsets, dtype=np.int64)
        counts = np.diff(offsets)
        padded = np.where(counts > 0, counts + before + after, 0)
        ends = np.cumsum(padded)
        block_starts = ends - padded
        starts = block_starts + np.where(counts > 0, before, 0)
        total = int(ends[-1]) if len(ends) else 0
        # position p of episode e repeats step clip(p - starts[e], 0, count - 1) of that episode
        episode_of = np.repeat(np.arange(len(counts)), padded)
        local = np.arange(total, dtype=np.int64) - starts[episode_of]
        last = counts[episode_of] - 1
        source = offsets[:-1][episode_of] + np.clip(local, 0, last)
        is_pad = (local < 0) | (local > last)
        return cls(int(before), int(after), starts.astype(np.int64), source, is_pad)

    def pad(self, values: np.ndarray) -> np.ndarray:
        """``values`` (``[total_steps, ...]``) on the padded axis: ``[P, ...]``, a new array."""
        return np.ascontiguousarray(np.asarray(values)[self.source])


@dataclass(frozen=True)
class WindowPlan:
    """The offsets of every windowed key, fused into one table per kind.

    Keys with the same offsets share columns. ``step_table`` holds step
    offsets (``[W]``, or ``[E, W]`` when seconds were converted at one fps per
    episode); ``time_table`` holds offsets in seconds resolved against
    ``timestamps`` per batch. ``columns[key] = (kind, slice)`` with kind
    ``"steps"`` or ``"time"``. Build it with :meth:`build`.
    """

    keys: tuple[str, ...]
    columns: Mapping[str, tuple[str, slice]]
    step_table: np.ndarray
    time_table: np.ndarray
    timestamps: np.ndarray | None = None
    tolerance_s: float = DEFAULT_TOLERANCE_S

    @classmethod
    def build(
        cls,
        delta_steps: Mapping[str, Sequence[int] | np.ndarray],
        delta_timestamps: Mapping[str, Sequence[float] | np.ndarray] | None = None,
        fps: float | Sequence[float] | np.ndarray | None = None,
        timestamps: np.ndarray | None = None,
        tolerance_s: float = DEFAULT_TOLERANCE_S,
        episodes: Sequence[int] | np.ndarray | None = None,
    ) -> WindowPlan:
        """Fuse per-key offsets.

        Args:
            delta_steps: ``{key: step offsets}`` (any ints: negative, zero,
                positive, with gaps, repeated).
            delta_timestamps: ``{key: offsets in seconds}``. Resolved through
                ``timestamps`` when given, else converted with ``fps``.
            fps: one frame rate, or ``[E]`` one per catalog episode.
            timestamps: ``[total_steps]`` seconds of every step.
            tolerance_s: as LeRobot's: how far a delta may be from a multiple
                of ``1/fps``, or a step's time from the time asked for.
            episodes: the episodes that will be sampled (default all); only
                their fps is checked (and converted) when fps is per episode.

        Raises:
            ValueError: a key given twice, an empty offset list, non-integer
                step offsets, seconds without fps or timestamps, or a delta
                that is not a multiple of ``1/fps`` (see :func:`seconds_to_steps`).
        """
        delta_timestamps = dict(delta_timestamps or {})
        both = sorted(set(delta_steps) & set(delta_timestamps))
        if both:
            raise ValueError(f"keys {both} are in both delta_steps and delta_timestamps; give each key once")
        step_lists = _whole_step_lists(delta_steps)
        time_lists = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in delta_timestamps.items()}
        for key, deltas in (*step_lists.items(), *time_lists.items()):
            if deltas.size == 0:
                raise ValueError(f"the offsets of {key!r} are empty; give at least one (0 is the sample's own step)")
        if time_lists and timestamps is None and fps is None:
            raise ValueError(
                f"delta_timestamps for {sorted(time_lists)} need the episodes' fps or timestamps; pass fps= "
                "(or timestamps=), or give step offsets as delta_steps="
            )
        per_episode = False
        if time_lists and timestamps is None:
            converted, per_episode = _seconds_as_steps(time_lists, fps, tolerance_s, episodes)
            step_lists.update(converted)
            time_lists = {}
        n_episodes = next((len(v) for v in step_lists.values() if v.ndim == 2), 0)

        def fuse(lists: dict[str, np.ndarray], kind: str) -> tuple[np.ndarray, dict[str, tuple[str, slice]]]:
            blocks: list[np.ndarray] = []
            placed: dict[bytes, slice] = {}
            columns: dict[str, tuple[str, slice]] = {}
            width = 0
            for key, deltas in lists.items():
                if per_episode and kind == "steps" and deltas.ndim == 1:
                    deltas = np.broadcast_to(deltas, (n_episodes, len(deltas)))
                ident = deltas.tobytes() + str(deltas.shape).encode()
                if ident not in placed:  # keys with equal offsets share columns: computed once per batch
                    placed[ident] = slice(width, width + deltas.shape[-1])
                    blocks.append(deltas)
                    width += deltas.shape[-1]
                columns[key] = (kind, placed[ident])
            dtype = np.int64 if kind == "steps" else np.float64
            if not blocks:
                return np.zeros((n_episodes, 0) if per_episode else (0,), dtype), columns
            return np.concatenate(blocks, axis=-1).astype(dtype), columns

        step_table, step_columns = fuse(step_lists, "steps")
        time_table, time_columns = fuse(time_lists, "time")
        ts = None if timestamps is None or not time_lists else np.asarray(timestamps, dtype=np.float64)
        return cls(
            keys=tuple([*delta_steps, *delta_timestamps]),
            columns={**step_columns, **time_columns},
            step_table=step_table,
            time_table=time_table,
            timestamps=ts,
            tolerance_s=float(tolerance_s),
        )

    def deltas(self, key: str) -> np.ndarray:
        """The offsets of ``key`` as given: steps (``[W]`` or ``[E, W]``) or seconds."""
        kind, cols = self.columns[key]
        return (self.step_table if kind == "steps" else self.time_table)[..., cols]

    @cached_property
    def blocks(self) -> tuple[tuple[str, slice], ...]:
        """The distinct offset sets, in order: ``(kind, columns)``; keys with equal offsets share one."""
        seen: dict[tuple[str, int, int], tuple[str, slice]] = {}
        for kind, cols in self.columns.values():
            seen.setdefault((kind, cols.start, cols.stop), (kind, cols))
        return tuple(seen.values())

    @cached_property
    def block_of(self) -> Mapping[str, int]:
        """``{key: position in blocks}``."""
        where = {(kind, cols.start, cols.stop): b for b, (kind, cols) in enumerate(self.blocks)}
        return {key: where[(kind, cols.start, cols.stop)] for key, (kind, cols) in self.columns.items()}

    def block_indices(
        self,
        step_offsets: np.ndarray,
        episodes: np.ndarray,
        steps: np.ndarray,
        first: np.ndarray | None = None,
        last: np.ndarray | None = None,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(index [B, W_b], is_pad [B, W_b])`` of every block, all step blocks from one fused pass.

        Args:
            step_offsets: ``[E + 1]`` as in :func:`window_indices`.
            episodes, steps: ``[B]`` int64 episode position and step within it of each sample.
            first, last: ``[B]`` the global index of each sample's episode's first step and the
                step number of its last (``count - 1``); computed from ``step_offsets`` when None
                (a caller that keeps them per episode saves two gathers per batch).

        Returns:
            One pair per :attr:`blocks` entry. ``index`` holds global step numbers clamped into the
            episode (it may be a view of a larger array); ``is_pad`` is a contiguous array of its own.
        """
        out: list[tuple[np.ndarray, np.ndarray]] = []
        fused: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if self.step_table.shape[-1]:
            if first is None or last is None:
                first = step_offsets[episodes]
                last = step_offsets[episodes + 1] - first - 1
            table = self.step_table[episodes] if self.step_table.ndim == 2 else self.step_table
            rel = np.add(steps[:, None], table)  # step within the episode, before clamping
            last_col = last[:, None]
            # one unsigned comparison finds both edges: a negative step wraps to a huge number
            is_pad = np.greater(rel.view(np.uint64), last_col.view(np.uint64))
            np.maximum(rel, 0, out=rel)
            np.minimum(rel, last_col, out=rel)
            np.add(rel, first[:, None], out=rel)
            fused["steps"] = (rel, is_pad)
        if self.time_table.size:
            assert self.timestamps is not None
            index, is_pad, _ = timestamp_window_indices(
                step_offsets, self.timestamps, episodes, steps, self.time_table, self.tolerance_s
            )
            fused["time"] = (index, is_pad)
        for kind, cols in self.blocks:
            index, is_pad = fused[kind]
            out.append((index[:, cols], is_pad[:, cols].copy()))
        return out

    def reach(self, episodes: np.ndarray | None = None) -> tuple[int, int]:
        """``(before, after)``: how far the step offsets reach before and after a sample's step.

        Per-episode offsets count only ``episodes`` (default all). An :class:`EdgePadding` with at
        least this much lets :meth:`padded_indices` read every step block without clamping.
        """
        table = self.step_table
        if table.ndim == 2 and episodes is not None:
            table = table[np.unique(np.asarray(episodes, dtype=np.int64))]
        if not table.size:
            return 0, 0
        return max(0, -int(table.min())), max(0, int(table.max()))

    def padded_indices(
        self,
        padding: EdgePadding,
        positions: np.ndarray,
        step_offsets: np.ndarray,
        episodes: np.ndarray,
        steps: np.ndarray,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """As :meth:`block_indices`, but ``index`` is a position on ``padding``'s axis.

        Args:
            padding: an :class:`EdgePadding` reaching at least :meth:`reach`.
            positions: ``[B]`` each sample's own position on the padded axis
                (``padding.starts[episode] + step``).
            step_offsets, episodes, steps: as in :meth:`block_indices` (time offsets need them).

        Returns:
            One ``(index, is_pad)`` per :attr:`blocks` entry; all step blocks come from one add and
            one gather, with no clamping.
        """
        out: list[tuple[np.ndarray, np.ndarray]] = []
        fused: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if self.step_table.shape[-1]:
            table = self.step_table[episodes] if self.step_table.ndim == 2 else self.step_table
            fused["steps"] = (np.add(positions[:, None], table), padding.is_pad)  # is_pad: gathered per block
        if self.time_table.size:
            assert self.timestamps is not None
            found, is_pad, _ = timestamp_window_indices(
                step_offsets, self.timestamps, episodes, steps, self.time_table, self.tolerance_s
            )
            # a global step g of the sample's episode sits at g - first + starts on the padded axis
            shift = padding.starts[episodes] - step_offsets[episodes]
            fused["time"] = (np.add(found, shift[:, None], out=found), is_pad)
        for kind, cols in self.blocks:
            index, is_pad = fused[kind]
            block = index[:, cols]
            out.append((block, is_pad.take(block) if kind == "steps" else is_pad[:, cols].copy()))
        return out

    def indices(
        self, step_offsets: np.ndarray, episodes: np.ndarray, steps: np.ndarray
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{key: (index [B, W_key], is_pad [B, W_key])}`` for a batch, every key from one fused pass per kind."""
        episodes = np.asarray(episodes, dtype=np.int64)
        steps = np.asarray(steps, dtype=np.int64)
        blocks = self.block_indices(np.asarray(step_offsets, dtype=np.int64), episodes, steps)
        return {key: blocks[b] for key, b in self.block_of.items()}

    def check_grid(
        self,
        step_offsets: np.ndarray,
        episodes: np.ndarray,
        steps: np.ndarray,
        names: Sequence[str] | None = None,
        chunk: int = 1 << 16,
    ) -> None:
        """Refuse samples whose time offsets fall in a gap of the timestamps (no step within tolerance).

        Raises:
            ValueError: naming the first such sample, key and delta.
        """
        if not self.time_table.size:
            return
        assert self.timestamps is not None
        for lo in range(0, len(episodes), chunk):
            e, t = episodes[lo : lo + chunk], steps[lo : lo + chunk]
            _, _, off = timestamp_window_indices(step_offsets, self.timestamps, e, t, self.time_table, self.tolerance_s)
            if off.any():
                i, w = (int(x) for x in np.argwhere(off)[0])
                key = next(
                    k for k, (kind, cols) in self.columns.items() if kind == "time" and cols.start <= w < cols.stop
                )
                episode = names[int(e[i])] if names is not None else f"#{int(e[i])}"
                raise ValueError(
                    f"{int(off.sum()):,} windows ask for times with no step within tolerance_s={self.tolerance_s:g}, "
                    f"e.g. key {key!r} delta {float(self.time_table[w])!r} s at episode {episode} step {int(t[i])}: "
                    "the recording has a gap there; use delta_steps=, a larger tolerance_s, or drop the episode"
                )


def sample_table(steps_per_episode: np.ndarray, episodes: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(episode, step)`` of every sample: all steps of ``episodes``, in the order given."""
    episodes = np.asarray(episodes, dtype=np.int64)
    counts = np.asarray(steps_per_episode, dtype=np.int64)[episodes]
    episode_of = np.repeat(episodes, counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else np.zeros(0, np.int64)
    step_of = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(starts, counts)
    return episode_of, step_of


def feature_rows(
    episode_rows: np.ndarray, episodes: np.ndarray, steps: np.ndarray, vlm_reuse_count: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(row, vlm_idx)`` of each sample in a family: ``vlm_idx = step // vlm_reuse_count``.

    Raises:
        IndexError: a sample needs a ``vlm_idx`` its episode has no row for
            (the family was planned with fewer rows than the steps need).
    """
    vlm_idx = np.asarray(steps, dtype=np.int64) // vlm_reuse_count
    episodes = np.asarray(episodes, dtype=np.int64)
    first = episode_rows[episodes]
    have = episode_rows[episodes + 1] - first
    bad = np.flatnonzero(vlm_idx >= have)
    if bad.size:
        i = int(bad[0])
        raise IndexError(
            f"{bad.size} samples need rows their episode does not have, e.g. episode #{int(episodes[i])} "
            f"step {int(steps[i])} -> vlm_idx {int(vlm_idx[i])} but the episode has {int(have[i])} rows; "
            "is vlm_reuse_count right for this family?"
        )
    return first + vlm_idx, vlm_idx


def split_episodes(n_episodes: int, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Episode positions ``(train, val)``, disjoint, each sorted; val gets ``round(n * fraction)`` (>= 1 if n > 1)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(n_episodes * val_fraction))
    if val_fraction > 0 and n_episodes > 1:
        n_val = min(max(n_val, 1), n_episodes - 1)
    perm = np.random.default_rng(seed).permutation(n_episodes)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _whole_step_lists(delta_steps: Mapping[str, Sequence[int] | np.ndarray]) -> dict[str, np.ndarray]:
    """``{key: int64 offsets}``; float offsets must be whole numbers."""
    step_lists: dict[str, np.ndarray] = {}
    for key, deltas in delta_steps.items():
        raw = np.asarray(deltas).reshape(-1)
        if raw.size and not np.issubdtype(raw.dtype, np.integer):
            as_int = np.rint(raw.astype(np.float64))
            if not np.array_equal(as_int, raw):
                raise ValueError(
                    f"delta_steps[{key!r}] must be whole steps, got {raw.tolist()}; "
                    "give offsets in seconds as delta_timestamps="
                )
        step_lists[key] = raw.astype(np.int64)
    return step_lists


def _seconds_as_steps(
    time_lists: dict[str, np.ndarray],
    fps: float | Sequence[float] | np.ndarray | None,
    tolerance_s: float,
    episodes: Sequence[int] | np.ndarray | None,
) -> tuple[dict[str, np.ndarray], bool]:
    """Offsets in seconds as steps: ``({key: [n] or [E, n] steps}, per_episode)`` (per episode: one fps each)."""
    rates = np.asarray(fps, dtype=np.float64)
    if rates.ndim == 0:
        return {k: seconds_to_steps(v, float(rates), tolerance_s) for k, v in time_lists.items()}, False
    used = np.arange(len(rates)) if episodes is None else np.unique(np.asarray(episodes, np.int64))
    converted = {}
    for key, deltas in time_lists.items():
        table = np.zeros((len(rates), len(deltas)), dtype=np.int64)
        if used.size:
            try:
                table[used] = seconds_to_steps(deltas, rates[used], tolerance_s)
            except ValueError as err:
                raise ValueError(f"delta_timestamps[{key!r}]: {err}") from None
        converted[key] = table
    return converted, True
