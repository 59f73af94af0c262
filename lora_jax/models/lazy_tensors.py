"""`LazyTensors`: a read-only name -> array mapping that reads each tensor only when asked.

`from_pretrained` reads checkpoints through it, so a model is converted (and, with `quantize=`,
quantized) one tensor at a time and the full-precision checkpoint is never held whole: each
tensor is loaded on `__getitem__` and dropped by the caller once converted. Nothing is cached.

>>> t = LazyTensors({"w": lambda: [1, 2]})
>>> list(t), t["w"]
(['w'], [1, 2])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterator


class LazyTensors(Mapping):
    """Mapping over loader callables: `tensors[name]` calls the loader every time."""

    def __init__(self, loaders: dict[str, Callable[[], Any]]):
        self._loaders = dict(loaders)

    def __getitem__(self, name: str) -> Any:
        return self._loaders[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)

    def __contains__(self, name: object) -> bool:
        return name in self._loaders


def lazy_safetensors(files: list[str]) -> LazyTensors:
    """The tensors of .safetensors files, each read (numpy, bf16 as ml_dtypes) when accessed.

    >>> len(lazy_safetensors([]))
    0
    """
    from safetensors import safe_open

    from lora_jax.files import check_safetensors

    loaders: dict[str, Callable[[], Any]] = {}
    for f in files:
        check_safetensors(f)
        with safe_open(f, framework="numpy") as fh:
            names = list(fh.keys())

        def load(name: str, f: str = f) -> Any:
            with safe_open(f, framework="numpy") as fh:
                return fh.get_tensor(name)

        for name in names:
            loaders[name] = lambda name=name, load=load: load(name)
    return LazyTensors(loaders)
