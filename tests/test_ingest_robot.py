"""`vlastore ingest robot`: CSV, NPZ and robomimic HDF5 round trips with column names kept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ingest_helpers import robot_csvs, tree_hashes

from vlastore.cli import main
from vlastore.store import VLAStore

EPISODES = {"episode_20251030_025119": 11, "episode_20251030_031502": 8}


def test_csv_round_trip_keeps_column_names(tmp_path: Path) -> None:
    tables = robot_csvs(tmp_path / "csv", EPISODES)
    before = tree_hashes(tmp_path / "csv")
    out = tmp_path / "s.vla"
    report = tmp_path / "r.json"
    args = [
        "ingest",
        "robot",
        str(tmp_path / "csv"),
        "--out",
        str(out),
        "--series",
        "state=joint_*,gripper",
        "--series",
        "action=action_*",
        "--dtype",
        "float64",
        "-q",
    ]
    assert main([*args, "--verify", "--report-json", str(report)]) == 0
    assert tree_hashes(tmp_path / "csv") == before
    store = VLAStore.open(out)
    assert store.datasets == tuple(EPISODES) and store.catalog.steps.tolist() == list(EPISODES.values())
    assert store.columns("state") == ("joint_0", "joint_1", "joint_2", "gripper")
    assert store.columns("action") == ("action_0", "action_1")
    for name, table in tables.items():
        assert store.series("state", name).tobytes() == table[:, :4].tobytes()  # float64, bit-exact
        assert store.series("action", name).tobytes() == table[:, 4:].tobytes()
    data = json.loads(report.read_text())
    assert data["verify"]["ok"] and any("time_str" in n for n in data["notes"])
    # the same command again: the store already holds exactly this, nothing to do
    assert main(args) == 0
    # other series grouping into the same --out: a usage mistake (exit 2), nothing overwritten
    assert main(["ingest", "robot", str(tmp_path / "csv"), "--out", str(out), "-q"]) == 2
    assert VLAStore.open(out).series_keys == ("action", "state")


def test_float_series_default_to_float32_and_float64_on_request(tmp_path: Path) -> None:
    tables = robot_csvs(tmp_path / "csv", EPISODES)
    for dtype in ("float32", "float64"):
        out = tmp_path / f"{dtype}.vla"
        extra = [] if dtype == "float32" else ["--dtype", "float64"]
        assert main(["ingest", "robot", str(tmp_path / "csv"), "--out", str(out), "--verify", "-q", *extra]) == 0
        store = VLAStore.open(out)
        for name, table in tables.items():
            got = store.series("data", name)
            assert got.dtype == np.dtype(dtype) and np.array_equal(got, table.astype(dtype))


def test_npz_round_trip_and_bad_episodes(tmp_path: Path) -> None:
    folder = tmp_path / "npz"
    folder.mkdir()
    rng = np.random.default_rng(1)
    good = {}
    for name, steps in EPISODES.items():
        arrays = {
            "joint_0": rng.normal(size=steps).astype(np.float32),
            "gripper": rng.normal(size=steps).astype(np.float32),
            "action": rng.normal(size=(steps, 3)).astype(np.float32),
        }
        np.savez(folder / f"{name}.npz", **arrays)
        good[name] = arrays
    np.savez(
        folder / "nan_episode.npz",
        joint_0=np.array([1.0, np.nan], np.float32),
        gripper=np.zeros(2, np.float32),
        action=np.zeros((2, 3), np.float32),
    )
    np.savez(folder / "other_columns.npz", x=np.zeros(4, np.float32))
    (folder / "broken.npz").write_bytes(b"not an npz")
    report = tmp_path / "r.json"
    assert (
        main(
            [
                "ingest",
                "robot",
                str(folder),
                "--out",
                str(tmp_path / "s.vla"),
                "--series",
                "state=*",
                "--verify",
                "-q",
                "--report-json",
                str(report),
            ]
        )
        == 0
    )
    store = VLAStore.open(tmp_path / "s.vla")
    assert store.datasets == tuple(sorted(EPISODES))
    assert store.columns("state") == ("joint_0", "gripper")
    for name, arrays in good.items():
        assert np.array_equal(store.series("action", name), arrays["action"])
        assert np.array_equal(store.series("state", name)[:, 1], arrays["gripper"])
    reasons = sorted((Path(p["path"]).name, p["reason"]) for p in json.loads(report.read_text())["problems"])
    assert reasons == [
        ("broken.npz", "bad-series"),
        ("nan_episode.npz", "nonfinite"),
        ("other_columns.npz", "bad-series"),
    ]


def test_robomimic_hdf5_round_trip(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py", reason="pip install vlastore[hdf5]")
    path = tmp_path / "demo.hdf5"
    rng = np.random.default_rng(2)
    expected = {}
    with h5py.File(path, "w") as f:
        for n, steps in [(10, 6), (2, 5), (0, 7)]:
            g = f.create_group(f"data/demo_{n}")
            arrays = {
                "actions": rng.normal(size=(steps, 7)),
                "states": rng.normal(size=(steps, 32)),
                "obs.eef_pos": rng.normal(size=(steps, 3)).astype(np.float32),
            }
            g["actions"], g["states"] = arrays["actions"], arrays["states"]
            g["obs/eef_pos"] = arrays["obs.eef_pos"]
            g["obs/agentview_image"] = np.zeros((steps, 8, 8, 3), np.uint8)
            expected[f"demo_{n}"] = arrays
    before = tree_hashes(tmp_path)
    out = tmp_path / "s.vla"
    assert main(["ingest", "robot", str(path), "--out", str(out), "--verify", "--dtype", "float64", "-q"]) == 0
    assert {k: v for k, v in tree_hashes(tmp_path).items() if "s.vla" not in k} == before
    store = VLAStore.open(out)
    assert store.datasets == ("demo_0", "demo_2", "demo_10")
    assert store.columns("obs.eef_pos") == ("obs.eef_pos_0", "obs.eef_pos_1", "obs.eef_pos_2")
    assert "obs.agentview_image" not in store.series_keys
    for name, arrays in expected.items():
        for key, arr in arrays.items():  # --dtype float64: float32 sources widened, exactly
            assert store.series(key, name).tobytes() == arr.astype(np.float64).tobytes()


def test_robot_dry_run_writes_nothing(tmp_path: Path) -> None:
    robot_csvs(tmp_path / "csv", EPISODES)
    before = tree_hashes(tmp_path)
    assert main(["ingest", "robot", str(tmp_path / "csv"), "--out", str(tmp_path / "s.vla"), "--dry-run", "-q"]) == 0
    assert tree_hashes(tmp_path) == before


def test_integer_columns_become_float32_only_when_exact(tmp_path: Path) -> None:
    folder = tmp_path / "npz"
    folder.mkdir()
    for name in ("ep_a", "ep_b"):
        np.savez(
            folder / f"{name}.npz",
            small=np.arange(4, dtype=np.int64),
            frame=np.arange(4, dtype=np.int64) + (1 << 30) + 1,
        )  # 2**30 + 1 rounds in float32
    assert (
        main(
            [
                "ingest",
                "robot",
                str(folder),
                "--out",
                str(tmp_path / "s.vla"),
                "--series",
                "small=small",
                "--series",
                "frame=frame",
                "--verify",
                "-q",
            ]
        )
        == 0
    )
    store = VLAStore.open(tmp_path / "s.vla")
    assert store.series("small", "ep_a").dtype == np.float32
    assert store.series("frame", "ep_b").dtype == np.float64
    assert store.series("frame", "ep_b")[:, 0].tolist() == [(1 << 30) + 1 + i for i in range(4)]


def _timed_csvs(folder: Path, steps: dict[str, int], fps: float, column: str = "timestamp") -> dict[str, np.ndarray]:
    """CSV episodes with a per-step time column (seconds, recorded at ``fps`` from an odd start) and 3 values."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    tables = {}
    for n, (name, length) in enumerate(steps.items()):
        times = 1_700_000_000.123 + n * 100 + np.arange(length) / fps  # wall-clock seconds: float32 would round
        table = np.column_stack([times, rng.normal(size=(length, 3))])
        lines = [f"{column},joint_0,joint_1,act_0"] + [",".join(repr(float(v)) for v in row) for row in table]
        (folder / f"{name}.csv").write_text("\n".join(lines) + "\n")
        tables[name] = table
    return tables


