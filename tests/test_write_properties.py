"""Property tests of the write path: any permutation and split of rows into calls and ranks, every dtype and
input form, fixed and ragged, raw and zstd: values read back bit-equal, shard files equal to one ascending write."""

from __future__ import annotations

import tempfile
from pathlib import Path
from unittest.mock import patch

import numpy as np
import torch
from helpers import random_rows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlastore import writer as writer_module
from vlastore.format import FamilySpec
from vlastore.store import EpisodeData, VLAStore

# (family dtype, how the user hands the values over)
INPUTS = [
    ("float32", "numpy"),
    ("float32", "big-endian"),
    ("float16", "numpy"),
    ("float16", "big-endian"),
    ("bfloat16", "torch"),
    ("bfloat16", "uint16-bits"),
    ("bfloat16", "big-endian-bits"),
]


def _as_input(stored: np.ndarray, form: str) -> object:
    """What a user passes for rows whose storage form is ``stored``."""
    if form == "torch":
        return torch.from_numpy(stored.view(np.int16).copy()).view(torch.bfloat16)
    if form in ("big-endian", "big-endian-bits"):
        return stored.astype(stored.dtype.newbyteorder(">"))  # same values, swapped bytes in memory
    return stored


@st.composite
def plans(draw: st.DrawFn) -> dict:
    dtype, form = draw(st.sampled_from(INPUTS))
    ragged = draw(st.booleans())
    items = draw(st.lists(st.integers(0, 6), min_size=1, max_size=4))
    rows = sum(items)
    lengths = draw(st.lists(st.integers(1, 3), min_size=rows, max_size=rows)) if ragged else None
    rows_per_shard = draw(st.integers(3, 6) if ragged else st.integers(1, 5))
    world = draw(st.integers(1, 4))
    order = draw(st.permutations(range(rows)))
    # cut the permuted rows into calls; each call goes to the writer of the rank owning... each row's rank
    cuts = sorted(draw(st.sets(st.integers(1, max(1, rows - 1)), max_size=max(0, rows - 1)))) if rows > 1 else []
    return {
        "dtype": dtype,
        "form": form,
        "ragged": ragged,
        "items": items,
        "lengths": lengths,
        "rows_per_shard": rows_per_shard,
        "compression": draw(st.sampled_from([None, "zstd"])),
        "world": world,
        "order": list(order),
        "cuts": cuts,
        "as_list": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
        "row_shape": draw(st.sampled_from([(3,), (2, 2)])),
    }


def _make(path: Path, plan: dict) -> VLAStore:
    store = VLAStore.create(path, [EpisodeData(f"ep_{i}", steps=n) for i, n in enumerate(plan["items"])])
    spec = FamilySpec(
        plan["row_shape"],
        plan["dtype"],
        ragged=plan["ragged"],
        compression=plan["compression"],
        rows_per_shard=plan["rows_per_shard"],
        vlm_reuse_count=1,
    )
    store.add_family("f", spec, lengths=plan["lengths"])
    return store


def _values(plan: dict) -> list[np.ndarray] | np.ndarray:
    shape = plan["row_shape"]
    if plan["ragged"]:
        return [random_rows((n, *shape), plan["dtype"], seed=plan["seed"] + i) for i, n in enumerate(plan["lengths"])]
    return random_rows((sum(plan["items"]), *shape), plan["dtype"], seed=plan["seed"])


def _shards(store: VLAStore) -> dict[int, bytes]:
    out = {}
    for shard in store.written_shards("f").tolist():
        data = store.storage.get(store.shard_key("f", shard))
        assert data is not None
        out[shard] = data
    return out


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(plan=plans())
def test_any_split_into_calls_and_ranks_reads_back_bit_equal_and_writes_the_same_shards(plan: dict) -> None:
    values = _values(plan)
    with tempfile.TemporaryDirectory() as tmp:
        store = _make(Path(tmp) / "parts.vla", plan)
        layout = store.layout("f")
        world = plan["world"]
        writers = [store.writer("f", rank=r, world_size=world) for r in range(world)]
        order = np.asarray(plan["order"], dtype=np.int64)
        calls = np.split(order, plan["cuts"]) if len(order) else []
        for call in calls:  # each call's rows, grouped by the rank owning them, in the call's (permuted) order
            ranks = layout.shard_of(call) % world
            for rank in np.unique(ranks).tolist():
                rows = call[ranks == rank]
                if plan["ragged"] or plan["as_list"]:
                    batch = [_as_input(values[r], plan["form"]) for r in rows.tolist()]
                else:
                    batch = _as_input(np.asarray(values)[rows], plan["form"])
                writers[rank].write_rows(rows, batch)
        for writer in writers:
            writer.close()

        reference = _make(Path(tmp) / "ascending.vla", plan)
        with reference.writer("f", rank=0, world_size=1) as writer:  # one ascending write, one rank
            rows = np.arange(layout.rows)
            if plan["ragged"]:
                writer.write_rows(rows, [values[r] for r in rows.tolist()])
            elif len(rows):
                writer.write_rows(rows, values)

        reader = VLAStore.open(Path(tmp) / "parts.vla").reader("f")
        if plan["ragged"]:
            for row, got in enumerate(reader.rows(np.arange(layout.rows))):
                assert got.dtype.isnative and got.tobytes() == values[row].tobytes()
        else:
            got = reader.gather(np.arange(layout.rows))
            assert got.dtype.isnative and got.tobytes() == np.asarray(values).tobytes()
        assert _shards(store) == _shards(reference)

        # raw shards are filled in their files (Storage.begin_put); the in-memory path (object storage, or more
        # than _MAX_DIRECT shards at once) writes the same bytes
        in_memory = _make(Path(tmp) / "in-memory.vla", plan)
        with patch.object(writer_module, "_MAX_DIRECT", 0), in_memory.writer("f", rank=0, world_size=1) as writer:
            rows = np.arange(layout.rows)
            if plan["ragged"]:
                writer.write_rows(rows, [values[r] for r in rows.tolist()])
            elif len(rows):
                writer.write_rows(rows, values)
        assert _shards(in_memory) == _shards(reference)
        assert not list(Path(tmp).rglob("*.partial"))
