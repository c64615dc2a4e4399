"""Where the inputs of a feature row live: the data-folder convention.

Default layout (docs/features.md has the full story)::

    <data_root>/<dataset>/instruction.txt         the episode's instruction (one line)
    <data_root>/<dataset>/<camera>/<step:06d>.png  one image per camera per step

``image_pattern`` (a ``str.format`` pattern with ``{camera}``, ``{step}`` and
``{dataset}``) and ``cameras`` adapt it to other layouts, e.g.
``frame_{step}.jpg`` for one camera without subfolders.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .extractor import Item

if TYPE_CHECKING:
    from ..store import VLAStore

__all__ = ["DataFolder", "DEFAULT_IMAGE_PATTERN", "DEFAULT_INSTRUCTION_FILE", "IMAGE_SUFFIXES"]

DEFAULT_IMAGE_PATTERN = "{camera}/{step:06d}.png"
DEFAULT_INSTRUCTION_FILE = "instruction.txt"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
INSTRUCTION_KEYS = ("instruction", "language_instruction", "task")


@dataclass
class DataFolder:
    """Images and instructions of the episodes of a store, found by convention.

    Args:
        root: the data folder; episode ``name`` lives in ``root / name``.
        image_pattern: path of one image relative to the episode folder.
        cameras: camera folder names in the order their images are given to the
            model; ``None`` takes every sub-folder of the episode that holds images,
            sorted by name (ignored when the pattern has no ``{camera}``).
        instruction_file: per-episode file: plain text, or JSON with one of the
            keys ``instruction``, ``language_instruction``, ``task``.
        instruction: one instruction for every episode (overrides the file).
    """

    root: Path
    image_pattern: str = DEFAULT_IMAGE_PATTERN
    cameras: tuple[str, ...] | None = None
    instruction_file: str = DEFAULT_INSTRUCTION_FILE
    instruction: str | None = None
    _cameras: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)
    _instructions: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if self.cameras is not None:
            self.cameras = tuple(self.cameras)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"data root {self.root} is not a folder; give --data-root the folder that "
                "holds one sub-folder per dataset"
            )

    def episode_dir(self, dataset: str) -> Path:
        path = self.root / dataset
        if not path.is_dir():
            raise FileNotFoundError(
                f"dataset {dataset!r}: no folder {path}; the data root must hold one folder per episode of the store"
            )
        return path

    def cameras_of(self, dataset: str) -> tuple[str, ...]:
        if "{camera" not in self.image_pattern:
            return ("",)
        if self.cameras is not None:
            return self.cameras
        if dataset not in self._cameras:
            folder = self.episode_dir(dataset)
            found = tuple(
                sorted(
                    p.name
                    for p in folder.iterdir()
                    if p.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.iterdir())
                )
            )
            if not found:
                raise FileNotFoundError(
                    f"dataset {dataset!r}: {folder} has no camera sub-folder with images; give --cameras or "
                    f"an --image-pattern without {{camera}} (now {self.image_pattern!r})"
                )
            self._cameras[dataset] = found
        return self._cameras[dataset]

    def instruction_of(self, dataset: str) -> str:
        if self.instruction is not None:
            return self.instruction
        if dataset not in self._instructions:
            path = self.episode_dir(dataset) / self.instruction_file
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"dataset {dataset!r}: no instruction file {path}; write the instruction there or give "
                    "--instruction TEXT for all episodes"
                ) from None
            if path.suffix == ".json":
                data = json.loads(text)
                key = next((k for k in INSTRUCTION_KEYS if k in data), None)
                if key is None:
                    raise ValueError(f"{path}: no key among {INSTRUCTION_KEYS}")
                text = str(data[key])
            self._instructions[dataset] = text.strip()
        return self._instructions[dataset]

    def image_paths(self, dataset: str, step: int) -> tuple[Path, ...]:
        folder = self.root / dataset
        return tuple(
            folder / self.image_pattern.format(camera=camera, step=step, dataset=dataset)
            for camera in self.cameras_of(dataset)
        )

    def item(self, dataset: str, index: int, step: int) -> Item:
        return Item(dataset, int(index), int(step), self.image_paths(dataset, step), self.instruction_of(dataset))

    def items(
        self,
        store: VLAStore,
        family: str,
        rows: Sequence[int] | np.ndarray,
        generation: int | None = None,
        vlm_reuse_count: int | None = None,
    ) -> list[Item]:
        """Items of ``rows`` of a family: row ``(dataset, vlm_idx)`` shows step ``vlm_idx * vlm_reuse_count``."""
        layout = store.layout(family, generation)
        reuse = vlm_reuse_count or layout.spec.vlm_reuse_count or 1
        return items_for_rows(self, store.catalog.names, layout.episode_rows, rows, reuse)


def items_for_rows(
    folder: DataFolder,
    names: Sequence[str],
    episode_rows: np.ndarray,
    rows: Sequence[int] | np.ndarray,
    vlm_reuse_count: int,
) -> list[Item]:
    rows = np.asarray(rows, dtype=np.int64)
    episodes = np.searchsorted(episode_rows, rows, side="right") - 1
    return [
        folder.item(names[e], r - int(episode_rows[e]), (r - int(episode_rows[e])) * vlm_reuse_count)
        for r, e in zip(rows.tolist(), episodes.tolist(), strict=True)
    ]
