"""Small helpers shared by the data, labelling, report and training layers (none of them owns these)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a fsync'ed temporary file and ``os.replace``.

    A reader (or a rerun after a kill) sees either the old file or the complete new one, never a torn file.

    Args:
        path: destination file (its folder must exist).
        text: UTF-8 content.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def resolve_device_dtype(device: Any = None, dtype: Any = None) -> tuple[Any, Any]:
    """Defaults for inference: CUDA when available, bfloat16 on CUDA and float32 on CPU.

    Args:
        device: explicit torch device (or its name), or None.
        dtype: explicit torch dtype, or None.

    Returns:
        ``(torch.device, torch.dtype)``.
    """
    import torch

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


__all__ = ["atomic_write_text", "resolve_device_dtype"]
