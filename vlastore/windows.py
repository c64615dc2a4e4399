"""Which steps a training sample reads: pure numpy functions, no I/O.

A sample is one ``(episode, step)``. Around it a robot-state window of
``n_obs_steps`` past steps (ending at ``step``) and an action chunk of
``horizon`` steps (starting at ``step``) are read. Near an episode's edges the
window is padded by repeating the first/last step, and a boolean ``is_pad``
marks the padded entries (LeRobot's ``<key>_is_pad`` convention; Diffusion
Policy's ``SequenceSampler`` pads the same way).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["obs_deltas", "action_deltas", "window_indices", "sample_table", "feature_rows", "split_episodes"]


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
        deltas: ``[W]`` step offsets to read (e.g. :func:`obs_deltas`).

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
    wanted = steps[:, None] + deltas[None, :]
    is_pad = (wanted < 0) | (wanted >= count[:, None])
    clamped = np.clip(wanted, 0, np.maximum(count[:, None] - 1, 0))
    return first[:, None] + clamped, is_pad


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
