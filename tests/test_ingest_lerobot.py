"""`vlastore ingest lerobot`: LeRobot v3.0 datasets (one written by lerobot itself, others by pyarrow as the
format documents) become a catalog + series whose VLADataset samples hold what the LeRobot files say."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow", reason="pip install vlastore[lerobot]")
import pyarrow.parquet as pq  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from ingest_helpers import tree_hashes  # noqa: E402
from lerobot_helpers import TASKS, write_lerobot_dataset  # noqa: E402

from vlastore.cli import main  # noqa: E402
from vlastore.dataset import VLADataset  # noqa: E402
from vlastore.ingest.lerobot import (  # noqa: E402
    LeRobotFormatError,
    read_lerobot,
    series_key_for,
)
from vlastore.store import VLAStore  # noqa: E402

REAL = Path(__file__).resolve().parent / "data" / "lerobot-v3-real"
"""Written by lerobot 0.4.4 itself (tools/make_lerobot_fixture.py): 4 episodes over 4 data files in 2 chunks,
one AV1 video holding all episodes one after the other."""


def _copy_real(tmp_path: Path) -> Path:
    root = tmp_path / "real"
    shutil.copytree(REAL, root)
    return root


def _windows(
    store: Path,
    points: list[tuple[int, int]],
    state: list[np.ndarray],
    action: list[np.ndarray],
    n_obs: int = 3,
    horizon: int = 4,
) -> None:
    """VLADataset samples at (episode, frame) points hold the LeRobot frames, edge-padded like LeRobot's."""
    ds = VLADataset(
        store, features=[], obs_keys=("observation.state",), action_keys=("action",), n_obs_steps=n_obs, horizon=horizon
    )
    starts = np.concatenate([[0], np.cumsum([len(s) for s in state])])
    for episode, frame in points:
        sample = ds[int(starts[episode] + frame)]
        n = len(state[episode])
        obs = [min(max(frame + d, 0), n - 1) for d in range(-n_obs + 1, 1)]
        act = [min(max(frame + d, 0), n - 1) for d in range(horizon)]
        assert sample["episode"] == f"episode_{episode:06d}" and sample["step"] == frame
        np.testing.assert_array_equal(sample["observation.state"].numpy(), state[episode][obs])
        np.testing.assert_array_equal(sample["action"].numpy(), action[episode][act])
        assert sample["observation.state_is_pad"].tolist() == [not 0 <= frame + d < n for d in range(-n_obs + 1, 1)]
        assert sample["action_is_pad"].tolist() == [not 0 <= frame + d < n for d in range(horizon)]


def test_dataset_written_by_lerobot_itself(tmp_path: Path) -> None:
    root = _copy_real(tmp_path)
    truth = json.loads((REAL.parent / "lerobot-v3-real.truth.json").read_text())
    before = tree_hashes(root)
    out, meta = tmp_path / "s.vla", tmp_path / "meta.json"
    args = ["ingest", "lerobot", str(root), "--out", str(out), "-q"]
    assert main([*args, "--verify", "--metadata-json", str(meta)]) == 0
    assert tree_hashes(root) == before  # the dataset is only read
    store = VLAStore.open(out)
    lengths = [len(e) for e in truth["episodes"]]
    assert store.datasets == tuple(f"episode_{i:06d}" for i in range(4))
    assert store.catalog.steps.tolist() == lengths
    assert set(store.series_keys) == {"observation.state", "action", "next.reward", "timestamp", "task_index"}
    assert store.columns("observation.state") == tuple(f"joint_{i}" for i in range(6))
    assert store.columns("action") == tuple(f"m{i}" for i in range(6))  # names given as {"motors": [...]}
    state = [np.array([f["state"] for f in ep], np.float32) for ep in truth["episodes"]]
    action = [np.array([f["action"] for f in ep], np.float32) for ep in truth["episodes"]]
    tasks = json.loads(meta.read_text())["tasks"]
    for i, name in enumerate(store.datasets):
        assert store.series("observation.state", name).tobytes() == state[i].tobytes()  # float32, bit-exact
        # lerobot writes frame_index / fps as float32
        expected = (np.arange(lengths[i]) / 10).astype(np.float32)
        assert store.series("timestamp", name)[:, 0].tobytes() == expected.tobytes()
        step_tasks = [tasks[str(int(t))] for t in store.series("task_index", name)[:, 0]]
        assert step_tasks == [f["task"] for f in truth["episodes"][i]]
    _windows(out, [(0, 0), (0, 4), (1, 4), (2, 3), (3, 5)], state, action)
    saved = json.loads(meta.read_text())
    assert saved["fps"] == 10 and saved["robot_type"] == "so100"
    assert saved["episodes"]["episode_000002"]["tasks"] == ["pick the cup", "place the cup"]
    video = saved["episodes"]["episode_000001"]["videos"]["observation.images.front"]
    assert video["path"] == "videos/observation.images.front/chunk-000/file-000.mp4"
    assert video["from_timestamp"] == pytest.approx(0.9) and video["to_timestamp"] == pytest.approx(1.4)
    # the same command again: the store already holds exactly this
    assert main(args) == 0


