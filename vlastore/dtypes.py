"""bfloat16 and its storage form: the ``uint16`` bits (zarr 3.1 has no bfloat16 data type).

Every conversion between a feature's true dtype and the numpy array it is
stored as goes through here. torch is imported only by the functions that hand
out or take tensors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["bfloat16_bits", "tensor_to_numpy", "to_tensor", "widen_bfloat16", "as_float"]


def bfloat16_bits(tensor: torch.Tensor) -> np.ndarray:
    """A CPU bfloat16 tensor's bits as a ``uint16`` array (no copy when it is contiguous)."""
    import torch

    return tensor.contiguous().view(torch.int16).numpy().view(np.uint16)


def tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A tensor (any device) as numpy in its storage form: bfloat16 as ``uint16`` bits, the rest as they are."""
    import torch

    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.dtype == torch.bfloat16:
        return bfloat16_bits(tensor)
    return tensor.contiguous().numpy()


def to_tensor(array: np.ndarray, true_dtype: str) -> torch.Tensor:
    """A torch tensor sharing memory with ``array``, reinterpreted as ``true_dtype`` (bfloat16 bit-exact)."""
    import torch

    if not array.flags.writeable:  # decompressed or fetched bytes: torch wants writable memory
        array = array.copy()
    tensor = torch.from_numpy(array)
    if true_dtype == "bfloat16":
        return tensor.view(torch.bfloat16)
    return tensor


def widen_bfloat16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values given as ``uint16`` bits, widened exactly to float32 (``bits << 16``)."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def as_float(values: Any, true_dtype: str) -> np.ndarray:
    """Stored values as a float array: bfloat16 bits widened exactly to float32, other dtypes as they are."""
    if true_dtype == "bfloat16":
        return widen_bfloat16(values)
    return np.asarray(values)
