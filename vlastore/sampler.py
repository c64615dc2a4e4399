"""Deterministic, resumable sampling: the order depends on ``(seed, epoch)`` only, resume is sample-exact.

An epoch is one permutation of all sample indices, a function of ``(seed,
epoch)`` alone (:func:`epoch_order`): not of ``num_workers``, of the number of
ranks or of the batch size. Progress is one number, ``position``: how many
samples of that order the training loop has received, all ranks together.
Rank ``r`` of ``W`` reads ``order[position:][r::W]`` in batches (what
``DistributedSampler`` does, without its padding), so after ``k`` batches on
every rank exactly ``order[:position + k*W*B]`` has been seen, whatever
``W`` and ``B`` are; a run resumed on another number of ranks (or with another
batch size) splits what is left of the same order.

What counts as seen is what the training loop *received*: DataLoader workers
prefetch ``prefetch_factor * num_workers`` batches ahead, so
:class:`ResumableDataLoader` counts batches in the main process as it hands
them out (as mosaicml/streaming's ``StreamingDataLoader`` and torchdata's
``StatefulDataLoader`` do). Checkpointing is one call next to the model's::

    loader = ds.dataloader(batch_size=64, shuffle=True, num_workers=4, resumable=True, seed=0)
    if checkpoint:
        loader.load_state_dict(checkpoint["loader"])
    for epoch in range(loader.epoch, epochs):
        for batch in loader:   # after a resume: only what the interrupted run had not seen
            ...
            save({"model": model.state_dict(), "loader": loader.state_dict()})

The last step of an epoch under DDP (``tail=``): ``"exact"`` (default) serves
every sample exactly once; ranks get the same number of batches, the last ones
differing by at most one sample, except when the epoch's last global batch
holds fewer samples than there are ranks (``0 < remaining % (W*B) < W``): then
the ranks past that remainder get one batch fewer (a warning says so), which
DDP needs ``torch.distributed.algorithms.Join`` for. ``"pad"`` repeats up to
``W - 1`` samples from the start of the epoch's order so that every rank gets
the same number of samples (``DistributedSampler``'s default). ``"drop"``
leaves out the last ``remaining % (W*B)`` samples of the order (they differ
from epoch to epoch when shuffling), so every batch on every rank is full.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sized
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Sampler

from .ranks import resolve_rank

__all__ = ["TAILS", "epoch_order", "rank_indices", "ResumableSampler", "ResumableDataLoader"]

log = logging.getLogger(__name__)

TAILS = ("exact", "pad", "drop")
STATE_VERSION = 1
ORDER_CHECK = 16
"""Leading indices of the epoch's order kept in a state, to notice an RNG that changed between runs."""


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order of one epoch: ``arange(n)``, or a permutation drawn from ``(seed, epoch)`` alone.

    numpy's PCG64 seeded by ``SeedSequence([seed, epoch])``: the same on every
    rank and worker, for any number of either.
    """
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
    return rng.permutation(num_samples).astype(np.int64, copy=False)


def rank_indices(
    order: np.ndarray, position: int, rank: int, world_size: int, batch_size: int, tail: str = "exact"
) -> np.ndarray:
    """The sample indices rank ``rank`` reads from ``position`` on, in order (see the module doc for ``tail``)."""
    remaining = order[position:]
    if tail == "drop":
        remaining = remaining[: len(remaining) - len(remaining) % (world_size * batch_size)]
    elif tail == "pad" and len(remaining) % world_size:
        filler = np.resize(order, world_size - len(remaining) % world_size)  # cycles if order is short
        remaining = np.concatenate([remaining, filler])
    return remaining[rank::world_size]


class ResumableSampler(Sampler[list[int]]):
    """A batch sampler with ``state_dict()``/``load_state_dict()``; see the module doc.

    Use it through :class:`ResumableDataLoader` (``VLADataset.dataloader(...,
    resumable=True)``), which counts the batches the training loop received.
    Used as a plain DataLoader's ``batch_sampler`` it counts the batches it
    handed out, which is the same only with ``num_workers=0``.

    Args:
        data_source: the dataset (its ``len``) or the number of samples.
        batch_size: samples per batch on each rank.
        shuffle: a new permutation per epoch, else ``0 .. n-1``.
        seed: the permutation seed; the same on every rank.
        rank, world_size: default torch.distributed's (or 0 and 1).
        tail: ``"exact"``, ``"pad"`` or ``"drop"``: the last step of an epoch.
    """

    def __init__(
        self,
        data_source: Sized | int,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        tail: str = "exact",
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if tail not in TAILS:
            raise ValueError(f"tail={tail!r}: use one of {TAILS}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.num_samples = int(data_source) if isinstance(data_source, (int, np.integer)) else len(data_source)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.tail = tail
        self.epoch = 0
        self._position = 0
        self._counted_by_loader = False
        self._pass = 0  # id of the pass being iterated; bumped to retire older iterators
        self._active = False
        self._pass_start = 0
        self._pass_batches = 0
        self._delivered = 0
        self._cached: tuple[tuple[int, int, bool], np.ndarray] | None = None
        self._prefetch: Callable[[np.ndarray, set[Any]], object] | None = None
        self._ahead = 0

    def set_prefetch(self, prefetch: Callable[[np.ndarray, set[Any]], object] | None, ahead: int) -> None:
        """Tell ``prefetch(indices, seen)`` the samples of the batch ``ahead`` batches after each one yielded
        (and of the first ``ahead`` batches as a pass starts), so what they read can be fetched meanwhile;
        ``seen`` is a set new each pass, for ``prefetch`` to note what it already asked for. The batches
        yielded, their order and the state are unchanged. ``VLADataset.dataloader`` sets
        ``VLADataset.prefetch`` on a node cache."""
        self._prefetch = prefetch
        self._ahead = max(0, int(ahead))

    # ------------------------------------------------------------------ order

    def _order(self, epoch: int | None = None) -> np.ndarray:
        key = (self.seed, self.epoch if epoch is None else epoch, self.shuffle)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, epoch_order(self.num_samples, *key))
        return self._cached[1]

    def _mine(self, start: int) -> np.ndarray:
        return rank_indices(self._order(), start, self.rank, self.world_size, self.batch_size, self.tail)

    def _batches_from(self, start: int) -> int:
        remaining = self.num_samples - start
        if self.tail == "drop":
            remaining -= remaining % (self.world_size * self.batch_size)
        elif self.tail == "pad":
            remaining += -remaining % self.world_size
        mine = max(0, -(-(remaining - self.rank) // self.world_size))
        return -(-mine // self.batch_size)

    @property
    def position(self) -> int:
        """Samples of this epoch's order the training loop has received, all ranks together."""
        if self._active:  # counted cheaply per batch, turned into samples only when asked
            step = self.world_size * self.batch_size
            return min(self._pass_start + self._delivered * step, self.num_samples)
        return self._position

    @position.setter
    def position(self, value: int) -> None:
        self._position = int(value)
        self._pass += 1
        self._active = False

    def __len__(self) -> int:
        """Batches this rank yields in the pass under way (or the next one)."""
        return self._pass_batches if self._active else self._batches_from(self.position)

    # ------------------------------------------------------------ the passes

    def _begin(self) -> int:
        self._position = self.position
        self._pass += 1
        self._active = True
        self._pass_start = self._position
        self._delivered = 0
        self._pass_batches = self._batches_from(self.position)
        remaining = self.num_samples - self.position
        last = remaining % (self.world_size * self.batch_size)
        if self.tail == "exact" and 0 < last < self.world_size and self.rank >= last:
            log.warning(
                "epoch %d: the last global batch holds %d samples for %d ranks, so rank %d gets one batch fewer "
                "than rank 0; under DDP use torch.distributed.algorithms.Join, or tail='pad' (repeats %d samples) "
                "or tail='drop'",
                self.epoch,
                last,
                self.world_size,
                self.rank,
                self.world_size - last,
            )
        return self._pass

    @staticmethod
    def _stale() -> RuntimeError:
        return RuntimeError(
            "this iterator is stale: a newer iter(loader), load_state_dict() or set_epoch() started over; "
            "iterate the loader again"
        )

    def _finish(self, token: int) -> None:
        if token == self._pass and self._active:
            self.epoch += 1
            self._position = 0
            self._active = False

    def __iter__(self) -> Iterator[list[int]]:
        token = self._pass if self._counted_by_loader else self._begin()
        mine = self._mine(self._pass_start)
        step = self.batch_size
        prefetch, ahead = self._prefetch, self._ahead * step
        seen: set[Any] = set()
        if prefetch is not None:
            for lo in range(0, min(ahead, len(mine)), step):
                prefetch(mine[lo : lo + step], seen)
        for lo in range(0, len(mine), step):
            if prefetch is not None and lo + ahead < len(mine):
                prefetch(mine[lo + ahead : lo + ahead + step], seen)
            if not self._counted_by_loader:
                if token != self._pass:
                    raise self._stale()
                self._delivered += 1
            yield mine[lo : lo + step].tolist()
        if not self._counted_by_loader:
            self._finish(token)

    # ----------------------------------------------------------------- state

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning, unless it is the epoch under way (so a resumed run may call it)."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self.position = 0

    def _where(self) -> tuple[int, int]:
        ended = self._active and self._delivered >= self._pass_batches
        if ended or 0 < self.num_samples <= self.position:
            return self.epoch + 1, 0
        return self.epoch, self.position

    def state_dict(self) -> dict[str, Any]:
        """Where the training loop is: ``epoch`` and ``position`` (samples of the epoch's order received).

        Equal on every rank of a DDP run in step; save rank 0's. Once this
        rank has received its last batch of an epoch, the state is the start
        of the next epoch.
        """
        epoch, position = self._where()
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch": epoch,
            "position": position,
            "num_samples": self.num_samples,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "tail": self.tail,
        }
        if position and self.shuffle:
            state["order_check"] = self._order(epoch)[:ORDER_CHECK].tolist()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` (from :meth:`state_dict`, any world size or batch size) left off.

        Raises:
            ValueError: the state is for a dataset of another length, or is not
                a sampler state.
            RuntimeError: this numpy draws another order for ``(seed, epoch)``
                than the run that saved the state.
        """
        if state.get("version") != STATE_VERSION or "position" not in state:
            raise ValueError(
                f"not a vlastore sampler state (version {state.get('version')!r}); "
                "pass what loader.state_dict() returned"
            )
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(
                f"the state is for {state['num_samples']:,} samples but this dataset has {self.num_samples:,}; "
                "resume on the same episodes, features and on_missing setting"
            )
        position, epoch = int(state["position"]), int(state["epoch"])
        if not 0 <= position <= self.num_samples or epoch < 0:
            raise ValueError(f"bad sampler state: epoch {epoch}, position {position} of {self.num_samples}")
        self.seed, self.shuffle = int(state["seed"]), bool(state["shuffle"])
        if "order_check" in state and position:
            drawn = self._order(epoch)[:ORDER_CHECK].tolist()
            if drawn != list(state["order_check"]):
                raise RuntimeError(
                    f"this numpy ({np.__version__}) draws another order for seed {self.seed}, epoch {epoch} than "
                    "the run that saved the state: resuming mid-epoch would repeat and skip samples; resume with "
                    "the numpy version of that run, or from the start of an epoch"
                )
        self.epoch, self.position = epoch, position


class _CountingIterator(Iterator[Any]):
    """Wraps a DataLoader iterator: a batch counts as seen when it reaches the training loop."""

    def __init__(self, inner: Iterator[Any], sampler: ResumableSampler, token: int) -> None:
        self._inner = inner
        self._sampler = sampler
        self._token = token

    def __iter__(self) -> _CountingIterator:
        return self

    def __len__(self) -> int:
        return self._sampler._pass_batches

    def __next__(self) -> Any:
        sampler = self._sampler
        if sampler._pass != self._token:
            raise sampler._stale()
        try:
            batch = next(self._inner)
        except StopIteration:
            sampler._finish(self._token)
            raise
        sampler._delivered += 1  # the whole per-batch cost of resumability (position is derived on demand)
        return batch


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` that counts the batches the loop received.

    ``state_dict()``/``load_state_dict()`` save and restore the sampler's
    position; ``epoch`` is the epoch under way (or next); an epoch that runs
    to its end moves to the next by itself (``set_epoch`` also works).

    Args:
        dataset: a map-style dataset.
        batch_size, shuffle: as DataLoader's (per rank).
        seed, tail, rank, world_size: see :class:`ResumableSampler`.
        batch_sampler: a :class:`ResumableSampler` made beforehand (instead of
            ``batch_size``/``shuffle``/``seed``/...).
        **kwargs: any other DataLoader argument (``num_workers``,
            ``collate_fn``, ``persistent_workers``, ``pin_memory``,
            ``multiprocessing_context``, ...). ``sampler``, ``drop_last``
            (use ``tail="drop"``) and ``in_order=False`` are refused.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int | None = None,
        shuffle: bool = False,
        *,
        seed: int = 0,
        tail: str = "exact",
        rank: int | None = None,
        world_size: int | None = None,
        batch_sampler: ResumableSampler | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("sampler") is not None:
            raise ValueError("ResumableDataLoader makes its own sampler: drop sampler=, use shuffle=/seed=")
        if kwargs.pop("drop_last", False):
            raise ValueError("drop_last=True: use tail='drop' (the same for every rank and resumable)")
        if kwargs.get("in_order", True) is False:
            raise ValueError(
                "in_order=False hands out batches out of order: what was seen is then no prefix "
                "of the epoch and cannot be resumed; leave in_order=True"
            )
        kwargs.pop("sampler", None)
        if batch_sampler is None:
            batch_sampler = ResumableSampler(
                len(dataset), 1 if batch_size is None else batch_size, shuffle, seed, rank, world_size, tail
            )
        elif not isinstance(batch_sampler, ResumableSampler):
            raise TypeError(f"batch_sampler must be a ResumableSampler, got {type(batch_sampler).__name__}")
        elif batch_sampler.num_samples != len(dataset):
            raise ValueError(
                f"batch_sampler is for {batch_sampler.num_samples} samples, the dataset has {len(dataset)}"
            )
        elif batch_size is not None and batch_size != batch_sampler.batch_size:
            raise ValueError(f"batch_size={batch_size} but the batch_sampler's is {batch_sampler.batch_size}")
        batch_sampler._counted_by_loader = True
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)

    @property
    def resumable_sampler(self) -> ResumableSampler:
        sampler = self.batch_sampler
        assert isinstance(sampler, ResumableSampler)
        return sampler

    @property
    def epoch(self) -> int:
        """The epoch under way, or the next one to run."""
        return self.resumable_sampler._where()[0]

    def set_epoch(self, epoch: int) -> None:
        self.resumable_sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """The position of the training loop in the epoch (see :meth:`ResumableSampler.state_dict`)."""
        return self.resumable_sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resumable_sampler.load_state_dict(state)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler = self.resumable_sampler
        if len(self.dataset) != sampler.num_samples:  # type: ignore[arg-type]
            raise RuntimeError(
                f"the dataset now has {len(self.dataset):,} samples, the loader was made for "  # type: ignore[arg-type]
                f"{sampler.num_samples:,} (refresh() with on_missing='skip' changed them); make a new loader"
            )
        token = sampler._begin()
        return _CountingIterator(super().__iter__(), sampler, token)
