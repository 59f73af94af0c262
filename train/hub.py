"""Hugging Face Hub names for `model.path` and `data.path`, with no hang when there is no network.

A name that is not a local path (`Qwen/Qwen2.5-0.5B-Instruct`, `squad`) is read from the local
Hub cache when it is there. Otherwise the Hub is asked only after a 3-second reachability check,
so a machine without network gets a one-line error at once instead of huggingface_hub's ~25 s of
retries. A model download takes the config, safetensors weights and tokenizer files only (never
a pickle, never remote code).

>>> looks_like_hub_name("Qwen/Qwen2.5-0.5B"), looks_like_hub_name("./models/x"), looks_like_hub_name("a/b/c")
(True, False, False)
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
from urllib.parse import urlparse

from lora_jax.errors import MissingFileError

MODEL_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def looks_like_hub_name(path: str) -> bool:
    """`name` or `org/name`, not a relative or absolute file path."""
    parts = path.split("/")
    return 1 <= len(parts) <= 2 and all(p and not p.startswith((".", "~")) for p in parts)


@functools.lru_cache(maxsize=None)
def reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub endpoint answers a TCP connect (False in HF_HUB_OFFLINE mode; True behind a proxy)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return True  # the proxy decides; huggingface_hub's own timeouts apply
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def offline():
    """huggingface_hub and datasets in offline mode (the local cache only) for the block."""
    import huggingface_hub.constants as hub_constants

    mods = [hub_constants]
    with contextlib.suppress(ImportError):
        import datasets.config as ds_config

        mods.append(ds_config)
    saved = [m.HF_HUB_OFFLINE for m in mods]
    for m in mods:
        m.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for m, v in zip(mods, saved):
            m.HF_HUB_OFFLINE = v


@contextlib.contextmanager
def quiet():
    """Silence datasets' and huggingface_hub's own log lines (retries, parse errors) for the block:
    the program reports the failure itself, in one line."""
    loggers = [logging.getLogger(n) for n in ("datasets", "huggingface_hub")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def model_snapshot(name: str, what: str = "model.path") -> str:
    """The local directory of hub model `name`: from the cache, else downloaded (config, safetensors, tokenizer)."""
    from huggingface_hub import snapshot_download

    with quiet():
        try:
            return snapshot_download(name, allow_patterns=MODEL_FILES, local_files_only=True)
        except Exception:  # not cached (huggingface_hub raises several types)
            pass
        if not reachable():
            raise MissingFileError(f"{what} {name!r} is not a local path nor in the Hugging Face cache, and the Hub "
                                   f"cannot be reached (no network?); set {what} to an existing model directory, "
                                   "a .gguf file or 'default', or download the model where there is network")
        try:
            return snapshot_download(name, allow_patterns=MODEL_FILES)
        except Exception as e:
            msg = " ".join(str(e).split())[:160]
            raise MissingFileError(f"could not download model {name!r} from the Hugging Face Hub ({type(e).__name__}: {msg}); "
                                   f"if {name!r} is meant as a local path, it does not exist; else check the Hub name (and HF_TOKEN for a gated "
                                   f"model); or set {what} to an existing model directory") from None