@pytest.mark.parametrize(
    "series",
    [[], ["--series", "state=*"], ["--series", "state=joint_*", "--series", "action=act_*"]],
    ids=["no patterns", "wildcard", "patterns"],
)
def test_a_timestamp_column_is_kept_exactly_as_the_timestamp_series(tmp_path: Path, series: list[str]) -> None:
    tables = _timed_csvs(tmp_path / "csv", {"ep_a": 9, "ep_b": 6}, fps=10.0, column="Timestamp")
    out = tmp_path / "s.vla"
    assert main(["ingest", "robot", str(tmp_path / "csv"), "--out", str(out), "--verify", "-q", *series]) == 0
    store = VLAStore.open(out)
    assert "timestamp" in store.series_keys and store.columns("timestamp") == ("Timestamp",)
    for key in store.series_keys:
        if key != "timestamp":  # never mixed into the data, whatever the patterns
            assert "Timestamp" not in store.columns(key)
    for name, table in tables.items():
        stored = store.series("timestamp", name)
        assert stored.dtype == np.float64 and stored[:, 0].tobytes() == table[:, 0].tobytes()


def test_a_pattern_naming_the_time_column_exactly_puts_it_where_asked(tmp_path: Path) -> None:
    _timed_csvs(tmp_path / "csv", {"ep_a": 5}, fps=10.0)
    out = tmp_path / "s.vla"
    args = ["--series", "clock=timestamp", "--series", "state=joint_*"]
    assert main(["ingest", "robot", str(tmp_path / "csv"), "--out", str(out), "-q", *args]) == 0
    store = VLAStore.open(out)
    assert set(store.series_keys) == {"clock", "state"} and store.columns("clock") == ("timestamp",)


