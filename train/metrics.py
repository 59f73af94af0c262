"""Task metrics on generated answers: exact match, and execution accuracy for text-to-SQL.

`sql_execution_accuracy` runs the predicted and the reference query on the same in-memory SQLite
database (built from the script at `data.metric_db`) and counts a prediction right when both
return the same rows — as a multiset, or as a list when the reference has ORDER BY. Floats are
rounded (AVG). A prediction that is not a query, fails to run or runs too long scores 0. Only
the first statement of the answer counts (`extract_sql`), so chatty answers are judged by the SQL
they contain.
"""

from __future__ import annotations

import re
import sqlite3
from collections import Counter

from lora_jax.errors import UserError

_SQL = re.compile(r"\b(SELECT|WITH)\b.*?(;|$)", re.IGNORECASE | re.DOTALL)


def extract_sql(text: str) -> str:
    """The first SELECT/WITH statement in `text` (code fences and prose around it dropped).

    >>> extract_sql("Sure! ```sql\\nSELECT name FROM staff;\\n``` done")
    'SELECT name FROM staff;'
    """
    m = _SQL.search(text.replace("```sql", " ").replace("```", " "))
    return m.group(0).strip() if m else ""


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions equal to their reference after whitespace normalisation.

    >>> exact_match(["a  b", "c"], ["a b", "d"])
    0.5
    """
    norm = lambda s: " ".join(s.split())  # noqa: E731
    return sum(norm(p) == norm(r) for p, r in zip(predictions, references)) / max(len(references), 1)


def open_db(script: str) -> sqlite3.Connection:
    """An in-memory SQLite database built by the SQL script at path `script` (a broken script: one line)."""
    conn = sqlite3.connect(":memory:")
    with open(script) as fh:
        text = fh.read()
    try:
        conn.executescript(text)
    except (sqlite3.Error, sqlite3.Warning) as e:
        conn.close()
        raise UserError(f"data.metric_db {script!r} is not a script SQLite can run ({e}); fix it") from None
    return conn


def check_references(references: list[str], db_script: str) -> None:
    """Build the database and run every reference query once, before training: a broken script or
    reference is a one-line error naming it, not a crash at the first metric.

    >>> import tempfile, os
    >>> db = os.path.join(tempfile.mkdtemp(), "s.sql")
    >>> _ = open(db, "w").write("CREATE TABLE t (x INT);")
    >>> check_references(["SELECT x FROM t;", "SELECT y FROM t;"], db)
    Traceback (most recent call last):
    ...
    lora_jax.errors.UserError: data.metric=sql_exec: the reference answer of metric example 2 fails on data.metric_db (no such column: y): 'SELECT y FROM t;'; fix that eval row
    """
    conn = open_db(db_script)
    try:
        for i, ref in enumerate(references, start=1):
            try:
                _rows(conn, ref, False)
            except (sqlite3.Error, sqlite3.Warning, ValueError) as e:
                shown = ref if len(ref) <= 60 else ref[:57] + "..."
                raise UserError(f"data.metric=sql_exec: the reference answer of metric example {i} fails on data.metric_db "
                                f"({e}): {shown!r}; fix that eval row") from None
    finally:
        conn.close()


def _rows(conn: sqlite3.Connection, sql: str, ordered: bool):
    steps = [0]

    def guard():  # abort runaway queries (cross joins a fresh model may invent)
        steps[0] += 1
        return 1 if steps[0] > 200 else 0

    conn.set_progress_handler(guard, 10000)
    try:
        rows = conn.execute(sql).fetchmany(10000)
    finally:
        conn.set_progress_handler(None, 0)
    rows = [tuple(round(v, 4) if isinstance(v, float) else v for v in r) for r in rows]
    return rows if ordered else Counter(rows)


def sql_execution_accuracy(predictions: list[str], references: list[str], db_script: str) -> float:
    """Fraction of predicted queries returning the reference query's rows on the database.

    >>> import tempfile, os
    >>> db = os.path.join(tempfile.mkdtemp(), "s.sql")
    >>> _ = open(db, "w").write("CREATE TABLE t (x INT); INSERT INTO t VALUES (1), (2);")
    >>> sql_execution_accuracy(["SELECT x FROM t WHERE x > 1;", "nope"], ["SELECT 2;", "SELECT 1;"], db)
    0.5
    """
    conn = open_db(db_script)
    right = 0
    for pred, ref in zip(predictions, references):
        ordered = "order by" in ref.lower()
        gold = _rows(conn, ref, ordered)
        sql = extract_sql(pred)
        if not sql:
            continue
        try:
            right += _rows(conn, sql, ordered) == gold
        except (sqlite3.Error, sqlite3.Warning, ValueError):
            pass
    conn.close()
    return right / max(len(references), 1)


def task_metric(name: str, predictions: list[str], references: list[str], db_script: str | None = None) -> float | None:
    """The metric `data.metric` names, or None for 'none'."""
    if name == "none" or not references:
        return None
    if name == "exact_match":
        return exact_match(predictions, references)
    if name == "sql_exec":
        return sql_execution_accuracy(predictions, references, db_script)
    raise UserError(f"unknown data.metric {name!r}")
