"""Frames from a LeRobot dataset's videos as the image source of ``build-features``.

A LeRobot v3.0 dataset keeps each camera's frames in mp4 files, many episodes
per file one after the other (``videos/<camera>/chunk-*/file-*.mp4``, with each
episode's ``from_timestamp`` in ``meta/episodes``). :class:`LeRobotVideoSource`
gives the build loop the same items as a :class:`~vlastore.features.DataFolder`:
row ``vlm_idx`` of an episode shows the frame at step ``vlm_idx * vlm_reuse_count``,
that is at ``from_timestamp + step / fps`` in the camera's file, one image per
camera, with the task of that step as the instruction. Frames are decoded with
PyAV (``pip install 'vlastore[video]'``).

Decoding is sequential where it can be: rows are computed in order, so the next
frame asked for is usually a little later in the same file, and the decoder just
moves on instead of seeking back to a key frame.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..ingest.lerobot import DEFAULT_NAME_PATTERN, LeRobotFormatError, read_column, read_lerobot_meta
from ..ingest.lerobot.meta import open_regular
from .extractor import ExtractorError, Item
from .source import DataFolder

__all__ = ["LeRobotVideoSource", "VideoFrameItem", "VideoFrames", "VideoDecodeError", "require_pyav"]

AHEAD_S = 2.0
"""Decode forward (rather than seek) when the next frame is at most this far after the last one."""


class VideoDecodeError(LeRobotFormatError):
    """A frame cannot be had from a video file (missing, damaged, or no frame near the timestamp).

    A data problem (exit status 1 on the command line), like any LeRobot dataset that disagrees with itself.
    """


def require_pyav() -> Any:
    """The ``av`` module, or an :class:`ExtractorError` saying how to install it."""
    try:
        import av
    except ImportError:
        raise ExtractorError(
            "decoding LeRobot videos needs PyAV, which is not installed: pip install 'vlastore[video]' "
            "(or pip install av; its wheels bundle FFmpeg with AV1, H.264 and MPEG-4 decoders)"
        ) from None
    return av


@dataclass
class _Cursor:
    """An open video file and where its decoder stands."""

    container: Any
    stream: Any
    frames: Any = None
    before: Any = None
    after: Any = None

    def close(self) -> None:
        self.container.close()


class VideoFrames:
    """RGB frames of video files by timestamp, with PyAV; keeps a few files open.

    Args:
        tolerance_s: the nearest decoded frame must be this close to the timestamp asked for.
        max_open: video files kept open (least recently used closed first).
    """

    def __init__(self, tolerance_s: float, max_open: int = 8) -> None:
        self.av = require_pyav()
        self.tolerance_s = tolerance_s
        self.max_open = max_open
        self._open: OrderedDict[str, _Cursor] = OrderedDict()
        self._lock = threading.Lock()  # the prefetch thread and the main thread (probe) may both decode

    def frame(self, path: str | os.PathLike[str], timestamp: float) -> np.ndarray:
        """The frame nearest ``timestamp`` seconds in ``path``: ``[H, W, 3]`` uint8 RGB.

        Raises:
            VideoDecodeError: the file cannot be decoded or has no frame within ``tolerance_s``.
        """
        path = str(path)
        with self._lock:
            try:
                cursor = self._cursor(path)
                chosen = self._nearest(cursor, timestamp)
            except VideoDecodeError:
                self._drop(path)
                raise
            except (self.av.error.FFmpegError, OSError, ValueError) as exc:
                self._drop(path)
                raise VideoDecodeError(f"{path}: cannot be decoded ({exc})") from None
            if chosen is None or abs(chosen.time - timestamp) > self.tolerance_s:
                near = "no frame" if chosen is None else f"the nearest frame is at {chosen.time:.4f} s"
                raise VideoDecodeError(
                    f"{path}: no frame at {timestamp:.4f} s ({near}; tolerance "
                    f"{self.tolerance_s:.4f} s); the video and meta/episodes disagree"
                )
            return chosen.to_ndarray(format="rgb24")

    def _cursor(self, path: str) -> _Cursor:
        if path in self._open:
            self._open.move_to_end(path)
            return self._open[path]
        try:
            open_regular(Path(path)).close()  # a FIFO or a folder is refused before FFmpeg blocks on it
        except OSError as exc:
            raise VideoDecodeError(f"{path}: cannot be opened ({exc.strerror or exc})") from None
        container = self.av.open(path, "r")
        if not container.streams.video:
            container.close()
            raise VideoDecodeError(f"{path}: holds no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        cursor = _Cursor(container, stream)
        self._open[path] = cursor
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)[1].close()
        return cursor

    def _drop(self, path: str) -> None:
        cursor = self._open.pop(path, None)
        if cursor is not None:
            cursor.close()

    def _seek(self, cursor: _Cursor, timestamp: float) -> None:
        target = max(0.0, timestamp - self.tolerance_s)
        cursor.container.seek(
            int(target / cursor.stream.time_base), stream=cursor.stream, backward=True, any_frame=False
        )
        cursor.frames = cursor.container.decode(cursor.stream)
        cursor.before = cursor.after = None

    def _next(self, cursor: _Cursor) -> Any:
        for frame in cursor.frames:
            if frame.pts is not None:
                return frame
        return None

    def _nearest(self, cursor: _Cursor, timestamp: float) -> Any:
        """Decode until a frame at or after ``timestamp``; the nearer of it and the one before."""
        earliest = cursor.before if cursor.before is not None else cursor.after
        if (
            cursor.frames is None
            or earliest is None
            or timestamp < earliest.time - self.tolerance_s
            or timestamp - cursor.after.time > AHEAD_S
        ):
            self._seek(cursor, timestamp)  # behind what was decoded, or far ahead: back to a key frame
        while cursor.after is None or cursor.after.time < timestamp:
            frame = self._next(cursor)
            if frame is None:
                break
            cursor.before, cursor.after = cursor.after, frame
        candidates = [f for f in (cursor.before, cursor.after) if f is not None]
        return min(candidates, key=lambda f: abs(f.time - timestamp)) if candidates else None

    def close(self) -> None:
        with self._lock:
            while self._open:
                self._open.popitem()[1].close()


@dataclass(frozen=True)
class VideoFrameItem(Item):
    """An item whose images are frames of video files: ``images[i]`` at ``timestamps[i]`` seconds."""

    timestamps: tuple[float, ...] = ()
    decoder: VideoFrames | None = field(default=None, compare=False, repr=False)

    def load_images(self) -> list[Any]:
        """The frames as RGB ``PIL.Image`` objects (decoded now)."""
        from PIL import Image

        if self.decoder is None:
            raise ExtractorError(f"dataset {self.dataset!r} step {self.step}: no video decoder attached to this item")
        out = []
        for path, timestamp in zip(self.images, self.timestamps, strict=True):
            try:
                out.append(Image.fromarray(self.decoder.frame(path, timestamp)))
            except VideoDecodeError as exc:
                raise VideoDecodeError(f"dataset {self.dataset!r} step {self.step}: {exc}") from None
        return out


class LeRobotVideoSource(DataFolder):
    """The images and instructions of a store's episodes, from the LeRobot dataset it was ingested from.

    Args:
        root: the LeRobot dataset folder (``vlastore ingest lerobot ROOT --out STORE``).
        cameras: video feature keys in the order the model sees them (default: every video feature, in
            info.json's order).
        instruction: one instruction for every step (default: the task of each step).
        name_pattern: how ``ingest lerobot`` named the episodes (default ``episode_{episode_index:06d}``).
        tolerance_s: the decoded frame must be this close to ``from_timestamp + step / fps`` (default:
            half a frame, so the nearest frame is the only one accepted).

    Raises:
        ExtractorError: PyAV is not installed, an unknown camera, or a dataset without videos.
        FileNotFoundError: ``root`` is not a folder.
        LeRobotFormatError: ``root`` is not a LeRobot v3.0 dataset.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        cameras: Sequence[str] | None = None,
        instruction: str | None = None,
        name_pattern: str | None = None,
        tolerance_s: float | None = None,
    ) -> None:
        super().__init__(
            Path(root), image_pattern="", cameras=tuple(cameras) if cameras else None, instruction=instruction
        )
        self.meta = read_lerobot_meta(self.root, name_pattern or DEFAULT_NAME_PATTERN)
        videos = self.meta.video_keys
        if not videos:
            images = [k for k, f in self.meta.features.items() if f.kind == "image"]
            more = (
                f" (its images {images} are stored inside the Parquet files, which this source does not read)"
                if images
                else ""
            )
            raise ExtractorError(f"{self.root}: the LeRobot dataset has no video feature{more}")
        unknown = [c for c in self.cameras or () if c not in videos]
        if unknown:
            raise ExtractorError(f"--cameras {unknown}: not video features of {self.root}; it has {videos}")
        self.video_cameras = tuple(self.cameras or videos)
        self.fps = self.meta.fps
        self.decoder = VideoFrames(0.5 / self.fps if tolerance_s is None else tolerance_s)
        self._episodes = {e.name: e for e in self.meta.episodes}
        self._step_tasks: dict[str, np.ndarray] = {}

    def episode(self, dataset: str) -> Any:
        try:
            return self._episodes[dataset]
        except KeyError:
            why = f"; meta/episodes problems: {[str(p) for p in self.meta.problems[:3]]}" if self.meta.problems else ""
            raise FileNotFoundError(
                f"dataset {dataset!r}: no episode of that name in the LeRobot dataset {self.root} (names come "
                f"from --name-pattern at ingest; give the same one to build-features){why}"
            ) from None

    def cameras_of(self, dataset: str) -> tuple[str, ...]:
        return self.video_cameras

    def image_paths(self, dataset: str, step: int) -> tuple[Path, ...]:
        episode = self.episode(dataset)
        paths = []
        for camera in self.video_cameras:
            if camera not in episode.videos:
                raise FileNotFoundError(
                    f"dataset {dataset!r}: meta/episodes gives no video of camera {camera!r} "
                    f"for LeRobot episode {episode.episode_index}"
                )
            paths.append(self.root / episode.videos[camera].path)
        return tuple(paths)

    def timestamps(self, dataset: str, step: int) -> tuple[float, ...]:
        """Where step ``step`` of ``dataset`` is in each camera's file: ``from_timestamp + step / fps``."""
        episode = self.episode(dataset)
        if not 0 <= step < episode.length:
            raise IndexError(f"dataset {dataset!r}: step {step} is outside its {episode.length} frames")
        return tuple(episode.videos[c].from_timestamp + step / self.fps for c in self.video_cameras)

    def instruction_of(self, dataset: str) -> str:
        """The episode's task (its first step's, when the task changes within the episode)."""
        return self.step_instruction(dataset, 0)

    def step_instruction(self, dataset: str, step: int) -> str:
        """The task of frame ``step`` (its ``task_index`` in the data file), or ``instruction`` when given."""
        if self.instruction is not None:
            return self.instruction
        episode = self.episode(dataset)
        if len(episode.tasks) == 1:
            return episode.tasks[0]
        if dataset not in self._step_tasks:
            self._load_step_tasks(episode)
        index = int(self._step_tasks[dataset][step])
        if index not in self.meta.tasks:
            raise ValueError(f"dataset {dataset!r} step {step}: task_index {index} is not in meta/tasks.parquet")
        return self.meta.tasks[index]

    def _load_step_tasks(self, episode: Any) -> None:
        # every episode of that data file at once: one read of one column per file
        same_file = {e.episode_index: e for e in self.meta.episodes if e.data_path == episode.data_path}
        by_index = read_column(self.root, episode.data_path, "task_index", same_file)
        for e in same_file.values():
            self._step_tasks[e.name] = by_index[e.episode_index].astype(np.int64)

    def item(self, dataset: str, index: int, step: int) -> Item:
        return VideoFrameItem(
            dataset,
            int(index),
            int(step),
            self.image_paths(dataset, step),
            self.step_instruction(dataset, step),
            self.timestamps(dataset, step),
            self.decoder,
        )
