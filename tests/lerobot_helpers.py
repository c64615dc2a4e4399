"""Write LeRobot v3.0 datasets with pyarrow, file for file as ``lerobot.datasets`` (0.4.x) writes them.

The layout, column names and Arrow types follow lerobot's ``dataset_writer`` / ``dataset_metadata``
(and tests/data/lerobot-v3-real, written by lerobot 0.4.4 itself, has the same schema): ``meta/info.json``,
``meta/tasks.parquet`` (pandas-style: ``task_index`` + the task strings as ``__index_level_0__``),
``meta/episodes/chunk-000/file-000.parquet`` (one row per episode, with ``stats/...`` columns),
``data/chunk-XXX/file-YYY.parquet`` (several episodes per file, fixed-size lists for vectors, one row group
per episode unless asked otherwise) and, when a codec is given, one mp4 per camera holding every episode
one after the other (``from_timestamp``/``to_timestamp`` per episode).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CHUNK_FILE = "chunk-{chunk_index:03d}/file-{file_index:03d}"
DATA_PATH = "data/" + CHUNK_FILE + ".parquet"
VIDEO_PATH = "videos/{video_key}/" + CHUNK_FILE + ".mp4"
TASKS = ("pick the red cup", "place it on the plate", "open the drawer")


@dataclass
class Written:
    """What the files say each frame holds (the ground truth a test compares with)."""

    root: Path
    fps: int
    state: list[np.ndarray]
    action: list[np.ndarray]
    reward: list[np.ndarray]
    task_index: list[np.ndarray]
    tasks: dict[int, str]
    frames: dict[str, list[np.ndarray]] = field(default_factory=dict)
    """Camera -> per episode ``[steps, H, W, 3]`` uint8 (what was encoded)."""


def frame_image(episode: int, step: int, height: int, width: int, camera: int = 0) -> np.ndarray:
    """A smooth, recognisable RGB frame (survives a lossy codec within a few levels)."""
    y = np.linspace(0, 1, height)[:, None]
    x = np.linspace(0, 1, width)[None, :]
    base = np.stack(
        [
            40 + 150 * x + 10 * step + 0 * y,
            30 + 120 * y + 25 * episode + 0 * x,
            200 - 60 * x * y - 7 * step + 30 * camera,
        ],
        axis=-1,
    )
    return np.clip(base, 0, 255).astype(np.uint8)


def write_lerobot_dataset(
    root: Path,
    lengths: list[int],
    episodes_per_file: int = 2,
    files_per_chunk: int = 2,
    row_group_rows: int | None = None,
    list_type: str = "fixed",
    fps: int = 10,
    state_dim: int = 4,
    action_dim: int = 3,
    cameras: tuple[str, ...] = (),
    codec: str | None = None,
    size: tuple[int, int] = (32, 48),
    seed: int = 0,
) -> Written:
    """A v3.0 dataset under ``root``: ``lengths[i]`` frames in episode ``i``.

    Args:
        episodes_per_file: consecutive episodes sharing one data file.
        files_per_chunk: ``chunks_size`` (files per ``chunk-XXX`` folder).
        row_group_rows: Parquet row-group size; ``None`` is one row group per episode (as lerobot writes).
        list_type: ``fixed`` (``fixed_size_list``, as datasets >= 2 writes ``Sequence(length=n)``) or
            ``list`` (variable lists, as older writers did).
        cameras: video feature keys; with ``codec`` one mp4 per camera is encoded with PyAV.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "meta").mkdir(exist_ok=True)
    height, width = size
    written = Written(root, fps, [], [], [], [], dict(enumerate(TASKS)))
    for e, n in enumerate(lengths):
        written.state.append(rng.normal(size=(n, state_dim)).astype(np.float32))
        written.action.append(rng.normal(size=(n, action_dim)).astype(np.float32))
        written.reward.append(rng.normal(size=n).astype(np.float32))
        # episode 1 changes task half way, like a multi-task recording
        tasks = np.full(n, e % 2, dtype=np.int64)
        if e == 1:
            tasks[n // 2 :] = 2
        written.task_index.append(tasks)
    features: dict[str, Any] = {
        "observation.state": {
            "dtype": "float32",
            "shape": [state_dim],
            "names": [f"joint_{i}" for i in range(state_dim)],
        },
        "action": {
            "dtype": "float32",
            "shape": [action_dim],
            "names": {"motors": [f"motor_{i}" for i in range(action_dim)]},
        },
        "next.reward": {"dtype": "float32", "shape": [1], "names": None},
    }
    for cam in cameras:
        features[cam] = {
            "dtype": "video",
            "shape": [height, width, 3],
            "names": ["height", "width", "channels"],
            "info": {"video.fps": fps, "video.codec": codec or "none", "video.pix_fmt": "yuv420p"},
        }
    features.update(
        {
            "timestamp": {"dtype": "float32", "shape": [1], "names": None},
            "frame_index": {"dtype": "int64", "shape": [1], "names": None},
            "episode_index": {"dtype": "int64", "shape": [1], "names": None},
            "index": {"dtype": "int64", "shape": [1], "names": None},
            "task_index": {"dtype": "int64", "shape": [1], "names": None},
        }
    )
    info = {
        "codebase_version": "v3.0",
        "robot_type": "so100",
        "total_episodes": len(lengths),
        "total_frames": sum(lengths),
        "total_tasks": len(TASKS),
        "chunks_size": files_per_chunk,
        "data_files_size_in_mb": 100,
        "video_files_size_in_mb": 200,
        "fps": fps,
        "splits": {"train": f"0:{len(lengths)}"},
        "data_path": DATA_PATH,
        "video_path": VIDEO_PATH,
        "features": features,
    }
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=4))
    pq.write_table(
        pa.table(
            {
                "task_index": pa.array(range(len(TASKS)), pa.int64()),
                "__index_level_0__": pa.array(TASKS, pa.large_string()),
            }
        ),
        root / "meta" / "tasks.parquet",
    )

    def vec(values: np.ndarray) -> pa.Array:
        flat = pa.array(values.reshape(-1), pa.float32())
        if list_type == "fixed":
            return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
        offsets = pa.array(np.arange(0, values.size + 1, values.shape[1]), pa.int32())
        return pa.ListArray.from_arrays(offsets, flat)

    rows: list[dict[str, Any]] = []
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
    groups = [
        list(range(i, min(i + episodes_per_file, len(lengths)))) for i in range(0, len(lengths), episodes_per_file)
    ]
    for number, group in enumerate(groups):
        chunk, file = divmod(number, files_per_chunk)
        path = root / DATA_PATH.format(chunk_index=chunk, file_index=file)
        path.parent.mkdir(parents=True, exist_ok=True)
        tables = []
        for e in group:
            n = lengths[e]
            tables.append(
                pa.table(
                    {
                        "observation.state": vec(written.state[e]),
                        "action": vec(written.action[e]),
                        "next.reward": pa.array(written.reward[e], pa.float32()),
                        "timestamp": pa.array(np.arange(n, dtype=np.float32) / np.float32(fps), pa.float32()),
                        "frame_index": pa.array(np.arange(n), pa.int64()),
                        "episode_index": pa.array(np.full(n, e), pa.int64()),
                        "index": pa.array(np.arange(starts[e], starts[e + 1]), pa.int64()),
                        "task_index": pa.array(written.task_index[e], pa.int64()),
                    }
                )
            )
            rows.append(
                {
                    "episode_index": e,
                    "tasks": sorted({TASKS[t] for t in written.task_index[e]}),
                    "length": n,
                    "data/chunk_index": chunk,
                    "data/file_index": file,
                    "dataset_from_index": int(starts[e]),
                    "dataset_to_index": int(starts[e + 1]),
                    "stats/observation.state/mean": written.state[e].mean(0).astype(float).tolist(),
                    "meta/episodes/chunk_index": 0,
                    "meta/episodes/file_index": 0,
                }
            )
        with pq.ParquetWriter(path, tables[0].schema, compression="snappy") as out:
            for table in tables:
                out.write_table(table, row_group_size=row_group_rows or len(table))
    for cam_number, cam in enumerate(cameras):
        segments = _encode_camera(root, cam, cam_number, lengths, fps, codec, size, written) if codec else None
        for e, row in enumerate(rows):
            t0 = float(starts[e]) / fps
            if segments:
                t0 = segments[e]
            row[f"videos/{cam}/chunk_index"] = 0
            row[f"videos/{cam}/file_index"] = 0
            row[f"videos/{cam}/from_timestamp"] = t0
            row[f"videos/{cam}/to_timestamp"] = t0 + lengths[e] / fps
    episodes_path = root / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    episodes_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), episodes_path)
    stats = {"observation.state": {"mean": np.concatenate(written.state).mean(0).tolist()}}
    (root / "meta" / "stats.json").write_text(json.dumps(stats))
    return written


def _encode_camera(
    root: Path,
    cam: str,
    cam_number: int,
    lengths: list[int],
    fps: int,
    codec: str,
    size: tuple[int, int],
    written: Written,
) -> list[float]:
    """All episodes of one camera in one mp4, one after the other; returns each episode's from_timestamp."""
    import av

    height, width = size
    path = root / VIDEO_PATH.format(video_key=cam, chunk_index=0, file_index=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    lossless = codec == "libx264rgb"
    frames = written.frames.setdefault(cam, [])
    starts = []
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "rgb24" if lossless else "yuv420p"
        stream.time_base = Fraction(1, fps)
        if lossless:
            stream.options = {"qp": "0", "preset": "ultrafast"}
        elif codec == "libsvtav1":
            stream.options = {"preset": "12", "crf": "20", "g": "2"}
        pts = 0
        for e, n in enumerate(lengths):
            starts.append(pts / fps)
            images = np.stack([frame_image(e, s, height, width, cam_number) for s in range(n)])
            frames.append(images)
            for image in images:
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts = pts
                pts += 1
                for packet in stream.encode(frame):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return starts
