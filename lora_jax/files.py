"""Opening input files with one-line errors: a truncated, corrupt or malformed file is named
with its cause and the fix (`lora_jax.errors.CorruptFileError`), never a traceback from deep in
a parser ("cannot reshape array of size ...", a bare JSONDecodeError).

    read_json(path)            a JSON object (config.json, adapter_config.json, run.json ...)
    check_safetensors(path)    the header parses and the data covers every tensor (no data read)
    open_gguf(path)            a `gguf.GGUFReader`, every tensor's data inside the file (cached)

>>> import tempfile, os
>>> p = os.path.join(tempfile.mkdtemp(), "adapter_config.json")
>>> _ = open(p, "w").write('{"r": 8,')
>>> read_json(p)   # doctest: +ELLIPSIS
Traceback (most recent call last):
...
lora_jax.errors.CorruptFileError: .../adapter_config.json is not valid JSON (line 1 column 9: Expecting property name enclosed in double quotes); fix or re-create the file
"""

from __future__ import annotations

import functools
import json
import os

from lora_jax.errors import CorruptFileError, MissingFileError


def read_json(path: str | os.PathLike) -> dict:
    """The JSON object in `path`; a malformed file is a one-line `CorruptFileError` naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"{path} does not exist")
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"{path} is not valid JSON (line {e.lineno} column {e.colno}: {e.msg}); fix or re-create the file") from None
    except UnicodeDecodeError:
        raise CorruptFileError(f"{path} is not UTF-8 text (a binary or corrupt file?); fix or re-create the file") from None
    if not isinstance(obj, dict):
        raise CorruptFileError(f"{path} holds a JSON {type(obj).__name__}, not an object; fix or re-create the file")
    return obj


def check_safetensors(path: str | os.PathLike) -> None:
    """Raise a one-line `CorruptFileError` unless `path` is a complete .safetensors file.

    safetensors itself checks the header and that the data covers every tensor, without reading
    the data: a truncated download or a half-written file fails here, by name.
    """
    path = os.fspath(path)
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy"):
            pass
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...: all mean "unreadable"
        cause = " ".join(str(e).split())[:120] or type(e).__name__
        raise CorruptFileError(f"{path} is not a readable .safetensors file ({cause}): it is truncated or corrupt; "
                               "download or save it again") from None


def open_gguf(path: str | os.PathLike):
    """A `gguf.GGUFReader` of `path` (cached per file, size and mtime); a truncated or corrupt
    file is a one-line `CorruptFileError` naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"GGUF file {path!r} does not exist; pass the path of a .gguf file")
    st = os.stat(path)
    return _open_gguf(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _open_gguf(path: str, size: int, mtime: int):
    from gguf import GGUFReader

    fix = "it is truncated or corrupt; download or convert it again"
    try:
        reader = GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - the reader fails in many ways on a cut file (reshape, index, ...)
        cause = " ".join(str(e).split())[:100] or type(e).__name__
        raise CorruptFileError(f"{path} is not a readable GGUF file ({cause}); {fix}") from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise CorruptFileError(f"{path} is {size} bytes but its tensors need {end}; {fix}")
    return reader
