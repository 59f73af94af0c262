"""The `lora-jax` command: `lora-jax train RECIPE.yaml [key=value ...]` and `lora-jax export ...`.

Installed as the console script `lora-jax` (package `lora_jax_train`, this folder); in the repo
`python -m train ...` is the same. Exit status: 0 done, 1 stopped (non-finite or diverging loss),
2 user error, 130 Ctrl-C (SIGINT), 143 SIGTERM — both save a checkpoint once training runs.

User errors print one line naming the cause and the fix: a `lora_jax.errors.UserError`, or a
ValueError/OSError that lora_jax or this program raise themselves (a `raise` statement in their
code: the library's convention). Anything else — JAX's, numpy's or orbax's own errors, a bug —
is an internal error and keeps its traceback.

Signal handlers are installed first thing (`train.signals`), before JAX is imported, so a Ctrl-C
at any moment is honoured. On Linux `train` re-executes itself once with glibc malloc tuned for
JAX on CPU (`GLIBC_TUNABLES=glibc.malloc.mmap_max=0:...`: large buffers recycled instead of
mmapped and zeroed every step); set LORA_JAX_NO_REEXEC=1 to skip it.

>>> main(["train", "--help"]) == 0   # doctest: +ELLIPSIS
usage: lora-jax train ...
True
>>> parse_args(["r.yaml", "lora.r=4", "--resume"])
('r.yaml', ['lora.r=4'], {'resume': True, 'overwrite': False, 'eval_only': False, 'help': False})
"""

from __future__ import annotations

import linecache
import os
import sys

# Nothing heavy at import time (lora_jax imports JAX): `train` installs the signal handlers first.
USAGE = """usage: lora-jax COMMAND [ARGS]

commands:
  train RECIPE.yaml [key=value ...]   fine-tune with LoRA (lora-jax train --help lists every field)
  export ...                           write a PEFT adapter or a merged HF checkpoint (lora-jax export --help)
"""
TRAIN_USAGE = """usage: lora-jax train RECIPE.yaml [key=value ...] [--resume | --overwrite | --eval-only]

Fine-tune a causal LM with LoRA as the recipe says; key=value overrides any recipe field
(e.g. lora.r=16 optim.lr=1e-4 max_steps=50 data.packing=false).

  --resume      continue the run in output_dir from its latest checkpoint (the recipe may change only
                in fields that do not alter the training trajectory: logging/eval/save intervals, ...)
  --overwrite   delete output_dir's previous run first
  --eval-only   train nothing, write nothing: eval loss, metric and sample answers of output_dir's adapter
                (its final one, else its newest checkpoint's), or of the base model when output_dir holds no run

recipe fields:
"""
MALLOC = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736:glibc.malloc.top_pad=268435456"  # as benchmarks/bench_train_step.py
OURS = ("lora_jax", __package__ or "train")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        from . import signals

        signals.install()  # first: a Ctrl-C during imports, loading or compiling is not lost
    from lora_jax.errors import UserError

    try:
        if command == "train":
            return train(rest)
        if command == "export":
            from .export import main as export

            return int(export(rest) or 0)
        raise UserError(f"unknown command {command!r}; use 'train' or 'export' (lora-jax --help)")
    except (ValueError, OSError) as e:
        if not is_user_error(e):
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"lora-jax {command}: error: {msg}", file=sys.stderr)
        return 2


def is_user_error(e: BaseException) -> bool:
    """A UserError, or a ValueError/OSError raised by a `raise` statement in lora_jax or this program."""
    from lora_jax.errors import UserError

    if isinstance(e, UserError):
        return True
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    frame = tb.tb_frame
    ours = str(frame.f_globals.get("__name__", "")).split(".")[0] in OURS
    return ours and linecache.getline(frame.f_code.co_filename, tb.tb_lineno).lstrip().startswith("raise")


# -- lora-jax train --------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> tuple[str | None, list[str], dict]:
    """(recipe path, overrides, flags) of `lora-jax train`'s arguments."""
    from lora_jax.errors import UserError

    flags = {"resume": False, "overwrite": False, "eval_only": False, "help": False}
    path, overrides = None, []
    for a in argv:
        if a in ("-h", "--help"):
            flags["help"] = True
        elif a.startswith("--"):
            name = a[2:].replace("-", "_")
            if name not in ("resume", "overwrite", "eval_only"):
                raise UserError(f"unknown option {a!r}; options are --resume, --overwrite, --eval-only, --help (fields are key=value)")
            flags[name] = True
        elif "=" in a:
            overrides.append(a)
        elif path is None:
            path = a
        else:
            raise UserError(f"unexpected argument {a!r}; give one recipe file and key=value overrides")
    return path, overrides, flags


def _maybe_reexec(argv: list[str]) -> None:
    if (sys.platform.startswith("linux") and "GLIBC_TUNABLES" not in os.environ
            and os.environ.get("LORA_JAX_NO_REEXEC") != "1" and os.path.basename(sys.argv[0]) == "lora-jax"):
        env = dict(os.environ, GLIBC_TUNABLES=MALLOC)
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-m", OURS[1], "train", *argv], env)


def train(argv: list[str]) -> int:
    from lora_jax.errors import UserError

    from . import signals

    signals.install()  # (again: `main` did it already unless train() is called directly)
    try:
        path, overrides, flags = parse_args(list(argv))
        if flags["help"]:
            from .config import help_text

            print(TRAIN_USAGE + help_text())
            return 0
        if path is None:
            raise UserError("no recipe given; usage: lora-jax train RECIPE.yaml [key=value ...] (e.g. recipes/smollm2_default.yaml)")
        from .config import load_recipe

        recipe = load_recipe(path, overrides)
        _maybe_reexec(list(argv))
        from .loop import TrainingStopped, run

        try:
            return run(recipe, resume=flags["resume"], overwrite=flags["overwrite"], eval_only=flags["eval_only"])
        except TrainingStopped as e:
            print(f"lora-jax train: stopped: {e}", file=sys.stderr)
            return 1
        except signals.Interrupted as e:  # before the loop could save anything
            print(f"lora-jax train: {e.signame} before training started; nothing saved", file=sys.stderr)
            return e.exit_code
    finally:
        signals.restore()


if __name__ == "__main__":
    sys.exit(main())
