"""build-features from a LeRobot dataset's videos: frames decoded with PyAV at from_timestamp + step / fps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pyarrow", reason="pip install vlastore[lerobot]")
pytest.importorskip("av", reason="pip install vlastore[video]")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: lerobot_helpers
from lerobot_helpers import TASKS, Written, write_lerobot_dataset  # noqa: E402
from PIL import Image  # noqa: E402

from vlastore.cli import main  # noqa: E402
from vlastore.features import Item, build_features  # noqa: E402
from vlastore.features.video import LeRobotVideoSource, VideoDecodeError  # noqa: E402
from vlastore.store import VLAStore  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
REAL = ROOT / "tests" / "data" / "lerobot-v3-real"
CAMERAS = ("observation.images.top", "observation.images.wrist")
LENGTHS = [7, 5, 9]


@pytest.fixture(scope="module")
def lossless(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Written]:
    """Two cameras in lossless H.264 (libx264rgb, qp 0): decoded frames must equal the encoded ones."""
    root = tmp_path_factory.mktemp("lerobot") / "ds"
    written = write_lerobot_dataset(root, LENGTHS, cameras=CAMERAS, codec="libx264rgb")
    store = root.parent / "store.vla"
    assert main(["ingest", "lerobot", str(root), "--out", str(store), "-q"]) == 0
    return root, written


def _requests() -> list[tuple[int, int]]:
    """(episode, step) in an order that decodes forward, goes back, and jumps between episodes."""
    forward = [(e, s) for e, n in enumerate(LENGTHS) for s in range(0, n, 2)]
    return forward + [(2, 8), (0, 0), (1, 4), (1, 0), (2, 3), (0, 6)]


def test_lossless_frames_are_the_encoded_frames(lossless: tuple[Path, Written]) -> None:
    root, written = lossless
    source = LeRobotVideoSource(root)
    assert source.video_cameras == CAMERAS  # info.json's order
    for episode, step in _requests():
        item = source.item(f"episode_{episode:06d}", step // 3, step)
        assert item.timestamps[0] == pytest.approx(sum(LENGTHS[:episode]) / 10 + step / 10)
        images = item.load_images()
        for camera, image in zip(CAMERAS, images, strict=True):
            np.testing.assert_array_equal(np.asarray(image), written.frames[camera][episode][step])


def test_lossy_av1_frames_match_within_tolerance(tmp_path: Path) -> None:
    """LeRobot's default codec (AV1, yuv420p): the right frame, close to what was encoded."""
    written = write_lerobot_dataset(tmp_path / "ds", LENGTHS, cameras=CAMERAS[:1], codec="libsvtav1")
    source = LeRobotVideoSource(tmp_path / "ds", cameras=CAMERAS[:1])
    frames = written.frames[CAMERAS[0]]
    for episode, step in _requests():
        got = np.asarray(source.item(f"episode_{episode:06d}", 0, step).load_images()[0]).astype(int)
        error = np.abs(got - frames[episode][step]).mean()
        assert error < 4, (episode, step, error)
        # the neighbouring frames differ by more than the codec's error: it is this frame, not the next
        for other in (step - 1, step + 1):
            if 0 <= other < LENGTHS[episode]:
                assert np.abs(got - frames[episode][other]).mean() > error


