"""`lora-jax export`: a base model + an adapter -> a PEFT adapter directory or a merged HF checkpoint.

    lora-jax export --base MODEL (HF dir or .gguf) --adapter ADAPTER --format peft|merged --out DIR
                    [--dtype bf16|fp16|fp32] [--max-shard-size 5GB] [--overwrite]

ADAPTER is a PEFT adapter directory (adapter_config.json + adapter_model.safetensors), or a
training output directory (`lora-jax train`'s output_dir): its final `adapter/` when the run
finished, else the LoRA weights of its newest checkpoint (`checkpoints/<step>`, with the LoRA
config from `run.json`). The adapter is always loaded onto the base model first, through the same
checks as any PEFT adapter, so every shape is verified before anything is written.
`--format merged` copies the base directory's tokenizer and generation config files.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np

from lora_jax.config import LoraConfig

from lora_jax.interop.adapter import CONFIG_FILE, load_peft_adapter, save_peft_adapter
from lora_jax.interop.merged import DTYPES, save_merged


def resolve_adapter(path: str) -> str:
    """The PEFT adapter directory for a PEFT dir or a training output dir.

    >>> resolve_adapter("/nonexistent")
    Traceback (most recent call last):
    ...
    FileNotFoundError: adapter path /nonexistent does not exist
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"adapter path {path} does not exist")
    for candidate in (path, os.path.join(path, "adapter")):
        if os.path.isfile(os.path.join(candidate, CONFIG_FILE)):
            return candidate
    raise FileNotFoundError(f"{path} is neither a PEFT adapter directory ({CONFIG_FILE}) nor a training output with adapter/")


def _is_training_run(path: str) -> bool:
    """A `lora-jax train` output dir without a final adapter/, but with checkpoints and run.json."""
    return (not os.path.isfile(os.path.join(path, "adapter", CONFIG_FILE)) and not os.path.isfile(os.path.join(path, CONFIG_FILE))
            and os.path.isdir(os.path.join(path, "checkpoints")))


def read_training_checkpoint(run_dir: str, step: int | None = None) -> tuple[dict, LoraConfig, int]:
    """(LoRA leaves as numpy, LoraConfig, step) of a training run's newest (or given) checkpoint.

    >>> read_training_checkpoint("/nonexistent")
    Traceback (most recent call last):
    ...
    FileNotFoundError: /nonexistent has no run.json; pass a lora-jax train output_dir or a PEFT adapter directory
    """
    run_file = os.path.join(run_dir, "run.json")
    if not os.path.isfile(run_file):
        raise FileNotFoundError(f"{run_dir} has no run.json; pass a lora-jax train output_dir or a PEFT adapter directory")
    with open(run_file) as f:
        lora_config = LoraConfig.from_peft_dict(json.load(f)["lora"])
    import jax

    from lora_jax.training.checkpoint import Checkpointer

    with Checkpointer(os.path.join(run_dir, "checkpoints"), max_to_keep=None) as ckpt:
        step = ckpt.latest_step() if step is None else step
        state, _ = ckpt.restore(step)
    return jax.tree_util.tree_map(np.asarray, state["lora"]), lora_config, int(step)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 via lora_jax.cli
        raise ValueError(f"{message} (lora-jax export --help)")


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
    """Run `lora-jax export`; user errors raise ValueError / FileNotFoundError (lora_jax.cli prints them).

    >>> main(["--base", "/nonexistent", "--adapter", "/x", "--format", "peft", "--out", "/tmp/o"])
    Traceback (most recent call last):
    ...
    FileNotFoundError: checkpoint path /nonexistent does not exist
    """
    args = _parser().parse_args(argv)
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype {args.dtype!r} is not supported; use fp32, bf16 or fp16")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        raise FileExistsError(f"{args.out} exists and is not empty; pass --overwrite or choose another --out")
    from lora_jax.models import from_pretrained
    from lora_jax.models.gguf import resolve_model_path

    args.base = resolve_model_path(args.base)  # 'default' = the embedded GGUF, as the training program takes it
    model, params, hf_config = from_pretrained(args.base)
    if _is_training_run(args.adapter):
        with tempfile.TemporaryDirectory() as tmp:
            lora, lora_config, step = read_training_checkpoint(args.adapter)
            try:
                save_peft_adapter(lora, lora_config, os.path.join(tmp, "a"), model_config=model.cfg)
            except ValueError as e:
                raise ValueError(f"checkpoint step {step} of {args.adapter} does not fit --base {args.base}: {e}") from None
            params, lora_config = load_peft_adapter(params, os.path.join(tmp, "a"))
        adapter_dir = f"{args.adapter} (checkpoint step {step})"
    else:
        adapter_dir = resolve_adapter(args.adapter)
        params, lora_config = load_peft_adapter(params, adapter_dir)
    if args.format == "peft":
        out = save_peft_adapter(params, lora_config, args.out, model_config=model.cfg,
                                base_model_name_or_path=os.path.abspath(args.base), overwrite=args.overwrite)
    else:
        base_dir = None if args.base.endswith(".gguf") else args.base
        out = save_merged(params, lora_config, args.out, hf_config=hf_config, dtype=args.dtype, tokenizer=base_dir,
                          max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    print(f"wrote {args.format} export of {adapter_dir} to {out}")
    return 0
