"""`python -m train ...` (in the repo) / `python -m lora_jax_train ...` (installed) = `lora-jax ...`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
