"""Plug-in extractors used by the tests, loaded as ``features_plugins:<name>`` (like a user's own module)."""

from __future__ import annotations

import time

import numpy as np


def patch_colors(images, instruction):
    """A per-image encoder in miniature: mean colour of a 2x2 grid of patches of every image, float16."""
    rows = []
    for image in images:
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        h, w = pixels.shape[0] // 2, pixels.shape[1] // 2
        rows.append(
            [pixels[i * h : (i + 1) * h, j * w : (j + 1) * w].mean(axis=(0, 1)) for i in (0, 1) for j in (0, 1)]
        )
    return np.asarray(rows, dtype=np.float16).reshape(len(images), 12)


def slow_patch_colors(images, instruction):
    """:func:`patch_colors` at the pace of a small model."""
    time.sleep(0.05)
    return patch_colors(images, instruction)