def test_frames_of_the_dataset_written_by_lerobot() -> None:
    truth = json.loads((REAL.parent / "lerobot-v3-real.truth.json").read_text())
    source = LeRobotVideoSource(REAL)
    for episode, frames in enumerate(truth["episodes"]):
        for step in range(len(frames)):
            item = source.item(f"episode_{episode:06d}", step // 3, step)
            assert item.instruction == frames[step]["task"]
            got = np.asarray(item.load_images()[0]).reshape(-1, 3).mean(0)
            np.testing.assert_allclose(got, frames[step]["colour"], atol=3)


def test_step_instruction_follows_task_index(lossless: tuple[Path, Written]) -> None:
    root, written = lossless
    source = LeRobotVideoSource(root)
    for step in range(LENGTHS[1]):  # episode 1 changes task half way
        assert source.item("episode_000001", 0, step).instruction == TASKS[written.task_index[1][step]]
    assert LeRobotVideoSource(root, instruction="do it").item("episode_000001", 0, 4).instruction == "do it"


def _reference(extractor, written: Written, episode: int, step: int) -> torch.Tensor:
    """The row computed directly from the frames that were encoded and the step's task."""
    images = [Image.fromarray(written.frames[c][episode][step]) for c in CAMERAS]
    item = Item(
        f"episode_{episode:06d}", step // 3, step, (Path("a"), Path("b")), TASKS[written.task_index[episode][step]]
    )
    inputs = extractor.processor(text=[extractor.text(item)], images=images, return_tensors="pt")
    with torch.no_grad():
        return extractor.model.model(**inputs).last_hidden_state[0].mean(0)


def test_build_features_from_videos(lossless: tuple[Path, Written], tiny_extractor, tmp_path: Path) -> None:
    root, written = lossless
    store_path = tmp_path / "store.vla"
    import shutil

    shutil.copytree(root.parent / "store.vla", store_path)
    stats = build_features(
        store_path, tiny_extractor, LeRobotVideoSource(root), rows_per_shard=4, batch_size=3, progress=False
    )
    store = VLAStore.open(store_path)
    assert store.coverage("qwen_vl").all() and stats.rows == sum(-(-n // 3) for n in LENGTHS)
    for episode, vlm_idx in [(0, 0), (0, 2), (1, 1), (2, 2)]:
        expected = _reference(tiny_extractor, written, episode, vlm_idx * 3)
        torch.testing.assert_close(
            store.feature("qwen_vl", f"episode_{episode:06d}", vlm_idx), expected, rtol=1e-4, atol=1e-5
        )


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _cli_without_pyav(*args: str) -> subprocess.CompletedProcess[str]:
    """The command in a process where ``import av`` fails, as on a machine without the [video] extra."""
    code = "import sys; sys.modules['av'] = None; from vlastore.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=_env(), timeout=240)


def test_cli_build_features_from_lerobot_root(
    lossless: tuple[Path, Written], tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = lossless
    import shutil

    store = tmp_path / "store.vla"
    shutil.copytree(root.parent / "store.vla", store)
    base = [
        "build-features",
        str(store),
        "--lerobot-root",
        str(root),
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "-q",
    ]
    assert main([*base, "--cameras", CAMERAS[1], "--family", "wrist"]) == 0, capsys.readouterr().err
    assert VLAStore.open(store).coverage("wrist").all()
    capsys.readouterr()
    # an unknown camera, or no PyAV: exit 2 with what to do
    assert main([*base, "--cameras", "observation.images.side"]) == 2
    err = capsys.readouterr().err
    assert "not video features" in err and CAMERAS[0] in err
    done = _cli_without_pyav(*base)
    assert done.returncode == 2 and "pip install 'vlastore[video]'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    # names the store does not know under this pattern
    assert main([*base, "--name-pattern", "ep_{episode_index}"]) == 2
    err = capsys.readouterr().err
    assert "--name-pattern" in err and "Traceback" not in err


@pytest.mark.timeout(120)
@pytest.mark.parametrize("damage", ["fifo", "garbage", "beyond-the-end"])
def test_bad_video_is_a_clear_error(tmp_path: Path, damage: str) -> None:
    root = tmp_path / "ds"
    write_lerobot_dataset(root, [4, 3], cameras=CAMERAS[:1], codec="mpeg4")
    video = root / "videos" / CAMERAS[0] / "chunk-000" / "file-000.mp4"
    if damage == "fifo":
        video.unlink()
        os.mkfifo(video)
    elif damage == "garbage":
        video.write_bytes(b"\x00\x00\x00\x18ftypmp42 but nothing else")
    else:  # meta/episodes points past the end of the file
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = root / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
        table = pq.read_table(path)
        for column, values in (("from_timestamp", [0.0, 30.0]), ("to_timestamp", [0.4, 30.3])):
            name = f"videos/{CAMERAS[0]}/{column}"
            table = table.set_column(table.column_names.index(name), name, pa.array(values))
        pq.write_table(table, path)
    source = LeRobotVideoSource(root)
    with pytest.raises(VideoDecodeError, match="file-000.mp4") as caught:
        source.item("episode_000001", 0, 1).load_images()
    assert "episode_000001" in str(caught.value)
