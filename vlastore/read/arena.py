"""One virtual address range holding every shard of a family, memory-mapped.

A batch of random rows spans many shards; gathering them shard by shard costs
a few numpy calls per shard, more than the copy itself. Here the shard files
of one family generation are mapped side by side into one reserved range, each
at a slot whose size is a multiple of both the page size (``mmap`` needs
aligned addresses) and the chunk stride. Every chunk of every shard then sits
at ``record * stride`` in one buffer, and a batch is one numpy fancy index.

Linux only (``mmap`` with ``MAP_FIXED`` through ctypes); :func:`available`
says whether it can be used, and the reader falls back to one map per shard
otherwise. Mappings are private and copy-on-write (like ``mmap.ACCESS_COPY``):
arrays over them are writable, so ``torch.from_numpy`` needs no copy, and no
write reaches a file. The range is unmapped when the last array over it is
garbage-collected, never while a view handed out is alive.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import sys

import numpy as np

__all__ = ["ShardArena", "available"]

_MAP_FIXED = 0x10
_MAP_NORESERVE = 0x4000
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAX_RESERVE = 1 << 44  # 16 TiB of the 128 TiB a 64-bit Linux process can address
_MADV_WILLNEED = 3
_MADV_POPULATE_READ = 22  # Linux 5.14+; older kernels answer EINVAL and the pages fault in on first touch
_PREFAULT = os.environ.get("VLASTORE_PREFAULT", "auto")
"""``auto``, ``willneed``, ``populate`` or ``off``: see :meth:`ShardArena._prefault`."""


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.restype = ctypes.c_int
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.madvise.restype = ctypes.c_int
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.mincore.restype = ctypes.c_int
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def available() -> bool:
    """Whether this platform supports the shared range (else: one map per shard)."""
    return _LIBC is not None and os.environ.get("VLASTORE_NO_ARENA", "") in ("", "0")


def _region_type(size: int) -> type:
    class _Region(ctypes.c_char * size):  # type: ignore[misc]
        """Owns the reserved range: unmapped when the last numpy view over it goes away."""

        def __del__(self) -> None:
            if _LIBC is not None and getattr(self, "_addr", None):
                _LIBC.munmap(self._addr, self._size)

    return _Region


class ShardArena:
    """Reserved address range with one slot per shard of ``stride``-byte chunks.

    Args:
        n_shards: slots to reserve.
        shard_nbytes: the largest a shard file can be.
        stride: bytes per chunk (payload + crc32c).
    """

    def __init__(self, n_shards: int, shard_nbytes: int, stride: int) -> None:
        if _LIBC is None:
            raise OSError("no shared mapping range on this platform")
        page = mmap.PAGESIZE
        unit = page * stride // math.gcd(page, stride)
        self.stride = stride
        self.slot_nbytes = -(-shard_nbytes // unit) * unit
        self.records_per_slot = self.slot_nbytes // stride
        self.size = max(1, n_shards) * self.slot_nbytes
        if self.slot_nbytes > 2 * shard_nbytes + page or self.size > _MAX_RESERVE:
            # strides with few factors of two (e.g. 5 MB rows + crc) need huge aligned slots
            raise OSError(f"a shard range for stride {stride} would need {self.size:,} bytes of address space")
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
        addr = _LIBC.mmap(None, self.size, 0, flags, -1, 0)  # PROT_NONE: address space only
        if addr in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"cannot reserve {self.size} bytes of address space")
        region = _region_type(self.size).from_address(addr)  # type: ignore[attr-defined]
        region._addr, region._size = addr, self.size
        self.addr = addr
        self.buf = np.frombuffer(region, dtype=np.uint8)  # keeps the region (and its mapping) alive
        self.mapped: dict[int, int] = {}

    def map(self, shard: int, fd: int, size: int, where: str) -> np.ndarray:
        """Map an open shard file of ``size`` bytes into its slot; its bytes as a uint8 view.

        The caller opened ``fd`` (a checked regular file) and closes it; the mapping stays valid.

        Raises:
            ValueError: the file is empty or larger than a shard of this family can be.
            OSError: the mapping failed.
        """
        if size == 0:
            raise ValueError(f"{where} is empty")
        if size > self.slot_nbytes:
            raise ValueError(f"{where} is {size} bytes, larger than a shard of this family can be")
        start = self.addr + shard * self.slot_nbytes
        prot = mmap.PROT_READ | mmap.PROT_WRITE  # private: writes stay in this process
        got = _LIBC.mmap(start, size, prot, mmap.MAP_PRIVATE | _MAP_FIXED, fd, 0)  # type: ignore[union-attr]
        if got != start:
            raise OSError(ctypes.get_errno(), f"mmap of {where} into the shard range failed")
        self.mapped[shard] = size
        self._prefault(start, size)
        lo = shard * self.slot_nbytes
        return self.buf[lo : lo + size]

    def _prefault(self, start: int, size: int) -> None:
        """Ask the kernel for a newly mapped shard's pages ahead of the reads (``VLASTORE_PREFAULT``).

        ``auto`` (the default): a shard mostly absent from the page cache is read ahead in the background
        (``MADV_WILLNEED``: one large read instead of a page fault and a small read per row), unless the
        family's shards together could not fit in half the memory (then reading every shard whole would
        evict what an epoch needs). ``willneed``: always that; ``populate``: map the page tables of the
        whole shard in one call (``MADV_POPULATE_READ``, Linux 5.14+); ``off``: pages fault in when read.
        tools/bench_read.py measured (docs/reading.md): first reads with the page cache dropped at 0.63x
        ``np.memmap`` without it and about 1x with it; no difference with the page cache warm, where
        populating the page tables did not help either.
        """
        if _PREFAULT == "off" or _LIBC is None:
            return
        page = mmap.PAGESIZE
        pages = -(-size // page)
        if _PREFAULT == "auto":
            if self.size > _memory_bytes() // 2:
                return
            vec = (ctypes.c_ubyte * pages)()
            if _LIBC.mincore(start, size, vec) != 0:
                return
            if int(np.count_nonzero(np.frombuffer(bytes(vec), dtype=np.uint8) & 1)) * 10 >= pages * 9:
                return  # in the page cache already
        advice = _MADV_POPULATE_READ if _PREFAULT == "populate" else _MADV_WILLNEED
        _LIBC.madvise(start, pages * page, advice)  # advice: a failure only means page faults later

    def records(self, nbytes: int) -> np.ndarray:
        """All chunk slots as opaque ``nbytes`` records: record ``shard * records_per_slot + position``."""
        n = len(self.buf) // self.stride
        return np.ndarray((n,), dtype=np.dtype((np.void, nbytes)), buffer=self.buf, strides=(self.stride,))

    def record_bytes(self, nbytes: int) -> np.ndarray:
        """The same slots as a ``(records, nbytes)`` uint8 matrix."""
        n = len(self.buf) // self.stride
        return np.ndarray((n, nbytes), dtype=np.uint8, buffer=self.buf, strides=(self.stride, 1))

    def crcs(self, nbytes: int) -> np.ndarray:
        """The crc32c stored after each record's payload, as ``<u4``."""
        n = len(self.buf) // self.stride
        return np.ndarray((n,), dtype="<u4", buffer=self.buf, offset=nbytes, strides=(self.stride,))
