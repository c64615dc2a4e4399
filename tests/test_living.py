"""Format 2, living stores: append, remove, replace, snapshots, concurrent committers, kills, upgrade, gc."""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import episodes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlastore.commitlog import SnapshotNotFoundError
from vlastore.format import FamilySpec, FormatError
from vlastore.store import EpisodeData, SegmentRows, VLAStore, upgrade_store

GOLDEN_V1 = Path(__file__).parent / "data" / "golden-v1.vla"
FIXED = FamilySpec((4,), "float32", vlm_reuse_count=2, rows_per_shard=2)
RAGGED = FamilySpec((3,), "float16", ragged=True, rows_per_shard=8)


def create(path: Path | str, eps: list[EpisodeData]) -> VLAStore:
    return VLAStore.create(path, eps, format_version=2)


def value(name: str, item: int, width: int = 4) -> np.ndarray:
    """The feature row of (episode, item): a function of the address only, so any write order gives the same."""
    seed = (sum(map(ord, name)) * 100 + item) % 2000  # float16 holds these exactly
    return np.arange(width, dtype=np.float32) + seed


def ragged_length(name: str, item: int) -> int:
    return 1 + (sum(map(ord, name)) + item) % 5


def fill(store: VLAStore, family: str = "f") -> int:
    """Write every pending row of ``family`` (the value function above); returns how many."""
    writer = store.writer(family)
    rows = writer.pending_rows()
    layout = store.layout(family)
    names = store.catalog.names
    for row in rows.tolist():
        e, item = layout.address(row)
        if store.spec(family).ragged:
            n = int(layout.lengths[row])
            writer.write_rows([row], [np.tile(value(names[e], item, 3), (n, 1)).astype(np.float16)])
        else:
            writer.write_rows([row], value(names[e], item)[None])
    writer.close()
    return len(rows)


def shard_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and "/values/c/" in str(p)}