def test_delta_timestamps_use_the_recorded_fps_or_the_timestamp_series(tmp_path: Path) -> None:
    from vlastore.dataset import VLADataset

    steps = {"ep_a": 12, "ep_b": 7}
    _timed_csvs(tmp_path / "csv", steps, fps=10.0)
    series = ["--series", "state=joint_*", "--series", "action=act_*", "--format-version", "2", "-q"]
    with_fps, without = tmp_path / "fps.vla", tmp_path / "times.vla"
    assert main(["ingest", "robot", str(tmp_path / "csv"), "--out", str(with_fps), "--fps", "10", *series]) == 0
    assert main(["ingest", "robot", str(tmp_path / "csv"), "--out", str(without), *series]) == 0
    seconds = {"state": [-0.2, -0.1, 0.0], "action": [0.0, 0.1, 0.3]}
    kw = {"features": [], "obs_keys": (), "action_keys": ()}

    def samples(ds: VLADataset) -> list[dict]:
        return [ds[i] for i in range(len(ds))]

    explicit = samples(VLADataset(with_fps, delta_timestamps=seconds, fps=10, **kw))
    for implicit in (
        samples(VLADataset(with_fps, delta_timestamps=seconds, **kw)),  # the fps each episode recorded
        samples(VLADataset(without, delta_timestamps=seconds, **kw)),  # the timestamp series
    ):
        assert len(implicit) == len(explicit) == sum(steps.values())
        for got, want in zip(implicit, explicit):
            for key in ("state", "action", "state_is_pad", "action_is_pad"):
                assert torch.equal(got[key], want[key]), key


def test_per_episode_task_fps_and_attributes_are_kept(tmp_path: Path) -> None:
    """A task column and ``<episode>.json`` give each episode its own metadata; --task/--fps fill the rest."""
    src = tmp_path / "csv"
    _timed_csvs(src, {"ep_a": 4, "ep_b": 3, "ep_c": 3}, fps=10.0)
    # ep_a: a text task column (changing once); ep_b: a sidecar; ep_c: neither (the command's --task/--fps)
    lines = (src / "ep_a.csv").read_text().splitlines()
    tasks = ["pick the cup", "pick the cup", "place it", "place it"]
    rows = [lines[0] + ",instruction"] + [f"{line},{t}" for line, t in zip(lines[1:], tasks)]
    (src / "ep_a.csv").write_text("\n".join(rows) + "\n")
    (src / "ep_b.json").write_text(json.dumps({"task": "open the drawer", "fps": 15, "operator": "kim", "ok": True}))
    out = tmp_path / "s.vla"
    args = ["--format-version", "2", "--task", "default task", "--fps", "30", "-q"]
    report = tmp_path / "r.json"
    assert main(["ingest", "robot", str(src), "--out", str(out), "--report-json", str(report), *args]) == 0
    assert not any("instruction" in n for n in json.loads(report.read_text())["notes"])  # kept, not 'not stored'
    store = VLAStore.open(out)
    a, b, c = (store.episode_info(n) for n in ("ep_a", "ep_b", "ep_c"))
    assert a["task"] == "pick the cup" and a["attrs"] == {"tasks": ["pick the cup", "place it"]} and a["fps"] == 30
    assert (b["task"], b["fps"], b["attrs"]) == ("open the drawer", 15.0, {"operator": "kim", "ok": True})
    assert (c["task"], c["fps"], c["attrs"]) == ("default task", 30.0, {})
    assert "instruction" not in store.columns("data")


