#!/usr/bin/env python3
"""Generate the shipped text-to-SQL dataset under data/sql/ — deterministically, from templates.

The task: answer a question about one fixed table with a single SQLite query. The schema is never
shown in the prompt, so the model has to *learn* it (table `staff`, columns `name, dept, city,
salary, age, hire_year`) — the base model guesses names like `employees`/`department` and scores
near zero, a LoRA fine-tune learns them within ~100 steps. Answers are checked by execution
(`train.metrics.sql_execution_accuracy`): a prediction is right when it returns the same rows as
the reference query on the database `data/sql/schema.sql` builds.

Everything (people, numbers, questions) comes from the templates and a seeded `random.Random`, so
the files are license-clean and byte-identical on every run:

    python scripts/make_dataset.py            # rewrites data/sql/{schema.sql,train.jsonl,eval.jsonl}
    python scripts/make_dataset.py --check    # exit 1 if the shipped files differ from a fresh build

Each jsonl line is {"prompt": question, "response": sql}; the templates' `seeds` format turns it
into `<human>: {prompt}\\n<assistant>: {response}`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "data" / "sql"
SEED = 1234
N_EVAL = 200
N_TRAIN = 2400

DEPTS = ["Sales", "Engineering", "Marketing", "Finance", "Support", "Legal"]
CITIES = ["Paris", "Berlin", "Tokyo", "Lima", "Oslo", "Cairo", "Austin", "Madrid"]
FIRST = ["Ada", "Ben", "Chloe", "Dan", "Eva", "Finn", "Gina", "Hugo", "Iris", "Jack", "Kara", "Leo",
         "Mia", "Noah", "Olga", "Paul", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Victor", "Wendy", "Yuri"]
LAST = ["Stone", "Reyes", "Kim", "Novak", "Okafor", "Berg", "Silva", "Tanaka", "Moreau", "Khan"]
SALARY_T = [50000, 60000, 70000, 80000, 90000, 100000]
AGE_T = [25, 30, 35, 40, 45, 50, 55]
YEAR_T = [2012, 2014, 2016, 2018, 2020, 2022]

# (question paraphrases, sql, slots). Slots: d=dept, c=city, n=person name, s=salary, a=age, y=year, k=count
TEMPLATES = [
    (["List the names of staff in {d}.", "Who works in the {d} department?", "Show everyone in {d}."],
     "SELECT name FROM staff WHERE dept = '{d}';", "d"),
    (["How many people work in {c}?", "Count the staff based in {c}.", "What is the number of employees in {c}?"],
     "SELECT COUNT(*) FROM staff WHERE city = '{c}';", "c"),
    (["What is the average salary in {d}?", "Give the mean pay of the {d} team."],
     "SELECT AVG(salary) FROM staff WHERE dept = '{d}';", "d"),
    (["Who earns more than {s}?", "List staff with a salary above {s}.", "Which employees are paid over {s}?"],
     "SELECT name FROM staff WHERE salary > {s};", "s"),
    (["Which employees are younger than {a}?", "List the staff under {a} years old."],
     "SELECT name FROM staff WHERE age < {a};", "a"),
    (["What is the highest salary in {c}?", "What is the top pay in {c}?"],
     "SELECT MAX(salary) FROM staff WHERE city = '{c}';", "c"),
    (["Who was hired after {y}?", "List the staff who joined after {y}."],
     "SELECT name FROM staff WHERE hire_year > {y};", "y"),
    (["List the {d} staff in {c}.", "Who works in {d} in {c}?"],
     "SELECT name FROM staff WHERE dept = '{d}' AND city = '{c}';", "dc"),
    (["Who is the oldest person in {d}?", "Name the oldest employee of {d}."],
     "SELECT name FROM staff WHERE dept = '{d}' ORDER BY age DESC LIMIT 1;", "d"),
    (["Where does {n} work?", "Which city is {n} based in?"],
     "SELECT city FROM staff WHERE name = '{n}';", "n"),
    (["What is {n}'s salary?", "How much does {n} earn?"],
     "SELECT salary FROM staff WHERE name = '{n}';", "n"),
    (["Which department is {n} in?", "What team does {n} belong to?"],
     "SELECT dept FROM staff WHERE name = '{n}';", "n"),
    (["What is the total payroll of {d}?", "How much does {d} pay in total?"],
     "SELECT SUM(salary) FROM staff WHERE dept = '{d}';", "d"),
    (["How many people in {d} are older than {a}?", "Count the {d} staff over {a}."],
     "SELECT COUNT(*) FROM staff WHERE dept = '{d}' AND age > {a};", "da"),
    (["Who are the {k} best paid employees?", "List the top {k} earners."],
     "SELECT name FROM staff ORDER BY salary DESC LIMIT {k};", "k"),
    (["How many people work in {c} and earn more than {s}?"],
     "SELECT COUNT(*) FROM staff WHERE city = '{c}' AND salary > {s};", "cs"),
]


def make_people(rng: random.Random) -> list[tuple]:
    names = [f"{f} {l}" for f in FIRST for l in LAST]
    rng.shuffle(names)
    people = []
    for i, name in enumerate(sorted(names[:60])):
        people.append((i + 1, name, rng.choice(DEPTS), rng.choice(CITIES), rng.randrange(40, 125) * 1000,
                       rng.randrange(22, 65), rng.randrange(2010, 2025)))
    return people


def schema_sql(people: list[tuple]) -> str:
    lines = ["CREATE TABLE staff (id INTEGER PRIMARY KEY, name TEXT, dept TEXT, city TEXT, salary INTEGER, age INTEGER, hire_year INTEGER);"]
    for p in people:
        lines.append("INSERT INTO staff VALUES ({}, '{}', '{}', '{}', {}, {}, {});".format(*p))
    return "\n".join(lines) + "\n"


def examples(people: list[tuple]) -> list[dict]:
    values = {"d": DEPTS, "c": CITIES, "n": [p[1] for p in people], "s": SALARY_T, "a": AGE_T, "y": YEAR_T, "k": [2, 3, 4, 5]}
    out = []
    for questions, sql, slots in TEMPLATES:
        combos = [{}]
        for slot in slots:
            combos = [dict(c, **{slot: v}) for c in combos for v in values[slot]]
        for c in combos:
            for q in questions:
                out.append({"prompt": q.format(**c), "response": sql.format(**c)})
    return out


def build() -> dict[str, str]:
    rng = random.Random(SEED)
    people = make_people(rng)
    rows = examples(people)
    rng.shuffle(rows)
    eval_rows, train_rows = rows[:N_EVAL], rows[N_EVAL:N_EVAL + N_TRAIN]
    dump = lambda rs: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rs)  # noqa: E731
    return {"schema.sql": schema_sql(people), "train.jsonl": dump(train_rows), "eval.jsonl": dump(eval_rows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="compare with the files on disk instead of writing")
    args = parser.parse_args(argv)
    files = build()
    if args.check:
        stale = [n for n, text in files.items() if not (args.out / n).is_file() or (args.out / n).read_text() != text]
        if stale:
            print(f"stale: {', '.join(stale)} (run scripts/make_dataset.py)", file=sys.stderr)
            return 1
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_text(text)
    print(f"wrote {args.out}: " + ", ".join(f"{n} ({len(t.splitlines())} lines)" for n, t in files.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