def ragged_rows(eps: list[EpisodeData]) -> SegmentRows:
    items = [-(-e.step_count() // 3) for e in eps]
    lengths = [ragged_length(e.name, i) for e, n in zip(eps, items, strict=True) for i in range(n)]
    return SegmentRows(np.asarray(items), np.asarray(lengths))


def test_append_writes_only_new_shards_and_reads_back(tmp_path: Path) -> None:
    eps = episodes((7, 5, 9, 3, 4))
    store = create(tmp_path / "s.vla", eps[:2])
    assert store.format_version == 2 and store.snapshot_id == 1
    store = VLAStore.open(tmp_path / "s.vla", writable=True)
    store.add_family("f", FIXED)
    assert fill(store) == 7
    before = shard_files(tmp_path / "s.vla")
    snap = store.add_episodes(eps[2:4])
    assert snap is not None and store.snapshot_id == 3
    assert store.datasets == tuple(e.name for e in eps[:4])
    assert store.coverage("f").tolist() == [True] * 7 + [False] * 7  # new rows are missing until filled
    assert fill(store) == 7  # exactly the new rows
    after = shard_files(tmp_path / "s.vla")
    assert {k: after[k] for k in before} == before  # no existing shard file was rewritten
    assert len(after) > len(before)
    for e in eps[:4]:
        for item in range(-(-e.step_count() // 2)):
            assert np.array_equal(store.feature("f", e.name, item).numpy(), value(e.name, item))
        assert np.array_equal(store.series("state", e.name), e.series["state"])
    # reopened from disk: the same
    again = VLAStore.open(tmp_path / "s.vla")
    rows = np.arange(again.layout("f").rows)
    assert np.array_equal(np.asarray(again.reader("f").gather(rows)), np.asarray(store.reader("f").gather(rows)))


def test_identical_skipped_different_refused_replace_swaps(tmp_path: Path) -> None:
    eps = episodes((6, 4, 5))
    store = create(tmp_path / "s.vla", eps)
    store = VLAStore.open(tmp_path / "s.vla", writable=True)
    store.add_family("f", FIXED)
    fill(store)
    assert store.add_episodes(eps[:2]) is None and store.snapshot_id == 2  # identical: nothing committed
    changed = EpisodeData(eps[1].name, {k: v + 1 for k, v in eps[1].series.items()})
    with pytest.raises(FormatError, match=eps[1].name):
        store.add_episodes([changed])
    assert store.snapshot_id == 2
    store.add_episodes([changed], replace=True)
    assert store.datasets == (eps[0].name, eps[2].name, eps[1].name)  # replaced = appended again
    assert np.array_equal(store.series("state", eps[1].name), changed.series["state"])
    cover = store.coverage("f")
    lo, hi = store.layout("f").episode_rows[2:4]
    assert not cover[lo:hi].any() and cover[:lo].all()  # its feature rows are missing until rebuilt
    assert store.log()[-1]["changes"] == [f"append {eps[1].name}"] or "replace" in " ".join(store.log()[-1]["changes"])


def test_remove_and_snapshots_keep_a_consistent_view(tmp_path: Path) -> None:
    eps = episodes((6, 4, 5, 3))
    create(tmp_path / "s.vla", eps[:3])
    store = VLAStore.open(tmp_path / "s.vla", writable=True)
    store.add_family("f", FIXED)
    fill(store)
    reader = VLAStore.open(tmp_path / "s.vla")  # holds commit 2
    rows = np.arange(reader.layout("f").rows)
    before = np.asarray(reader.reader("f").gather(rows)).copy()
    store.remove_episodes([eps[1].name])
    store.add_episodes(eps[3:])
    fill(store)
    assert store.datasets == (eps[0].name, eps[2].name, eps[3].name)
    # the old reader: same catalog, series and rows as when it opened
    assert reader.snapshot_id == 2 and reader.datasets == tuple(e.name for e in eps[:3])
    assert np.array_equal(np.asarray(reader.reader("f").gather(rows)), before)
    assert np.array_equal(reader.series("state", eps[1].name), eps[1].series["state"])
    old = VLAStore.open(tmp_path / "s.vla", snapshot=2)
    assert old.datasets == reader.datasets
    reader.refresh()
    assert reader.snapshot_id == store.snapshot_id and reader.datasets == store.datasets
    with pytest.raises(KeyError, match="nope"):
        store.remove_episodes(["nope"])
    with pytest.raises(SnapshotNotFoundError):
        VLAStore.open(tmp_path / "s.vla", snapshot=99)


@settings(
    max_examples=8,
    deadline=None,
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    cuts=st.lists(st.integers(1, 6), min_size=1, max_size=4), steps=st.lists(st.integers(1, 9), min_size=2, max_size=7)
)
def test_any_split_into_appends_gives_the_rows_of_one_ingest(
    tmp_path_factory: pytest.TempPathFactory, cuts: list[int], steps: list[int]
) -> None:
    eps = episodes(tuple(steps), seed=len(steps))
    root = tmp_path_factory.mktemp("split")
    whole = create(root / "whole.vla", eps)
    whole = VLAStore.open(root / "whole.vla", writable=True)
    whole.add_family("f", FIXED)
    whole.add_family("r", RAGGED, items_per_episode=ragged_rows(eps).items, lengths=ragged_rows(eps).lengths)
    fill(whole)
    fill(whole, "r")
    first = cuts[0] % len(eps) or 1
    split = create(root / "split.vla", eps[:first])
    split = VLAStore.open(root / "split.vla", writable=True)
    split.add_family("f", FIXED)
    split.add_family(
        "r", RAGGED, items_per_episode=ragged_rows(eps[:first]).items, lengths=ragged_rows(eps[:first]).lengths
    )
    at = first
    for i, cut in enumerate([*cuts[1:], len(eps)]):
        part = eps[at : at + cut]
        if not part:
            break
        split.add_episodes(part, rows={"r": ragged_rows(part)})
        if i % 2:
            fill(split)  # features written between appends, or after all of them
        at += cut
    fill(split)
    fill(split, "r")
    split = VLAStore.open(root / "split.vla")
    assert split.datasets == whole.datasets
    for key in whole.series_keys:
        assert np.array_equal(split.series_all(key), whole.series_all(key))
    for family in ("f", "r"):
        assert np.array_equal(split.layout(family).episode_rows, whole.layout(family).episode_rows)
        assert split.coverage(family).all()
        rows = np.arange(whole.layout(family).rows)
        if family == "f":
            assert np.array_equal(
                np.asarray(split.reader(family).gather(rows)), np.asarray(whole.reader(family).gather(rows))
            )
        else:
            a, la = split.reader(family).gather_padded(rows)
            b, lb = whole.reader(family).gather_padded(rows)
            assert np.array_equal(np.asarray(la), np.asarray(lb)) and np.array_equal(np.asarray(a), np.asarray(b))


def _appender(path: str, prefix: str, count: int) -> None:
    store = VLAStore.open(path, writable=True)
    for i, e in enumerate(episodes((3,) * count, seed=ord(prefix[0]), prefix=prefix)):
        store.add_episodes([e])
        assert e.name in store.datasets, i


def test_two_appending_processes_lose_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "s.vla")
    create(path, episodes((2,)))
    store = VLAStore.open(path, writable=True)
    store.add_family("f", FIXED)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_appender, args=(path, p, 6)) for p in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store.refresh()
    assert len(store.datasets) == 13 and store.snapshot_id == 14
    assert [c["commit"] for c in store.log()] == list(range(1, 15))
    assert fill(store) == store.layout("f").rows  # every row planned, once


KILLER = """
import sys
sys.path.insert(0, {tests!r})
from helpers import episodes
from vlastore.store import VLAStore
store = VLAStore.open({path!r}, writable=True)
print("ready", flush=True)
for i, e in enumerate(episodes((4,) * 400, seed=3, prefix="k")):
    if i % 3 == 2:
        store.remove_episodes([store.datasets[1]])
    else:
        store.add_episodes([e])
"""


@pytest.mark.parametrize("delay", [0.3, 0.9])
def test_sigkill_during_commits_leaves_the_old_or_the_new_commit(tmp_path: Path, delay: float) -> None:
    path = str(tmp_path / "s.vla")
    create(path, episodes((3, 3)))
    store = VLAStore.open(path, writable=True)
    store.add_family("f", FIXED)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLER.format(tests=str(Path(__file__).parent), path=path)], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    head = VLAStore.open(path, writable=True)  # the newest complete commit, every part of it readable
    assert head.snapshot_id >= 2
    for key in head.series_keys:
        assert len(head.series_all(key)) == head.catalog.total_steps
    assert head.layout("f").rows == int(np.sum(-(-head.catalog.steps // 2)))
    fill(head)
    head.add_episodes(episodes((2,), prefix="after"))  # and the store goes on
    assert "after_000" in VLAStore.open(path).datasets


def test_v1_upgrade_reads_the_same_then_appends(tmp_path: Path) -> None:
    path = tmp_path / "g.vla"
    shutil.copytree(GOLDEN_V1, path)
    v1 = VLAStore.open(path)
    assert v1.format_version == 1 and v1.snapshot_id == 0
    assert upgrade_store(path) == 1
    assert upgrade_store(path) is None
    v2 = VLAStore.open(path, writable=True)
    assert v2.format_version == 2 and v2.datasets == v1.datasets
    for key in v1.series_keys:
        assert np.array_equal(v1.series_all(key), v2.series_all(key))
    for family in v1.families:
        assert np.array_equal(v1.coverage(family), v2.coverage(family))
        assert np.array_equal(v1.layout(family).episode_rows, v2.layout(family).episode_rows)
        present = np.flatnonzero(v1.coverage(family))
        if v1.spec(family).ragged:
            assert np.array_equal(
                np.asarray(v1.reader(family).gather_padded(present)[0]),
                np.asarray(v2.reader(family).gather_padded(present)[0]),
            )
        else:
            assert np.array_equal(
                np.asarray(v1.reader(family).gather(present)), np.asarray(v2.reader(family).gather(present))
            )
    new = EpisodeData("appended", {k: np.zeros((4, len(v2.columns(k))), np.float32) for k in v2.series_keys})
    vlm_reuse = {f: v2.spec(f).vlm_reuse_count for f in v2.families}
    rows = {
        f: SegmentRows(
            np.asarray([2]),
            np.asarray([3, 3]) if v2.spec(f).ragged else None,
            ["a/0", "a/1"] if v2.spec(f).has_keys else None,
        )
        for f in v2.families
        if vlm_reuse[f] is None or v2.spec(f).ragged or v2.spec(f).has_keys
    }
    v2.add_episodes([new], rows=rows)
    assert VLAStore.open(path).datasets == (*v1.datasets, "appended")
    assert VLAStore.open(path, snapshot=0).datasets == v1.datasets  # what a run on the format-1 store recorded


def test_the_first_change_of_a_format_1_store_upgrades_it(tmp_path: Path) -> None:
    path = tmp_path / "g.vla"
    shutil.copytree(GOLDEN_V1, path)
    v1 = VLAStore.open(path, writable=True)
    names = v1.datasets
    v1.remove_episodes([names[0]])  # no `vlastore upgrade` first: the change does it, then commits on top
    assert v1.format_version == 2 and v1.datasets == names[1:] and v1.snapshot_id == 2
    assert [e["changes"][0].split()[0] for e in VLAStore.open(path).log()] == ["upgrade", "remove"]
    assert VLAStore.open(path, snapshot=0).datasets == names
    from vlastore.report import verify_store

    assert not verify_store(str(path)).corrupt  # (golden-v1 has a row never written, on purpose)


UPGRADER = """
from vlastore.store import upgrade_store
print("go", flush=True)
upgrade_store({path!r})
"""


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.5])
def test_sigkill_during_upgrade_leaves_a_readable_store(tmp_path: Path, delay: float) -> None:
    path = tmp_path / "g.vla"
    shutil.copytree(GOLDEN_V1, path)
    names = VLAStore.open(path).datasets
    proc = subprocess.Popen([sys.executable, "-c", UPGRADER.format(path=str(path))], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"go"
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = VLAStore.open(path)
    assert store.format_version in (1, 2) and store.datasets == names
    upgrade_store(path)  # a rerun finishes it
    assert VLAStore.open(path).format_version == 2 and VLAStore.open(path).datasets == names


def test_gc_deletes_old_snapshots_and_unused_objects_only(tmp_path: Path) -> None:
    eps = episodes((6, 4, 5))
    create(tmp_path / "s.vla", eps)
    store = VLAStore.open(tmp_path / "s.vla", writable=True)
    store.add_family("f", FIXED)
    fill(store)
    store.remove_episodes([eps[0].name])
    files_before = sum(1 for p in (tmp_path / "s.vla").rglob("*") if p.is_file())
    assert store.gc(retention_s=3600)["commits"] == 0  # everything is younger than the retention
    result = store.gc(retention_s=0, keep=1)
    assert result["commits"] == 2 and result["objects"] > 0 and result["kept"] == [3]
    assert sum(1 for p in (tmp_path / "s.vla").rglob("*") if p.is_file()) < files_before
    with pytest.raises(SnapshotNotFoundError, match="gc"):
        VLAStore.open(tmp_path / "s.vla", snapshot=1)
    head = VLAStore.open(tmp_path / "s.vla")
    assert head.datasets == (eps[1].name, eps[2].name) and head.coverage("f").all()
    for e in eps[1:]:
        assert np.array_equal(head.series("state", e.name), e.series["state"])
        assert np.array_equal(head.feature("f", e.name, 0).numpy(), value(e.name, 0))


def test_verify_and_cli_on_a_living_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ingest_helpers import robot_csvs

    from vlastore.cli import main
    from vlastore.report import verify_store

    robot_csvs(tmp_path / "day1", {"ep_a": 6, "ep_b": 5})
    robot_csvs(tmp_path / "day2", {"ep_c": 4}, seed=1)
    shutil.copy(tmp_path / "day1" / "ep_b.csv", tmp_path / "day2" / "ep_b.csv")  # recorded again, unchanged
    store = tmp_path / "s.vla"
    day1 = ["ingest", "robot", str(tmp_path / "day1"), "--out", str(store), "-q", "--format-version", "1"]
    assert main(day1) == 0
    assert main(["gc", str(store)]) == 0 and "nothing to collect" in capsys.readouterr().out  # format 1: untouched
    assert VLAStore.open(store).format_version == 1
    assert main(["upgrade", str(store)]) == 0
    assert main(["upgrade", str(store)]) == 0 and "already" in capsys.readouterr().out
    assert main(["ingest", "robot", str(tmp_path / "day2"), "--into", str(store), "-q"]) == 0
    assert VLAStore.open(store).datasets == ("ep_a", "ep_b", "ep_c")  # ep_b identical: skipped
    robot_csvs(tmp_path / "day3", {"ep_b": 5}, seed=7)
    assert main(["ingest", "robot", str(tmp_path / "day3"), "--into", str(store), "-q"]) == 1
    assert "ep_b" in capsys.readouterr().err
    assert main(["ingest", "robot", str(tmp_path / "day3"), "--into", str(store), "--replace", "-q"]) == 0
    assert VLAStore.open(store).datasets == ("ep_a", "ep_c", "ep_b")
    assert main(["rm", str(store), "ep_a"]) == 0
    assert main(["rm", str(store), "nope"]) == 2
    capsys.readouterr()
    assert main(["log", str(store)]) == 0
    out = capsys.readouterr().out
    assert "upgrade" in out and "append ep_c" in out and "replace ep_b" in out and "remove ep_a" in out
    assert verify_store(str(store)).ok
    assert main(["verify", str(store), "-q"]) == 0
    assert main(["gc", str(store), "--retention-hours", "0"]) == 0
    assert VLAStore.open(store).datasets == ("ep_c", "ep_b") and verify_store(str(store)).ok
    assert main(["log", str(store), "--json"]) == 0


def test_verify_finds_a_flipped_byte_in_an_appended_segment(tmp_path: Path) -> None:
    from vlastore.report import verify_store

    eps = episodes((6, 4, 5))
    create(tmp_path / "s.vla", eps[:2])
    store = VLAStore.open(tmp_path / "s.vla", writable=True)
    store.add_family("f", FIXED)
    fill(store)
    store.remove_episodes([eps[0].name])
    store.add_episodes(eps[2:])
    fill(store)
    assert verify_store(str(tmp_path / "s.vla")).ok  # rows of the removed episode are not "stray"
    key = store.shard_key("f", store.layout("f").n_shards - 1)
    path = tmp_path / "s.vla" / key
    data = bytearray(path.read_bytes())
    data[3] ^= 0x40
    path.write_bytes(bytes(data))
    report = verify_store(str(tmp_path / "s.vla"))
    assert not report.ok and any(c.dataset == eps[2].name for c in report.corrupt)


def test_append_while_a_dataloader_with_workers_iterates(tmp_path: Path) -> None:
    import torch

    from vlastore.dataset import VLADataset

    eps = episodes((6, 5, 7, 4, 6))
    create(tmp_path / "s.vla", eps[:3])
    store = VLAStore.open(tmp_path / "s.vla", writable=True)
    store.add_family("f", FIXED)
    fill(store)
    ds = VLADataset(tmp_path / "s.vla", features=["f"], n_obs_steps=2, horizon=2)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, num_workers=2, persistent_workers=True, collate_fn=lambda b: b
    )
    first = len(ds)
    seen = []
    for i, batch in enumerate(loader):
        if i == 1:  # another writer appends (and fills) mid-epoch: this epoch is unchanged
            writer = VLAStore.open(tmp_path / "s.vla", writable=True)
            writer.add_episodes(eps[3:])
            fill(writer)
        seen.extend(int(s["index"]) for s in batch)
    assert sorted(seen) == list(range(first)) and len(ds) == first
    ds.refresh()  # between epochs: the new episodes come in, in the main process and in the workers
    assert len(ds) == first + 10 and ds.store.snapshot_id == 3
    names = set()
    for batch in loader:
        for sample in batch:
            names.add(sample["episode"])
            e = ds.store.catalog.index(sample["episode"])
            item = int(sample["step"]) // 2
            assert np.array_equal(np.asarray(sample["f"]), value(ds.store.catalog.names[e], item))
    assert names == {e.name for e in eps}


def test_episode_metadata_is_kept_and_batches_carry_the_task(tmp_path: Path) -> None:
    import torch

    from vlastore.dataset import VLADataset, collate

    eps = episodes((6, 5, 4))
    for e, (task, fps) in zip(eps, [("pick", 10.0), ("place", None), (None, 30.0)], strict=True):
        e.task, e.fps, e.attrs = task, fps, {"scene": e.name[-1]}
    create(tmp_path / "s.vla", eps[:2])
    store = VLAStore.open(tmp_path / "s.vla", writable=True)
    store.add_episodes(eps[2:])
    assert store.tasks == ("pick", "place")
    assert store.episode_info(eps[0].name) == {"task": "pick", "task_index": 0, "fps": 10.0, "attrs": {"scene": "0"}}
    assert store.episode_info(eps[2].name)["task"] is None and store.episode_info(eps[2].name)["fps"] == 30.0
    with pytest.raises(FormatError, match="task differs"):
        store.add_episodes([EpisodeData(eps[0].name, eps[0].series, task="other", fps=10.0, attrs={"scene": "0"})])
    ds = VLADataset(tmp_path / "s.vla", features=[], n_obs_steps=1, horizon=1, batch_task=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=1, collate_fn=collate)
    for batch in loader:
        tasks = [{0: "pick", 1: "place", 2: None}[int(e)] for e in batch["episode_index"]]
        assert batch["task"] == tasks
        assert batch["task_index"].tolist() == [-1 if t is None else ("pick", "place").index(t) for t in tasks]
    assert ds[0]["task"] == "pick"


GC = """
from vlastore.store import VLAStore
store = VLAStore.open({path!r}, writable=True)
print("go", flush=True)
store.gc(retention_s=0, keep=2, compact=True)
"""


@pytest.mark.parametrize("delay", [0.0, 0.3, 0.6])
def test_sigkill_during_gc_leaves_every_kept_commit_whole(tmp_path: Path, delay: float) -> None:
    from vlastore.report import verify_store

    path = tmp_path / "s.vla"
    eps = episodes((3,) * 12)
    create(path, eps[:2])
    store = VLAStore.open(path, writable=True)
    store.add_family("f", FIXED)
    for e in eps[2:]:
        store.add_episodes([e])
        fill(store)
        store.remove_episodes([store.datasets[0]])
    head = store.snapshot_id
    proc = subprocess.Popen([sys.executable, "-c", GC.format(path=str(path))], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"go"
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    now = VLAStore.open(path).snapshot_id
    assert now in (head, head + 1)  # the compaction commit made, or not
    for number in (now - 1, now):  # the two kept commits read whole
        old = VLAStore.open(path, snapshot=number)
        assert old.coverage("f").all() and len(old.series_all("state")) == old.catalog.total_steps
        assert [np.asarray(old.feature("f", n, 0)).tolist() for n in old.datasets] == [
            value(n, 0).tolist() for n in old.datasets
        ]
    assert verify_store(str(path)).ok
    VLAStore.open(path, writable=True).gc(retention_s=0, keep=2, compact=True)  # a rerun finishes
    final = VLAStore.open(path).snapshot_id
    assert [c["commit"] for c in VLAStore.open(path).log()] == [final - 1, final]


def test_small_arrays_written_directly_are_what_zarr_writes_and_reads(tmp_path: Path) -> None:
    import json

    import zarr

    from vlastore.nodes import ZarrNodes
    from vlastore.storage import LocalStorage

    nodes = ZarrNodes.create(LocalStorage(tmp_path / "x"), {})
    rng = np.random.default_rng(0)
    arrays = [
        np.arange(10, dtype=np.int64),
        rng.normal(size=(300_000, 3)).astype(np.float32),
        np.frombuffer("naïve".encode(), np.uint8),
        np.zeros(0, np.int64),
        rng.normal(size=7),
    ]
    for i, a in enumerate(arrays):
        nodes.write_small_array(f"z{i}", a)
        nodes.write_small_fast(f"f{i}", a)
        by_zarr = json.loads((tmp_path / "x" / f"z{i}" / "zarr.json").read_text())
        assert json.loads((tmp_path / "x" / f"f{i}" / "zarr.json").read_text()) == by_zarr
        assert np.array_equal(zarr.open_group(str(tmp_path / "x"), mode="r")[f"f{i}"][...], a)
        assert np.array_equal(nodes.read_small_fast(f"z{i}", by_zarr), a)
    chunk = tmp_path / "x" / "f1" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[5] ^= 1
    chunk.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="crc32c"):
        nodes.read_small_fast("f1", json.loads((tmp_path / "x" / "f1" / "zarr.json").read_text()))


def test_ingest_robot_format_2_keeps_task_and_fps(tmp_path: Path) -> None:
    from ingest_helpers import robot_csvs

    from vlastore.cli import main

    robot_csvs(tmp_path / "csv", {"ep_a": 6, "ep_b": 5})
    out = tmp_path / "s.vla"
    assert (
        main(
            [
                "ingest",
                "robot",
                str(tmp_path / "csv"),
                "--out",
                str(out),
                "--format-version",
                "2",
                "--task",
                "stack the cups",
                "--fps",
                "15",
                "-q",
            ]
        )
        == 0
    )
    store = VLAStore.open(out)
    assert store.format_version == 2 and store.tasks == ("stack the cups",)
    assert store.episode_info("ep_b")["fps"] == 15.0


def test_ingest_lerobot_format_2_keeps_fps_and_tasks(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    from lerobot_helpers import write_lerobot_dataset

    from vlastore.cli import main

    write_lerobot_dataset(tmp_path / "ds", [5, 4], fps=12)
    out = tmp_path / "s.vla"
    assert main(["ingest", "lerobot", str(tmp_path / "ds"), "--out", str(out), "--format-version", "2", "-q"]) == 0
    store = VLAStore.open(out)
    infos = [store.episode_info(n) for n in store.datasets]
    assert all(i["fps"] == 12.0 for i in infos) and all(i["task"] for i in infos) and store.tasks


def test_compact_rewrites_series_as_one_segment_and_reads_the_same(tmp_path: Path) -> None:
    eps = episodes((4, 3, 5, 2, 6))
    create(tmp_path / "s.vla", eps[:1])
    store = VLAStore.open(tmp_path / "s.vla", writable=True)
    for e in eps[1:]:
        store.add_episodes([e])
    store.remove_episodes([eps[2].name])
    before = {k: store.series_all(k).copy() for k in store.series_keys}
    assert store.compact() is not None and store.compact() is None  # once is enough
    assert all(len(s.segments) == 1 for s in store.snapshot.series.values())
    again = VLAStore.open(tmp_path / "s.vla")
    for key, values in before.items():
        assert np.array_equal(again.series_all(key), values)
    result = VLAStore.open(tmp_path / "s.vla", writable=True).gc(retention_s=0)
    assert result["objects"] > 0 and VLAStore.open(tmp_path / "s.vla").datasets == again.datasets


def test_an_empty_living_store_opens_and_takes_appends(tmp_path: Path) -> None:
    """An empty episode list planned one step_start too many: the store it made did not open."""
    create(tmp_path / "s.vla", [])
    store = VLAStore.open(tmp_path / "s.vla", writable=True)
    assert store.datasets == ()
    store.add_episodes([EpisodeData("e0", steps=3)])  # a store made without series takes episodes without them
    assert VLAStore.open(tmp_path / "s.vla").datasets == ("e0",)


def test_a_refused_living_store_writes_nothing(tmp_path: Path) -> None:
    state = np.zeros((4, 3), np.float32)
    state[2, 1] = np.nan
    path = tmp_path / "s.vla"
    with pytest.raises(FormatError, match="is nan"):
        VLAStore.create(path, [EpisodeData("e0", {"state": state})], format_version=2)
    with pytest.raises(FormatError, match="task must be a string"):
        VLAStore.create(path, [EpisodeData("e0", {"state": np.zeros((4, 3), np.float32)}, task=3)], format_version=2)  # type: ignore[arg-type]
    assert not path.exists()


def test_verify_of_a_living_store_names_a_damaged_catalog_commit_and_segment(tmp_path: Path) -> None:
    from vlastore.report import verify_store

    eps = episodes((6, 4, 5))
    store = create(tmp_path / "s.vla", eps[:2])
    store.add_family("f", FIXED)
    fill(store)
    store.add_episodes(eps[2:])
    fill(store)
    root = tmp_path / "s.vla"
    assert verify_store(str(root)).ok
    old = sorted((root / "_log").glob("0*.json"))[0]
    old.write_bytes(old.read_bytes().replace(b'"commit":1', b'"commit":9'))
    segment = store.snapshot.series["state"].segments[0].path
    chunk = next(p for p in (root / segment).rglob("*") if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x40
    chunk.write_bytes(bytes(data))
    catalog = store.snapshot.catalog.path
    (root / catalog / "steps" / "c" / "0").write_bytes(b"garbage")
    report = verify_store(str(root))
    where = [c.where for c in report.corrupt]
    assert catalog in where and segment in where and "_log/00000000000000000001.json" in where
    assert report.coverage["f"][0] > 0  # the families were still checked, with stand-in names


@pytest.mark.parametrize("spec", [FIXED, RAGGED], ids=["fixed", "ragged"])
def test_gc_compacts_only_feature_shards_holding_removed_rows(tmp_path: Path, spec: FamilySpec) -> None:
    path = tmp_path / "s.vla"
    eps = episodes((8, 8, 8, 8, 8, 8))
    create(path, eps)
    store = VLAStore.open(path, writable=True)
    ragged = spec.ragged
    if ragged:
        rows = ragged_rows(eps)
        store.add_family("f", spec, items_per_episode=rows.items, lengths=rows.lengths)
    else:
        store.add_family("f", spec)
    fill(store)
    hole = store.layout("f").rows - 1  # a row never written: it must stay missing
    shard_of_hole = int(store.layout("f").shard_of(np.asarray([hole]))[0])
    (path / store.shard_key("f", shard_of_hole)).unlink()
    store = VLAStore.open(path, writable=True)
    kept_shards = shard_files(path)
    rows = store.layout("f").episode_rows
    coverage = {n: store.coverage("f")[rows[i] : rows[i + 1]] for i, n in enumerate(store.datasets)}
    store.remove_episodes([eps[1].name])
    bytes_before = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and "/values/c/" in str(p))
    store.gc(retention_s=0, compact=True)
    after = VLAStore.open(path)
    assert after.datasets == tuple(e.name for e in eps if e is not eps[1])
    bytes_after = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and "/values/c/" in str(p))
    assert bytes_after < bytes_before  # the removed rows' space came back
    layout = after.layout("f")
    cov = after.coverage("f")
    width = 3 if ragged else 4
    for i, name in enumerate(after.datasets):
        lo, hi = int(layout.episode_rows[i]), int(layout.episode_rows[i + 1])
        assert np.array_equal(cov[lo:hi], coverage[name])  # missing rows stay missing
        for item in np.flatnonzero(cov[lo:hi]).tolist():
            got = np.asarray(after.feature("f", name, item).float())
            assert np.array_equal(got[0] if ragged else got, value(name, item, width))  # rows keep their values
    untouched = {k: v for k, v in shard_files(path).items() if k in kept_shards}
    assert untouched and all(kept_shards[k] == v for k, v in untouched.items())  # kept shards never rewritten
    from vlastore.report import verify_store

    assert not verify_store(str(path)).corrupt  # only the hole is missing
    assert fill(VLAStore.open(path, writable=True)) >= 1  # the hole is still there to fill


def test_a_format_1_store_upgraded_by_another_process_is_not_upgraded_again(tmp_path: Path) -> None:
    """Two appenders opened a format-1 store; the first change upgrades it; the second must not start over
    (an upgrade begins by clearing `_log/`: the first one's commits would be lost)."""
    path = tmp_path / "g.vla"
    shutil.copytree(GOLDEN_V1, path)
    a = VLAStore.open(path, writable=True)
    b = VLAStore.open(path, writable=True)
    names = a.datasets
    a.remove_episodes([names[0]])
    b.remove_episodes([names[1]])  # b still shows format 1: it adopts a's upgrade, then commits on top
    head = VLAStore.open(path)
    assert head.datasets == names[2:]
    assert [e["changes"][0].split()[0] for e in head.log()] == ["upgrade", "remove", "remove"]
