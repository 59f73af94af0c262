"""The `lora-jax` command: `lora-jax train RECIPE.yaml [overrides]` and `lora-jax export ...`.

Every user error (bad path, bad value, incompatible files) is printed as one line naming the cause
and the fix, with exit status 2; nothing is written half-way (the subcommands write atomically).
"""

from __future__ import annotations

import sys

USAGE = """usage: lora-jax COMMAND [ARGS]

commands:
  train RECIPE.yaml [key=value ...]   fine-tune with LoRA (lora-jax train --help lists every field)
  export ...                           write a PEFT adapter or a merged HF checkpoint (lora-jax export --help)
"""


class UserError(Exception):
    """An error the user can fix; the CLI prints it as one line and exits 2."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command == "train":
            from train.cli import main as run
        elif command == "export":
            from lora_jax.interop.cli import main as run
        else:
            raise UserError(f"unknown command {command!r}; use 'train' or 'export' (lora-jax --help)")
        return int(run(rest) or 0)
    except (UserError, ValueError, FileNotFoundError, NotADirectoryError, FileExistsError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"lora-jax {command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
