"""Atomic output directories and safetensors writing shared by the exporters.

Every exporter writes into a fresh temporary directory next to `out_dir` and renames it into place
only after the last file is closed, so a crash never leaves a half-written adapter or checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

import numpy as np


@contextlib.contextmanager
def atomic_dir(out_dir: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary directory that replaces `out_dir` when the block exits without error.

    Refuses an existing non-empty `out_dir` unless `overwrite`.

    >>> import tempfile, os
    >>> d = os.path.join(tempfile.mkdtemp(), "out")
    >>> with atomic_dir(d) as tmp:
    ...     open(os.path.join(tmp, "f.txt"), "w").close()
    >>> os.listdir(d)
    ['f.txt']
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise FileExistsError(f"{out_dir} exists and is not a directory; choose another output path")
        if os.listdir(out_dir) and not overwrite:
            raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True (CLI: --overwrite) or choose another directory")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        if os.path.exists(out_dir):
            old = tmp + ".old"
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_safetensors(tensors: dict[str, np.ndarray], path: str) -> None:
    """Write numpy tensors (bf16 as ml_dtypes.bfloat16) with PyTorch's metadata {"format": "pt"}.

    >>> import tempfile, os
    >>> save_safetensors({"w": np.zeros((2, 2), np.float32)}, os.path.join(tempfile.mkdtemp(), "a.safetensors"))
    """
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, metadata={"format": "pt"})