@pytest.mark.parametrize(
    "sidecar",
    ["{not json", "[1, 2]", '{"task": 3}', '{"fps": -1}', '{"fps": "fast"}', '{"fps": true}'],
)
def test_a_bad_episode_json_skips_that_episode_with_a_reason(tmp_path: Path, sidecar: str) -> None:
    src = tmp_path / "csv"
    _timed_csvs(src, {"ep_a": 4, "ep_b": 3}, fps=10.0)
    (src / "ep_b.json").write_text(sidecar)
    out, report = tmp_path / "s.vla", tmp_path / "r.json"
    assert main(["ingest", "robot", str(src), "--out", str(out), "--report-json", str(report), "-q"]) == 0
    assert VLAStore.open(out).datasets == ("ep_a",)
    problems = json.loads(report.read_text())["problems"]
    assert [p["reason"] for p in problems] == ["bad-metadata"] and "ep_b.json" in problems[0]["message"]
    assert main(["ingest", "robot", str(src), "--out", str(tmp_path / "t.vla"), "--strict", "-q"]) == 1


def test_an_episode_json_that_is_not_a_regular_file_is_never_opened(tmp_path: Path) -> None:
    import os

    src = tmp_path / "csv"
    _timed_csvs(src, {"ep_a": 4, "ep_b": 3}, fps=10.0)
    os.mkfifo(src / "ep_b.json")  # opening a FIFO for reading would block the run forever
    out, report = tmp_path / "s.vla", tmp_path / "r.json"
    assert main(["ingest", "robot", str(src), "--out", str(out), "--report-json", str(report), "-q"]) == 0
    assert VLAStore.open(out).datasets == ("ep_a",)
    assert [p["reason"] for p in json.loads(report.read_text())["problems"]] == ["not-a-regular-file"]


def test_an_npz_task_array_is_the_episodes_task(tmp_path: Path) -> None:
    src = tmp_path / "npz"
    src.mkdir()
    state = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.savez(src / "ep_a.npz", state=state, task=np.array("stack the blocks"))
    np.savez(src / "ep_b.npz", state=state + 1)
    out = tmp_path / "s.vla"
    assert main(["ingest", "robot", str(src), "--out", str(out), "--format-version", "2", "-q"]) == 0
    store = VLAStore.open(out)
    assert store.episode_info("ep_a")["task"] == "stack the blocks" and store.episode_info("ep_b")["task"] is None
    assert store.series("state", "ep_b").tolist() == (state + 1).tolist()


@pytest.mark.parametrize("fps", ["-5", "0", "nan", "inf"])
def test_an_unusable_fps_is_a_usage_mistake_and_writes_nothing(tmp_path: Path, fps: str) -> None:
    _timed_csvs(tmp_path / "csv", {"ep_a": 4}, fps=10.0)
    out = tmp_path / "s.vla"
    assert main(["ingest", "robot", str(tmp_path / "csv"), "--out", str(out), "--fps", fps, "-q"]) == 2
    assert not out.exists()


@pytest.mark.parametrize("fps", [-1.0, 0, float("nan"), True, "30"])
def test_the_api_refuses_an_unusable_fps(tmp_path: Path, fps: object) -> None:
    from vlastore.format import FormatError
    from vlastore.store import EpisodeData

    episode = EpisodeData("ep", {"state": np.zeros((3, 2), np.float32)}, fps=fps)  # type: ignore[arg-type]
    with pytest.raises(FormatError, match="fps"):
        VLAStore.create(tmp_path / "s.vla", [episode], format_version=2)
    store = VLAStore.create(
        tmp_path / "t.vla", [EpisodeData("a", {"state": np.zeros((3, 2), np.float32)})], format_version=2
    )
    with pytest.raises(FormatError, match="fps"):
        store.add_episodes([episode])
    assert VLAStore.open(tmp_path / "t.vla").datasets == ("a",)