@pytest.mark.parametrize(
    ("list_type", "row_group_rows", "episodes_per_file"), [("fixed", None, 2), ("list", 4, 3), ("fixed", 1, 1)]
)
def test_pyarrow_written_dataset_matches_what_the_files_say(
    tmp_path: Path, list_type: str, row_group_rows: int | None, episodes_per_file: int
) -> None:
    lengths = [6, 9, 4, 7, 5]
    written = write_lerobot_dataset(
        tmp_path / "ds",
        lengths,
        episodes_per_file=episodes_per_file,
        row_group_rows=row_group_rows,
        list_type=list_type,
        cameras=("observation.images.top",),
    )
    imported = read_lerobot(tmp_path / "ds")
    assert not imported.problems
    assert [e.name for e in imported.episodes] == [f"episode_{i:06d}" for i in range(5)]
    assert imported.fps == 10 and imported.tasks == dict(enumerate(TASKS))
    assert imported.columns["observation.state"] == [f"joint_{i}" for i in range(4)]
    assert imported.columns["action"] == [f"motor_{i}" for i in range(3)]
    assert imported.columns["next.reward"] == ["next.reward"]
    assert imported.episode_tasks["episode_000001"] == sorted({TASKS[1], TASKS[2]})
    assert imported.step_tasks("episode_000001") == [TASKS[t] for t in written.task_index[1]]
    segments = imported.videos["observation.images.top"]
    assert segments["episode_000002"].from_timestamp == pytest.approx(15 / 10)
    for i, episode in enumerate(imported.episodes):
        assert episode.series["observation.state"].tobytes() == written.state[i].tobytes()
        assert episode.series["next.reward"][:, 0].tobytes() == written.reward[i].tobytes()
        np.testing.assert_array_equal(
            imported.timestamps[episode.name], np.arange(lengths[i], dtype=np.float32) / np.float32(10)
        )
    out = tmp_path / "s.vla"
    assert main(["ingest", "lerobot", str(tmp_path / "ds"), "--out", str(out), "--verify", "-q"]) == 0
    _windows(out, [(0, 0), (1, 8), (2, 1), (3, 3), (4, 4)], written.state, written.action)


