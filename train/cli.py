"""`lora-jax train RECIPE.yaml [key=value ...] [--resume | --overwrite]` (dispatched by lora_jax.cli).

Parsing is deliberately tiny: one recipe path, two flags, and dotted overrides that
`train.config.load_recipe` validates against the typed schema. `--help` prints every recipe field
from the dataclasses' own metadata. The recipe is fully validated before anything heavy is
imported or loaded, so a typo costs a second, not a model load.

On Linux the command re-executes itself once with glibc malloc tuned for JAX on CPU
(`GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...`: large buffers are
recycled instead of mmapped and zeroed every step); set LORA_JAX_NO_REEXEC=1 to skip it.

>>> main(["--help"]) == 0   # doctest: +ELLIPSIS
usage: lora-jax train ...
True
"""

from __future__ import annotations

import os
import sys

from train.config import help_text, load_recipe

USAGE = """usage: lora-jax train RECIPE.yaml [key=value ...] [--resume] [--overwrite]

Fine-tune a causal LM with LoRA as the recipe says; key=value overrides any recipe field
(e.g. lora.r=16 optim.lr=1e-4 max_steps=50 data.packing=false).

  --resume      continue the run in output_dir from its latest checkpoint
  --overwrite   delete output_dir's previous run first

recipe fields:
"""
MALLOC = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736:glibc.malloc.top_pad=268435456"  # as benchmarks/bench_train_step.py


def parse_args(argv: list[str]) -> tuple[str | None, list[str], dict]:
    """(recipe path, overrides, flags) from the command line.

    >>> parse_args(["r.yaml", "lora.r=4", "--resume"])
    ('r.yaml', ['lora.r=4'], {'resume': True, 'overwrite': False, 'help': False})
    """
    flags = {"resume": False, "overwrite": False, "help": False}
    path, overrides = None, []
    for a in argv:
        if a in ("-h", "--help"):
            flags["help"] = True
        elif a.startswith("--"):
            name = a[2:]
            if name not in ("resume", "overwrite"):
                raise ValueError(f"unknown option {a!r}; options are --resume, --overwrite, --help (fields are key=value)")
            flags[name] = True
        elif "=" in a:
            overrides.append(a)
        elif path is None:
            path = a
        else:
            raise ValueError(f"unexpected argument {a!r}; give one recipe file and key=value overrides")
    return path, overrides, flags


def _maybe_reexec(argv: list[str]) -> None:
    if (sys.platform.startswith("linux") and "GLIBC_TUNABLES" not in os.environ
            and os.environ.get("LORA_JAX_NO_REEXEC") != "1" and os.path.basename(sys.argv[0]) == "lora-jax"):
        env = dict(os.environ, GLIBC_TUNABLES=MALLOC)
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-m", "lora_jax.cli", "train", *argv], env)


def main(argv: list[str]) -> int:
    path, overrides, flags = parse_args(list(argv))
    if flags["help"]:
        print(USAGE + help_text())
        return 0
    if path is None:
        raise ValueError("no recipe given; usage: lora-jax train RECIPE.yaml [key=value ...] (e.g. recipes/smollm2_default.yaml)")
    recipe = load_recipe(path, overrides)
    _maybe_reexec(list(argv))
    from train.loop import TrainingStopped, run

    try:
        return run(recipe, resume=flags["resume"], overwrite=flags["overwrite"])
    except TrainingStopped as e:
        print(f"lora-jax train: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the loop's own handler is installed (loading, first eval)
        print("lora-jax train: interrupted before training started; nothing to save", file=sys.stderr)
        return 130
