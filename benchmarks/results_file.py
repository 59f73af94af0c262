"""Writing a benchmark's results table: one function shared by the scripts in benchmarks/."""

from __future__ import annotations

import os


def write_results(path: str, text: str) -> None:
    """Write `text` to `path` atomically (a run cut short never leaves half a table), making its folder.

    >>> import tempfile; d = tempfile.mkdtemp(); write_results(os.path.join(d, "r", "t.md"), "| a |")
    >>> open(os.path.join(d, "r", "t.md")).read()
    '| a |\\n'
    """
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as fh:
        fh.write(text if text.endswith("\n") else text + "\n")
    os.replace(path + ".tmp", path)
