"""SIGINT (Ctrl-C) and SIGTERM (how clouds and schedulers preempt): stop at the next safe point.

`install()` runs first thing in `lora-jax train`, before JAX is imported: from then on a signal
only sets a flag (and says so on stderr) — it never raises inside JAX's own callbacks, where
Python would print "Exception ignored in _xla_gc_callback" and carry on. The program polls the
flag: between setup phases (`check()` raises `Interrupted`: nothing is saved yet) and after
every training step (the loop saves a checkpoint and exits 128 + the signal: 130 for SIGINT, 143
for SIGTERM). A second signal exits at once (the newest checkpoint on disk is intact: orbax
writes atomically).

>>> install(); requested() is None
True
>>> import os, signal; os.kill(os.getpid(), signal.SIGTERM)   # doctest: +ELLIPSIS
>>> requested() == signal.SIGTERM, Interrupted(signal.SIGTERM).exit_code
(True, 143)
>>> restore(); requested() is None
True
"""

from __future__ import annotations

import os
import signal

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state: dict = {"signum": None, "old": {}}


class Interrupted(Exception):
    """A stop signal arrived before the training loop could save anything."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        self.signame = signal.Signals(signum).name
        self.exit_code = 128 + self.signum
        super().__init__(f"{self.signame} received")


def _handler(signum, frame) -> None:
    name = signal.Signals(signum).name
    if _state["signum"] is not None:
        os.write(2, f"\nlora-jax train: second {name}: exiting now\n".encode())
        os._exit(128 + signum)
    _state["signum"] = signum
    os.write(2, f"\nlora-jax train: {name} received: stopping at the next safe point (again to quit at once)\n".encode())


def install() -> None:
    """Route SIGINT and SIGTERM to the flag (main thread only; a no-op elsewhere)."""
    for s in SIGNALS:
        try:
            if signal.getsignal(s) is not _handler:
                _state["old"].setdefault(s, signal.signal(s, _handler))
        except ValueError:  # not the main thread
            return


def restore() -> None:
    """Put back the handlers `install` replaced and clear the flag."""
    for s, old in _state["old"].items():
        signal.signal(s, old)
    _state["old"].clear()
    _state["signum"] = None


def requested() -> int | None:
    """The signal number received since `install()`, or None."""
    return _state["signum"]


def check() -> None:
    """Raise `Interrupted` if a stop signal arrived (between setup phases)."""
    if _state["signum"] is not None:
        raise Interrupted(_state["signum"])
