"""`lora-jax export`: a base model + an adapter -> a PEFT adapter directory or a merged HF checkpoint.

    lora-jax export --base MODEL (HF dir or .gguf) --adapter ADAPTER --format peft|merged --out DIR
                    [--dtype bf16|fp16|fp32] [--max-shard-size 5GB] [--overwrite]

ADAPTER is a PEFT adapter directory (adapter_config.json + adapter_model.safetensors), or a
training output directory (`lora-jax train`'s output_dir): its final `adapter/` when the run
finished, else the adapter of its newest checkpoint (`checkpoints/<step>/adapter`, which the
program writes at every save). Only adapters are read, never training state: a checkpoint
written on any mesh, by any number of processes, exports on one CPU. The adapter is loaded onto
the base model first, through the same checks as any PEFT adapter, so every shape is verified
before anything is written. `--format merged` copies the base directory's tokenizer and
generation config files.
"""

from __future__ import annotations

import argparse
import os

from lora_jax.errors import MissingFileError, UserError
from lora_jax.interop.adapter import CONFIG_FILE, load_peft_adapter, save_peft_adapter
from lora_jax.interop.merged import DTYPES, save_merged


def resolve_adapter(path: str) -> tuple[str, str]:
    """(PEFT adapter directory, a description) for a PEFT dir or a training output dir.

    >>> resolve_adapter("/nonexistent")
    Traceback (most recent call last):
    ...
    lora_jax.errors.MissingFileError: adapter path /nonexistent does not exist
    """
    if not os.path.exists(path):
        raise MissingFileError(f"adapter path {path} does not exist")
    for candidate in (path, os.path.join(path, "adapter")):
        if os.path.isfile(os.path.join(candidate, CONFIG_FILE)):
            return candidate, candidate
    ckpts = os.path.join(path, "checkpoints")
    if os.path.isdir(ckpts):
        steps = sorted((int(n) for n in os.listdir(ckpts) if n.isdigit()), reverse=True)
        for step in steps:
            d = os.path.join(ckpts, str(step), "adapter")
            if os.path.isfile(os.path.join(d, CONFIG_FILE)):
                return d, f"{path} (checkpoint step {step})"
        raise MissingFileError(f"{path} is a training run with no adapter yet (no checkpoints/<step>/adapter); "
                               "train until a checkpoint is saved (save_steps) or pass a PEFT adapter directory")
    raise MissingFileError(f"{path} is neither a PEFT adapter directory ({CONFIG_FILE}) nor a lora-jax train output_dir")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 via the lora-jax command
        raise UserError(f"{message} (lora-jax export --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lora-jax export", description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="base model: Hugging Face checkpoint directory, .gguf file or 'default' (the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", required=True, help="PEFT adapter directory or training output directory")
    p.add_argument("--format", required=True, choices=("peft", "merged"), help="what to write")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--dtype", default="float32", help="merged weights dtype: fp32 (default), bf16, fp16")
    p.add_argument("--max-shard-size", default="5GB", help="merged: shard above this size (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run `lora-jax export`; user errors raise one-line errors (the `lora-jax` command prints them).

    >>> main(["--base", "/nonexistent", "--adapter", "/x", "--format", "peft", "--out", "/tmp/o"])
    Traceback (most recent call last):
    ...
    FileNotFoundError: checkpoint path /nonexistent does not exist
    """
    args = _parser().parse_args(argv)
    if args.dtype not in DTYPES:
        raise UserError(f"--dtype {args.dtype!r} is not supported; use fp32, bf16 or fp16")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        raise UserError(f"{args.out} exists and is not empty; pass --overwrite or choose another --out")
    from lora_jax.models import from_pretrained
    from lora_jax.models.gguf import resolve_model_path
    from lora_jax.models.loading import check_checkpoint

    from .hub import looks_like_hub_name, model_snapshot

    args.base = resolve_model_path(args.base)  # 'default' = the embedded SmolLM2 GGUF, as the training program takes it
    if not os.path.exists(args.base) and looks_like_hub_name(args.base):
        args.base = model_snapshot(args.base, "--base")  # a Hub name: its cached snapshot or a download
    check_checkpoint(args.base)
    adapter_dir, described = resolve_adapter(args.adapter)
    model, params, hf_config = from_pretrained(args.base)
    params, lora_config = load_peft_adapter(params, adapter_dir)
    if args.format == "peft":
        out = save_peft_adapter(params, lora_config, args.out, model_config=model.cfg,
                                base_model_name_or_path=os.path.abspath(args.base), overwrite=args.overwrite)
    else:
        base_dir = None if args.base.endswith(".gguf") else args.base
        out = save_merged(params, lora_config, args.out, hf_config=hf_config, dtype=args.dtype, tokenizer=base_dir,
                          max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    print(f"wrote {args.format} export of {described} to {out}")
    return 0
