"""The recipe: typed, frozen, validated dataclasses loaded from YAML plus dotted CLI overrides.

    lora-jax train recipes/smollm2_default.yaml lora.r=16 optim.lr=1e-4 max_steps=50

The schema *is* these dataclasses: OmegaConf merges `schema <- YAML <- overrides` as a structured
config (types enforced: `lora.r=abc` is an error naming the key), then `OmegaConf.to_object`
builds the dataclasses, whose `__post_init__` checks values (`optim.lr=0` -> "optim.lr must be
> 0"). Before any merge every key is checked against the schema, so a typo fails in one line that
suggests the closest field (difflib). `help_text()` renders every field, its type, default and the
`help` from the field's metadata — that is what `lora-jax train --help` prints; no hand-written
argparse mirrors the fields.

>>> r = load_recipe(None, ["lora.r=4", "max_steps=3"])
>>> (r.lora.r, r.max_steps, r.to_lora_config().r)
(4, 3, 4)
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from typing import Any, Dict, List, Optional

from lora_jax.config import LoraConfig
from lora_jax.errors import MissingFileError, UserError

F = dataclasses.field


def _f(default: Any, help: str, **kw) -> Any:  # noqa: A002
    """A dataclass field with a `help` string (lists/dicts become default factories)."""
    if isinstance(default, (list, dict)):
        return F(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return F(default=default, metadata={"help": help}, **kw)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


def _one_of(name: str, value: Any, choices: tuple) -> None:
    _check(value in choices, f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelSection:
    path: str = _f("default", "HF model directory (config.json + safetensors), a Hub name (the local HF cache's copy; downloaded only when the Hub is reachable), a .gguf file, or 'default' = the embedded SmolLM2-135M-Instruct GGUF")
    dtype: str = _f("auto", "dtype of the frozen base weights: auto (= the compute precision: bfloat16 under "
                            "precision bf16) | float32 | bfloat16")
    scan_layers: bool = _f(True, "stack the decoder layers under nn.scan (faster compile)")
    remat: Any = _f("auto", "recompute activations in the backward pass: auto (the platform's default: none on "
                            "CPU, save_projections on GPU/TPU) | false | true (= full: least memory, ~+25% compute) | "
                            "save_projections (keeps projection outputs: most of the saving, little recompute) | "
                            "a jax.checkpoint_policies name")
    attention: str = _f("auto", "attention implementation: auto (the fastest exact one for the platform, logged) | "
                                "reference | xla | cudnn (NVIDIA GPU, bf16) | splash (TPU)")
    quantize: str = _f("none", "frozen base kernels in 4 or 8 bits (QLoRA): none | nf4 | int8 (embeddings, norms, "
                               "LM head stay in model.dtype; a bitsandbytes 4-bit checkpoint is NF4 as stored)")
    quant_block_size: int = _f(64, "weights per quantization block (absmax scale) for model.quantize")
    double_quant: bool = _f(True, "quantize the block scales again to 8 bits (QLoRA's double quantization)")

    def __post_init__(self):
        _check(bool(self.path), "model.path is empty; give an HF model directory, a .gguf file or 'default'")
        _one_of("model.dtype", self.dtype, ("auto", "float32", "bfloat16"))
        _one_of("model.attention", self.attention, ("auto", "reference", "xla", "cudnn", "splash"))
        _one_of("model.quantize", self.quantize, ("none", "nf4", "int8"))
        try:
            self.quant_config()
        except ValueError as e:
            raise UserError(f"model.quant_block_size: {e}") from None
        from lora_jax.models.stack import remat_policy

        try:
            if self.remat_option() != "auto":
                remat_policy(self.remat_option())
        except ValueError as e:
            raise UserError(f"model.remat: {e}") from None

    def quant_config(self):
        """`lora_jax.quant.QuantConfig` for `from_pretrained(quantize=...)`, or None.

        >>> ModelSection(quantize="nf4").quant_config().scheme, ModelSection().quant_config()
        ('nf4', None)
        """
        from lora_jax.quant import QuantConfig

        if self.quantize == "none":
            QuantConfig("nf4", self.quant_block_size)  # validate the block size anyway
            return None
        return QuantConfig(self.quantize, self.quant_block_size, self.double_quant)

    def remat_option(self) -> str | None:
        """The models' `remat` argument: "auto", None, "full" or a policy name.

        >>> ModelSection(remat=True).remat_option(), ModelSection(remat="save_projections").remat_option()
        ('full', 'save_projections')
        """
        if isinstance(self.remat, bool) or self.remat is None:
            return "full" if self.remat else None
        return {"none": None, "false": None, "true": "full"}.get(str(self.remat).lower(), str(self.remat))


@dataclasses.dataclass(frozen=True)
class LoraSection:
    r: int = _f(8, "rank of every adapter (rank_pattern overrides per module)")
    alpha: float = _f(16.0, "scale numerator: scale = alpha / r (alpha / sqrt(r) with use_rslora)")
    dropout: float = _f(0.0, "dropout on the adapter input while training, in [0, 1)")
    target_modules: Any = _f(["q_proj", "v_proj"], "module names (suffix match), one regex string, or 'all-linear'")
    exclude_modules: Any = _f(None, "module names or regex never adapted")
    rank_pattern: Dict[str, int] = _f({}, "{regex: rank} overriding r for matching modules")
    alpha_pattern: Dict[str, float] = _f({}, "{regex: alpha} overriding alpha for matching modules")
    use_rslora: bool = _f(False, "rank-stabilised scale alpha / sqrt(r)")
    init: str = _f("default", "A's init: default (Kaiming-uniform, as PEFT) | gaussian; B starts at 0")
    use_dora: bool = _f(False, "DoRA: a trained magnitude per output unit (PEFT's use_dora)")

    def __post_init__(self):
        for k in ("target_modules", "exclude_modules"):
            v = getattr(self, k)
            _check(v is None or isinstance(v, str) or (isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)),
                   f"lora.{k} must be a module name list, one regex string or 'all-linear'; got {v!r}")
        self.to_lora_config()  # LoraConfig validates every field with its own one-line errors

    def to_lora_config(self) -> LoraConfig:
        """The core `LoraConfig` (adapters kept in fp32: the master copy under bf16 compute)."""
        try:
            tm, ex = self.target_modules, self.exclude_modules
            return LoraConfig(r=self.r, alpha=self.alpha, dropout=self.dropout,
                              target_modules=tm if tm is None or isinstance(tm, str) else tuple(tm),
                              exclude_modules=ex if ex is None or isinstance(ex, str) else tuple(ex),
                              rank_pattern=dict(self.rank_pattern), alpha_pattern=dict(self.alpha_pattern),
                              use_rslora=self.use_rslora, init=self.init, dtype="float32", use_dora=self.use_dora)
        except ValueError as e:
            raise UserError(str(e).replace("LoraConfig.", "lora.")) from None


def _check_format(template: str) -> None:
    """A format string holds {prompt} once, and may end its prompt part with {response} (nothing else in braces)."""
    import string

    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise UserError(f"data.template {template!r} is not a valid format string ({e}); write braces as {{{{ }}}}") from None
    _check(fields.count("prompt") == 1 and set(fields) <= {"prompt", "response"} and fields.count("response") <= 1
           and fields[0] == "prompt" and "{prompt}" in template and ("response" not in fields or "{response}" in template),
           f"data.template must be 'seeds', 'chat' or a format string with {{prompt}} (and optionally {{response}} after it, "
           f"nothing else in braces); got {template!r}")


@dataclasses.dataclass(frozen=True)
class DataSection:
    path: str = _f("data/sql/train.jsonl", "HF hub dataset name, or a local .json/.jsonl/.csv/.parquet file or directory (datasets.load_dataset)")
    name: Optional[str] = _f(None, "dataset configuration name (hub datasets with several configs)")
    split: str = _f("train", "split to train on")
    prompt_column: str = _f("prompt", "column holding the prompt / instruction")
    response_column: str = _f("response", "column holding the answer the model learns (the loss is on it only)")
    template: str = _f("seeds", "'seeds' = '<human>: {prompt}\\n<assistant>: {response}', 'chat' = the tokenizer's chat template (the loss on the answer and the template's end of turn, as TRL's SFTTrainer), or a format string with {prompt} and optionally {response} ('Q: {prompt}\\nA: {response}'; without it the response follows after one space)")
    max_length: int = _f(128, "tokens per sequence; longer examples are dropped (counted and reported)")
    packing: bool = _f(True, "pack several examples per sequence (segment-aware attention, positions restart)")
    shuffle_seed: Optional[int] = _f(None, "seed of the example order (default: the run's seed)")
    eval_path: Optional[str] = _f(None, "separate eval dataset (same forms as path); default: eval_split / eval_fraction of path")
    eval_split: Optional[str] = _f(None, "split of the eval dataset (default: 'train' for eval_path, else none)")
    eval_fraction: float = _f(0.0, "fraction of the training data held out for eval when no eval dataset is given")
    max_eval_examples: int = _f(256, "cap on eval examples for the eval loss (0 = all)")
    metric: str = _f("none", "task metric on eval generations: none | exact_match | sql_exec")
    metric_db: Optional[str] = _f(None, "sql_exec: SQL script building the SQLite database the queries run on")
    metric_examples: int = _f(32, "eval examples generated for the task metric (before and after training)")

    def __post_init__(self):
        _check(bool(self.path), "data.path is empty; give a dataset name or a local file")
        _check(bool(self.template), "data.template is empty; use seeds, chat or a format string with {prompt}")
        if self.template not in ("seeds", "chat"):
            _check_format(self.template)
        _check(self.max_length >= 8, f"data.max_length must be >= 8, got {self.max_length}")
        _check(0.0 <= self.eval_fraction < 1.0, f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        _check(self.max_eval_examples >= 0, f"data.max_eval_examples must be >= 0, got {self.max_eval_examples}")
        _check(self.metric_examples >= 0, f"data.metric_examples must be >= 0, got {self.metric_examples}")
        _one_of("data.metric", self.metric, ("none", "exact_match", "sql_exec"))
        _check(self.metric != "sql_exec" or bool(self.metric_db), "data.metric=sql_exec needs data.metric_db (an SQL script that builds the database)")
        _check(self.prompt_column != self.response_column, "data.prompt_column and data.response_column must differ")
        _check(self.metric == "none" or self.metric_examples >= 1,
               f"data.metric={self.metric} with data.metric_examples=0 measures nothing; set metric_examples >= 1 or metric=none")


@dataclasses.dataclass(frozen=True)
class OptimSection:
    name: str = _f("adamw", "optimizer: adamw | adamw_8bit (both moments in blockwise 8-bit, as bitsandbytes' AdamW8bit)")
    lr: float = _f(2e-4, "peak learning rate of AdamW")
    b1: float = _f(0.9, "AdamW beta1")
    b2: float = _f(0.999, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    weight_decay: float = _f(0.0, "decoupled weight decay on the adapters")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 = off)")
    schedule: str = _f("cosine", "learning-rate schedule after warmup: cosine | linear | constant")
    warmup_ratio: float = _f(0.0, "warmup as a fraction of the total steps")
    warmup_steps: int = _f(0, "warmup steps (overrides warmup_ratio when > 0)")
    min_lr_ratio: float = _f(0.0, "final lr of cosine/linear decay, as a fraction of lr")
    loraplus_lr_ratio: float = _f(1.0, "LoRA+: B's learning rate is lr times this (PEFT's loraplus_lr_ratio; 1 = plain LoRA)")

    def __post_init__(self):
        _one_of("optim.name", self.name, ("adamw", "adamw_8bit"))
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(0 <= self.b1 < 1 and 0 <= self.b2 < 1, f"optim.b1 and optim.b2 must be in [0, 1), got {self.b1}, {self.b2}")
        _check(self.eps > 0, f"optim.eps must be > 0, got {self.eps}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        _one_of("optim.schedule", self.schedule, ("cosine", "linear", "constant"))
        _check(0 <= self.warmup_ratio < 1, f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.min_lr_ratio == 0 or self.schedule != "constant",
               f"optim.min_lr_ratio={self.min_lr_ratio} is the end of a decay; optim.schedule=constant has none (set cosine or linear)")
        _check(self.loraplus_lr_ratio > 0, f"optim.loraplus_lr_ratio must be > 0 (1 = off), got {self.loraplus_lr_ratio}")


@dataclasses.dataclass(frozen=True)
class MeshSection:
    data: int = _f(-1, "data-parallel axis size (-1 = all devices left over)")
    fsdp: int = _f(1, "fully-sharded-data-parallel axis size (shards the frozen weights)")
    tensor: int = _f(1, "tensor-parallel axis size")

    def __post_init__(self):
        for k in ("data", "fsdp", "tensor"):
            v = getattr(self, k)
            _check(v == -1 or v >= 1, f"mesh.{k} must be >= 1 or -1, got {v}")


@dataclasses.dataclass(frozen=True)
class DistributedSection:
    coordinator_address: Optional[str] = _f(None, "host:port of process 0 for a multi-process run (default: env "
                                                  "JAX_COORDINATOR_ADDRESS, or what jax.distributed detects on SLURM/TPU/MPI)")
    num_processes: Optional[int] = _f(None, "processes in the job (default: env JAX_NUM_PROCESSES / WORLD_SIZE)")
    process_id: Optional[int] = _f(None, "this process's index (default: env JAX_PROCESS_ID / RANK); usually set per process by env")

    def __post_init__(self):
        _check(self.num_processes is None or self.num_processes >= 1, f"distributed.num_processes must be >= 1, got {self.num_processes}")
        _check(self.process_id is None or self.process_id >= 0, f"distributed.process_id must be >= 0, got {self.process_id}")


@dataclasses.dataclass(frozen=True)
class DivergenceSection:
    loss_vs_start: float = _f(3.0, "stop when the loss stays above this many times the first step's loss for `patience` steps (0 = off)")
    loss_vs_mean: float = _f(5.0, "stop when the loss stays above this many times its running mean for `patience` steps (0 = off)")
    grad_collapse: float = _f(1e-4, "stop when the gradient norm stays below this fraction of the first step's for `patience` steps (0 = off)")
    patience: int = _f(5, "consecutive suspicious steps before the run is stopped (no checkpoint is saved while suspicious)")
    window: int = _f(20, "steps the running mean of the loss averages over (exponential)")

    def __post_init__(self):
        for k in ("loss_vs_start", "loss_vs_mean"):
            v = getattr(self, k)
            _check(v == 0 or v > 1, f"divergence.{k} must be > 1 (or 0 = off), got {v}")
        _check(0 <= self.grad_collapse < 1, f"divergence.grad_collapse must be in [0, 1) (0 = off), got {self.grad_collapse}")
        _check(self.patience >= 1, f"divergence.patience must be >= 1, got {self.patience}")
        _check(self.window >= 1, f"divergence.window must be >= 1, got {self.window}")


@dataclasses.dataclass(frozen=True)
class Recipe:
    model: ModelSection = F(default_factory=ModelSection)
    lora: LoraSection = F(default_factory=LoraSection)
    data: DataSection = F(default_factory=DataSection)
    optim: OptimSection = F(default_factory=OptimSection)
    mesh: MeshSection = F(default_factory=MeshSection)
    distributed: DistributedSection = F(default_factory=DistributedSection)
    divergence: DivergenceSection = F(default_factory=DivergenceSection)
    batch_size: int = _f(8, "sequences per optimizer step (split into grad_accum micro-batches)")
    grad_accum: int = _f(1, "micro-batches per optimizer step (memory knob: the update is the same)")
    max_steps: int = _f(0, "optimizer steps (0 = derive from epochs)")
    epochs: float = _f(1.0, "passes over the training data when max_steps = 0")
    precision: str = _f("fp32", "compute dtype: fp32 | bf16 (bf16 compute and frozen weights; LoRA master weights, "
                                "optimizer state, softmax and loss in fp32)")
    logging_steps: int = _f(10, "log loss / lr / grad norm / throughput every N steps")
    eval_steps: int = _f(0, "eval loss every N steps (0 = only before and after)")
    save_steps: int = _f(0, "checkpoint every N steps (0 = only at the end)")
    save_total_limit: int = _f(2, "checkpoints kept (oldest deleted)")
    output_dir: str = _f("runs/default", "where checkpoints, logs, plots and the adapter go")
    seed: int = _f(0, "seed of the LoRA init, dropout and (by default) the data order")
    sample_prompts: List[str] = _f([], "prompts generated before and after training (default: the first eval prompts)")
    max_new_tokens: int = _f(48, "tokens generated per sample prompt / metric example (0 = no samples, no metric)")
    export_merged: bool = _f(False, "also write the merged model (base + ΔW) as an HF checkpoint")

    def __post_init__(self):
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        _check(self.batch_size % self.grad_accum == 0, f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")
        _check(self.max_steps >= 0, f"max_steps must be >= 0 (0 = use epochs), got {self.max_steps}")
        _check(self.max_steps > 0 or self.epochs > 0, f"epochs must be > 0 when max_steps = 0, got {self.epochs}")
        _one_of("precision", self.precision, ("fp32", "bf16"))
        for k in ("logging_steps", "eval_steps", "save_steps", "max_new_tokens"):
            _check(getattr(self, k) >= 0, f"{k} must be >= 0, got {getattr(self, k)}")
        _check(self.save_total_limit >= 1, f"save_total_limit must be >= 1, got {self.save_total_limit}")
        _check(self.max_new_tokens > 0 or self.data.metric == "none",
               f"data.metric={self.data.metric} is measured on generated answers, but max_new_tokens=0 generates none; "
               "set max_new_tokens > 0 or data.metric=none")
        _check(self.max_new_tokens > 0 or not self.sample_prompts,
               "sample_prompts are answered only with max_new_tokens > 0; set it or drop sample_prompts")
        _check(bool(self.output_dir), "output_dir is empty")

    def to_lora_config(self) -> LoraConfig:
        return self.lora.to_lora_config()

    def dtypes(self) -> tuple[str, str]:
        """(compute dtype, frozen-weight dtype): precision bf16 = bf16 compute and bf16 frozen weights
        (model.dtype overrides the latter); LoRA leaves and optimizer state stay float32 regardless.

        >>> Recipe(precision="bf16").dtypes(), Recipe(precision="bf16", model=ModelSection(dtype="float32")).dtypes()
        (('bfloat16', 'bfloat16'), ('bfloat16', 'float32'))
        """
        compute = "bfloat16" if self.precision == "bf16" else "float32"
        return compute, compute if self.model.dtype == "auto" else self.model.dtype

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- schema walking: keys, help ------------------------------------------------------------------
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def schema_keys(cls=Recipe, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every dotted leaf key of the schema -> its dataclass field.

    >>> "optim.lr" in schema_keys()
    True
    """
    out = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out.update(schema_keys(t, prefix + f.name + "."))
        else:
            out[prefix + f.name] = f
    return out