def test_episodes_span_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files are read a few rows at a time; an episode cut by batch and row-group borders is still whole."""
    import vlastore.ingest.lerobot.data as data

    monkeypatch.setattr(data, "BATCH_ROWS", 3)
    written = write_lerobot_dataset(tmp_path / "ds", [8, 5, 11], episodes_per_file=3, row_group_rows=4)
    imported = read_lerobot(tmp_path / "ds")
    assert not imported.problems
    for i, episode in enumerate(imported.episodes):
        assert episode.series["action"].tobytes() == written.action[i].tobytes()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=6),
    per_file=st.integers(1, 4),
    group=st.one_of(st.none(), st.integers(1, 7)),
    list_type=st.sampled_from(["fixed", "list"]),
    seed=st.integers(0, 2**16),
)
def test_property_every_frame_lands_in_its_episode(
    tmp_path_factory: pytest.TempPathFactory,
    lengths: list[int],
    per_file: int,
    group: int | None,
    list_type: str,
    seed: int,
) -> None:
    root = tmp_path_factory.mktemp("ds")
    written = write_lerobot_dataset(
        root, lengths, episodes_per_file=per_file, row_group_rows=group, list_type=list_type, seed=seed
    )
    imported = read_lerobot(root)
    assert not imported.problems
    assert [e.step_count() for e in imported.episodes] == lengths
    for i, episode in enumerate(imported.episodes):
        assert episode.series["observation.state"].tobytes() == written.state[i].tobytes()
        assert episode.series["action"].tobytes() == written.action[i].tobytes()
        np.testing.assert_array_equal(imported.task_index[episode.name], written.task_index[i])


def test_optional_dataset_written_by_the_lerobot_package(tmp_path: Path) -> None:
    """Where lerobot (>= 0.4, format v3.0) is installed, a dataset it writes now imports the same way."""
    lerobot_dataset = pytest.importorskip(
        "lerobot.datasets.lerobot_dataset", reason="pip install lerobot (needs a torch it accepts)"
    )
    features = {
        "observation.state": {"dtype": "float32", "shape": (3,), "names": ["a", "b", "c"]},
        "action": {"dtype": "float32", "shape": (2,), "names": None},
    }
    ds = lerobot_dataset.LeRobotDataset.create(
        "local/t", fps=5, features=features, root=tmp_path / "ds", use_videos=False
    )
    rng = np.random.default_rng(0)
    frames = []
    for n in (4, 6):
        for _ in range(n):
            frame = {
                "observation.state": rng.normal(size=3).astype(np.float32),
                "action": rng.normal(size=2).astype(np.float32),
            }
            frames.append(frame["observation.state"])
            ds.add_frame({**frame, "task": "t"})
        ds.save_episode()
    ds.finalize()
    imported = read_lerobot(tmp_path / "ds")
    assert not imported.problems and [e.step_count() for e in imported.episodes] == [4, 6]
    got = np.concatenate([e.series["observation.state"] for e in imported.episodes])
    assert got.tobytes() == np.stack(frames).tobytes()


# ------------------------------------------------------------------ bad input


def _ingest(root: Path, out: Path, *extra: str) -> int:
    return main(["ingest", "lerobot", str(root), "--out", str(out), "-q", *extra])


def _report(tmp_path: Path, root: Path, *extra: str) -> tuple[int, dict]:
    path = tmp_path / "report.json"
    code = main(
        ["ingest", "lerobot", str(root), "--out", str(tmp_path / "s.vla"), "-q", "--report-json", str(path), *extra]
    )
    return code, json.loads(path.read_text()) if path.exists() else {}


def test_usage_mistakes_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _ingest(tmp_path / "nowhere", tmp_path / "s.vla") == 2
    assert "not a folder" in capsys.readouterr().err
    write_lerobot_dataset(tmp_path / "ds", [3, 4])
    for pattern in ("episode", "ep {episode_index}", "{episode_index}_{other}"):
        assert _ingest(tmp_path / "ds", tmp_path / "s.vla", "--name-pattern", pattern) == 2
        assert "--name-pattern" in capsys.readouterr().err
    assert not (tmp_path / "s.vla").exists()
    assert _ingest(tmp_path / "ds", tmp_path / "s.vla", "--name-pattern", "pick_{episode_index}") == 0
    assert VLAStore.open(tmp_path / "s.vla").datasets == ("pick_0", "pick_1")


@pytest.mark.parametrize(
    "damage", ["no-info", "v2.1", "not-json", "no-tasks", "no-episodes", "bad-fps", "escaping-path"]
)
def test_not_a_usable_dataset_exits_1_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    root = tmp_path / "ds"
    write_lerobot_dataset(root, [3, 4])
    info_path = root / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    expected = {
        "no-info": "meta/info.json: missing",
        "v2.1": "convert_dataset_v21_to_v30",
        "not-json": "not valid JSON",
        "no-tasks": "tasks.parquet: missing",
        "no-episodes": "meta/episodes",
        "bad-fps": "fps is",
        "escaping-path": "leaves the dataset folder",
    }[damage]
    if damage == "no-info":
        info_path.unlink()
    elif damage == "not-json":
        info_path.write_text("{")
    elif damage == "no-tasks":
        (root / "meta" / "tasks.parquet").unlink()
    elif damage == "no-episodes":
        shutil.rmtree(root / "meta" / "episodes")
    else:
        info.update(
            {
                "v2.1": {"codebase_version": "v2.1"},
                "bad-fps": {"fps": 0},
                "escaping-path": {"data_path": "../../{chunk_index}/{file_index}.parquet"},
            }[damage]
        )
        info_path.write_text(json.dumps(info))
    assert _ingest(root, tmp_path / "s.vla") == 1
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "s.vla").exists()


def _damage_data_file(root: Path, how: str) -> None:
    path = root / "data" / "chunk-000" / "file-001.parquet"  # episodes 2 and 3
    if how == "not-parquet":
        path.write_bytes(b"PAR1 this is not a parquet file at all")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:-40])
    elif how == "fifo":
        path.unlink()
        os.mkfifo(path)
    elif how == "missing":
        path.unlink()
    elif how == "missing-column":
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(["action"]), path)
    elif how == "extra-row":  # one frame more than meta/episodes says
        table = pq.read_table(path)
        pq.write_table(pa.concat_tables([table.slice(0, 1), table]), path)
    elif how == "wrong-index":  # offsets that disagree with dataset_from_index
        table = pq.read_table(path)
        column = table.column_names.index("index")
        pq.write_table(table.set_column(column, "index", pa.compute.add(table.column("index"), 1)), path)
    elif how == "shuffled":  # rows of two episodes interleaved
        table = pq.read_table(path)
        order = list(range(len(table)))
        order[0], order[-1] = order[-1], order[0]
        pq.write_table(table.take(order), path)
    elif how == "wrong-width":
        table = pq.read_table(path)
        column = table.column_names.index("action")
        short = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(len(table) * 2, np.float32)), 2)
        pq.write_table(table.set_column(column, "action", short), path)
    elif how == "nonfinite":
        table = pq.read_table(path)
        column = table.column_names.index("next.reward")
        values = table.column("next.reward").to_numpy().copy()
        values[1] = np.nan
        pq.write_table(table.set_column(column, "next.reward", pa.array(values)), path)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("not-parquet", "corrupt"),
        ("truncated", "corrupt"),
        ("fifo", "unreadable"),
        ("missing", "unreadable"),
        ("missing-column", "bad-series"),
        ("extra-row", "bad-series"),
        ("wrong-index", "bad-series"),
        ("shuffled", "bad-series"),
        ("wrong-width", "bad-series"),
        ("nonfinite", "nonfinite"),
    ],
)
def test_bad_data_file_skips_its_episodes_with_a_reason(tmp_path: Path, how: str, reason: str) -> None:
    root = tmp_path / "ds"
    written = write_lerobot_dataset(root, [3, 4, 5, 6, 2], episodes_per_file=2)
    _damage_data_file(root, how)
    code, report = _report(tmp_path, root)
    assert code == 0
    problems = report["problems"]
    assert {p["reason"] for p in problems} == {reason}, problems
    assert all(p["path"] == "data/chunk-000/file-001.parquet" for p in problems)
    store = VLAStore.open(tmp_path / "s.vla")
    skipped = {"shuffled", "nonfinite", "extra-row"}  # may hit one episode or both, but never the other files
    assert set(store.datasets) >= {"episode_000000", "episode_000001", "episode_000004"}
    if how not in skipped:
        assert store.datasets == ("episode_000000", "episode_000001", "episode_000004")
    for name in store.datasets:
        i = int(name[-1])
        assert store.series("action", name).tobytes() == written.action[i].tobytes()
    # --strict: the same problems are fatal and nothing is written
    shutil.rmtree(tmp_path / "s.vla")
    assert _ingest(root, tmp_path / "s.vla", "--strict") == 1
    assert not (tmp_path / "s.vla").exists()


def test_nonfinite_kept_on_request(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write_lerobot_dataset(root, [3, 4, 5, 6], episodes_per_file=2)
    _damage_data_file(root, "nonfinite")
    assert _ingest(root, tmp_path / "s.vla", "--allow-nonfinite") == 0
    assert np.isnan(VLAStore.open(tmp_path / "s.vla").series("next.reward", "episode_000002")).any()


def test_bad_episodes_table_rows_are_skipped(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write_lerobot_dataset(root, [3, 4, 5])
    path = root / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    table = pq.read_table(path)
    lengths = table.column("length").to_numpy().copy()
    lengths[1] = 99  # disagrees with dataset_from_index .. dataset_to_index
    table = table.set_column(table.column_names.index("length"), "length", pa.array(lengths))
    pq.write_table(table, path)
    (root / "meta" / "episodes" / "chunk-000" / "file-001.parquet").write_bytes(b"garbage")
    code, report = _report(tmp_path, root)
    assert code == 0
    assert sorted(p["reason"] for p in report["problems"]) == ["bad-series", "corrupt"]
    assert VLAStore.open(tmp_path / "s.vla").datasets == ("episode_000000", "episode_000002")


def test_nothing_usable_exits_1(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write_lerobot_dataset(root, [3, 4], episodes_per_file=2)
    (root / "data" / "chunk-000" / "file-000.parquet").write_bytes(b"nope")
    code, report = _report(tmp_path, root)
    assert code == 1 and report["problems"][0]["reason"] == "corrupt"
    assert not (tmp_path / "s.vla").exists()


def test_feature_keys_that_are_not_store_names(tmp_path: Path) -> None:
    assert series_key_for("observation.state") == "observation.state"
    assert series_key_for("observation/images top") == "observation_images_top"
    assert series_key_for("a..b") == "a.b"
    root = tmp_path / "ds"
    write_lerobot_dataset(root, [3, 4])
    info_path = root / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    info["features"]["next reward"] = info["features"].pop("next.reward")
    info_path.write_text(json.dumps(info))
    for path in (root / "data").rglob("*.parquet"):
        table = pq.read_table(path)
        pq.write_table(
            table.rename_columns(["next reward" if c == "next.reward" else c for c in table.column_names]), path
        )
    imported = read_lerobot(root)
    assert imported.series_keys["next reward"] == "next_reward" and "next_reward" in imported.columns
    info["features"]["next_reward"] = info["features"]["next reward"]
    info_path.write_text(json.dumps(info))
    with pytest.raises(LeRobotFormatError, match="map to the series key"):
        read_lerobot(root)


def test_dry_run_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_lerobot_dataset(tmp_path / "ds", [3, 4])
    assert _ingest(tmp_path / "ds", tmp_path / "s.vla", "--dry-run", "--metadata-json", str(tmp_path / "m.json")) == 0
    assert not (tmp_path / "s.vla").exists() and not (tmp_path / "m.json").exists()
    assert "DRY RUN" in capsys.readouterr().out


def test_without_pyarrow_the_error_says_what_to_install(tmp_path: Path) -> None:
    import subprocess
    import sys

    write_lerobot_dataset(tmp_path / "ds", [3])
    code = "import sys; sys.modules['pyarrow'] = None; from vlastore.cli import main; sys.exit(main(sys.argv[1:]))"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", code, "ingest", "lerobot", str(tmp_path / "ds"), "--out", str(tmp_path / "s.vla"), "-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 1 and "pip install 'vlastore[lerobot]'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