def _type_name(t) -> str:
    return "any" if t is Any else getattr(t, "__name__", None) or str(t).replace("typing.", "")


def help_text() -> str:
    """One line per field: key, type, default and what it means (`lora-jax train --help`)."""
    lines = []
    for key, f in schema_keys().items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        owner = Recipe
        for part in key.split(".")[:-1]:
            owner = _hints(owner)[part]
        t = _type_name(_hints(owner)[f.name])
        lines.append(f"  {key} ({t}, default {default!r})\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)


# transformers TrainingArguments / TRL SFTConfig / PEFT / MaxText names -> ours (a suggestion, never applied)
FOREIGN = {
    "learning_rate": "optim.lr", "max_grad_norm": "optim.grad_clip", "adam_beta1": "optim.b1", "adam_beta2": "optim.b2",
    "adam_epsilon": "optim.eps", "optim": "optim.name", "lr_scheduler_type": "optim.schedule", "warmup": "optim.warmup_steps",
    "num_train_epochs": "epochs", "gradient_accumulation_steps": "grad_accum", "per_device_train_batch_size": "batch_size",
    "per_device_batch_size": "batch_size", "steps": "max_steps", "bf16": "precision", "fp16": "precision",
    "gradient_checkpointing": "model.remat", "model_name_or_path": "model.path", "load_parameters_path": "model.path",
    "dataset_name": "data.path", "dataset_path": "data.path", "dataset_config_name": "data.name", "dataset_text_field": "data.template",
    "max_seq_length": "data.max_length", "max_target_length": "data.max_length", "completion_only_loss": "data.template",
    "assistant_only_loss": "data.template", "lora_r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
    "base_output_directory": "output_dir", "eval_strategy": "eval_steps",
}


def _closest(key: str, known) -> str:
    # a known foreign name first (`learning_rate`), then a leaf name alone (`lr=1e-4` for `optim.lr=1e-4`),
    # then the closest spelling
    leaf = key.rsplit(".", 1)[-1]
    if FOREIGN.get(leaf) in known:
        return f"; did you mean {FOREIGN[leaf]!r}?"
    best = [k for k in known if k.rsplit(".", 1)[-1] == leaf][:1]
    best = best or difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
    return f"; did you mean {best[0]!r}?" if best else "; lora-jax train --help lists every key"


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        sections = {k2.split(".")[0] for k2 in schema_keys()} - set(schema_keys())
        if isinstance(v, dict) and (prefix or k in sections) and not key.endswith("_pattern"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_keys(tree: dict, where: str) -> None:
    """Raise a one-line UserError naming the first unknown key and the closest known one, or the
    first list / mapping field given something else (`sample_prompts: hello`, `lora.rank_pattern: [1, 2]`)."""
    known = schema_keys()
    sections = {k.split(".")[0] for k in known if "." in k}
    for key, value in _flatten(tree).items():
        if key in sections:
            raise UserError(f"recipe section {key!r} in {where} must be a mapping of its fields, got {value!r}")
        if key not in known:
            raise UserError(f"unknown recipe key {key!r} in {where}{_closest(key, known)}")
        kind = typing.get_origin(_field_type(key))
        if value is not None and kind in (list, dict) and not isinstance(value, kind):
            what = "a list, e.g. [a, b]" if kind is list else "a mapping, e.g. {q_proj: 4}"
            raise UserError(f"{key} in {where} must be {what}; got {value!r}")


def _field_type(key: str):
    owner = Recipe
    for part in key.split(".")[:-1]:
        owner = _hints(owner)[part]
    return _hints(owner)[key.rsplit(".", 1)[-1]]


def _is_text_field(key: str) -> bool:
    return key in schema_keys() and _field_type(key) in (str, Optional[str])


def _is_optional(key: str) -> bool:
    return _field_type(key) == Optional[str]


def _unquote(raw: str) -> str:
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        raw = raw[1:-1]
    return raw.encode().decode("unicode_escape") if "\\" in raw else raw


def _nest(key: str, value: Any) -> dict:
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def load_recipe(path: str | os.PathLike | None, overrides: list[str] = ()) -> Recipe:
    """Recipe from a YAML file (None = defaults) with `key=value` overrides applied on top."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    import yaml

    layers = []
    if path is not None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise MissingFileError(f"recipe {path!r} not found; give a YAML file such as recipes/smollm2_default.yaml")
        try:
            with open(path) as fh:
                tree = yaml.safe_load(fh) or {}
        except yaml.YAMLError as e:
            raise UserError(f"recipe {path!r} is not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(tree, dict):
            raise UserError(f"recipe {path!r} must be a mapping of keys to values")
        check_keys(tree, path)
        layers.append(OmegaConf.create(tree))
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise UserError(f"override {item!r} must look like key=value (e.g. lora.r=16)")
        key, raw = item.split("=", 1)
        try:
            if _is_text_field(key):  # taken verbatim: format strings hold braces and colons
                unset = raw in ("null", "~") and _is_optional(key)  # data.eval_path=null: back to none ('null' quoted stays text)
                layer = OmegaConf.create(_nest(key, None if unset else _unquote(raw)))
            else:
                layer = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as e:
            raise UserError(f"override {item!r}: {str(e).splitlines()[0]}") from None
        check_keys(OmegaConf.to_container(layer), "the overrides")
        layers.append(layer)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Recipe), *layers)
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise UserError(f"recipe value for {key!r}: {msg}" if key else f"recipe: {msg}") from None


def recipe_to_yaml(recipe: Recipe) -> str:
    """The fully-resolved recipe as YAML (written next to every run as recipe.yaml)."""
    import yaml

    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return yaml.safe_dump(plain(recipe.to_dict()), sort_keys=False)
