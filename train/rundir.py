"""The run directory: what may go into `output_dir`, and what a `--resume` may change.

    output_dir/run.json      the run's identity (model, LoRA config) and its resume record
               recipe.yaml   the resolved recipe the run follows (updated by a resume)
               checkpoints/  <step>/state (orbax), <step>/meta, <step>/adapter (PEFT, for export)

Every rule that can refuse a run is checked here *before* anything is written:

* an existing run needs `--resume` (same run) or `--overwrite` (start over); a non-empty
  directory that holds no run (no run.json) is refused, `--overwrite` or not: it is never deleted;
* `--resume` continues only the *same trajectory*: the new recipe is compared with the run's
  recipe.yaml field by field, and any change outside `SAFE` is refused in one line listing the
  changed fields. `SAFE` holds what only decides when things are logged, evaluated, saved or
  generated, where the devices are, and the divergence thresholds. `max_steps` (or `epochs`) may
  change only when the learning-rate schedule does not depend on the total step count (constant
  schedule, warmup given in steps): with cosine/linear decay it would bend the schedule;
* `--resume` with no run in output_dir is refused (a typo would otherwise start a new run).

Accepted changes are recorded in run.json ("resumes": step + the changed fields) and recipe.yaml
is rewritten, so the directory always says what the run followed.

>>> sorted(diff({"lora": {"r": 8}, "seed": 0}, {"lora": {"r": 16}, "seed": 0}))
['lora.r']
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from lora_jax.errors import MissingFileError, UserError

RUN_FILE, RECIPE_FILE = "run.json", "recipe.yaml"

# field (or section prefix ending in ".") -> why a resume may change it
SAFE = {
    "logging_steps": "when metrics are logged", "eval_steps": "when the eval loss is measured",
    "save_steps": "when checkpoints are written", "save_total_limit": "how many checkpoints are kept",
    "export_merged": "what is written at the end", "output_dir": "where the run is",
    "sample_prompts": "what is generated (the 'before' answers are regenerated)",
    "max_new_tokens": "what is generated (the 'before' answers are regenerated)",
    "data.metric": "the task metric (re-measured before training)", "data.metric_db": "the task metric",
    "data.metric_examples": "the task metric", "model.remat": "recomputation only: the same values",
    "mesh.": "where the arrays live (the same math on another device layout)",
    "distributed.": "how the processes find each other", "divergence.": "when a diverging run is stopped",
}
STEPS_FIELDS = ("max_steps", "epochs")
BEFORE_FIELDS = ("sample_prompts", "max_new_tokens", "data.metric", "data.metric_db", "data.metric_examples")


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested recipe dict (the `*_pattern` dicts stay values)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and not k.endswith("_pattern"):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def diff(old: dict, new: dict) -> dict[str, tuple]:
    """{dotted key: (old, new)} for every field that differs."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if _norm(a.get(k)) != _norm(b.get(k))}


def _norm(v: Any) -> Any:
    return json.loads(json.dumps(v, sort_keys=True, default=list))


def is_safe(key: str) -> bool:
    """Whether a resume may change `key` (`max_steps`/`epochs` are judged by `steps_change_ok`).

    >>> is_safe("logging_steps"), is_safe("mesh.fsdp"), is_safe("optim.lr")
    (True, True, False)
    """
    return key in SAFE or any(p.endswith(".") and key.startswith(p) for p in SAFE)


def steps_change_ok(optim: Any) -> bool:
    """Whether the schedule is independent of the total step count (so max_steps may change).

    >>> from train.config import OptimSection
    >>> steps_change_ok(OptimSection(schedule="constant", warmup_steps=5)), steps_change_ok(OptimSection())
    (True, False)
    """
    return optim.schedule == "constant" and (optim.warmup_steps > 0 or optim.warmup_ratio == 0)


# -- checks (nothing written) ----------------------------------------------------------------------
def run_identity(recipe, model_path: str) -> dict:
    """What must match for a run in output_dir to be continued: the model and the LoRA config."""
    lora = recipe.to_lora_config().to_peft_dict()
    return {"model": model_path, "lora": json.loads(json.dumps(lora))}


def check(recipe, model_path: str, resume: bool, overwrite: bool) -> dict[str, tuple] | None:
    """Check output_dir against this run. Returns None for a new run, else (on --resume) the
    accepted recipe changes {key: (old, new)}. Raises a one-line `UserError` otherwise."""
    out = recipe.output_dir
    if overwrite and resume:
        raise UserError("--resume and --overwrite contradict each other; pick one")
    exists = os.path.exists(out)
    if exists and not os.path.isdir(out):
        raise UserError(f"output_dir {out!r} is a file; choose a directory")
    run_file = os.path.join(out, RUN_FILE)
    if exists and os.listdir(out) and not os.path.isfile(run_file):  # never deleted, even with --overwrite
        raise UserError(f"output_dir {out!r} is not empty and holds no lora-jax run (no {RUN_FILE}); choose a new or "
                        "empty output_dir (--overwrite deletes only a lora-jax run's directory)")
    if not exists or not os.listdir(out) or overwrite:
        if resume:
            raise UserError(f"--resume: output_dir {out!r} holds no run to resume; drop --resume to start one")
        return None
    check_identity(recipe, model_path, "use another output_dir or --overwrite")
    if not resume:
        raise UserError(f"output_dir {out!r} already holds this run; pass --resume to continue it or --overwrite to start over")
    return resume_changes(recipe)


def check_identity(recipe, model_path: str, fix: str) -> None:
    """The run in output_dir is of this model and this LoRA config; else a one-line error ending in `fix`."""
    out = recipe.output_dir
    old = read_json(os.path.join(out, RUN_FILE))
    new = run_identity(recipe, model_path)
    if old.get("model") != new["model"]:
        raise UserError(f"output_dir {out!r} holds a run of another model ({_short(old.get('model'))}); {fix}")
    if old.get("lora") != new["lora"]:
        changed = diff(old.get("lora") or {}, new["lora"])
        listed = ", ".join(f"lora {k}: {_short(a)} -> {_short(b)}" for k, (a, b) in changed.items())
        raise UserError(f"output_dir {out!r} holds a run of another LoRA config ({listed}); {fix}")


def resume_changes(recipe) -> dict[str, tuple]:
    """The changes of `recipe` against the run's recipe.yaml that a resume accepts; refuses others."""
    from .config import load_recipe

    path = os.path.join(recipe.output_dir, RECIPE_FILE)
    if not os.path.isfile(path):
        raise MissingFileError(f"{path} is missing, so the resumed recipe cannot be checked; start over with --overwrite")
    try:
        old = load_recipe(path)
    except ValueError as e:
        raise UserError(f"{path} is not a readable recipe ({str(e).splitlines()[0]}); start over with --overwrite") from None
    changes = diff(old.to_dict(), recipe.to_dict())
    refused = [k for k in changes if not is_safe(k) and k not in STEPS_FIELDS]
    if any(k in STEPS_FIELDS for k in changes) and not steps_change_ok(old.optim):
        refused += [k for k in changes if k in STEPS_FIELDS]
        what = "/".join(k for k in STEPS_FIELDS if k in changes)
        why = (f" ({what} would reshape the {old.optim.schedule} decay" if old.optim.schedule != "constant"
               else f" ({what} would move the warmup set by optim.warmup_ratio")
        why += "; only a constant schedule with warmup in steps may change length)"
    else:
        why = ""
    if refused:
        listed = ", ".join(f"{k}: {_short(changes[k][0])} -> {_short(changes[k][1])}" for k in sorted(refused))
        raise UserError(f"--resume would change the training trajectory ({listed}){why}; resume with the run's "
                        f"recipe ({path}) or start a new run (another output_dir or --overwrite)")
    return changes


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True, default=list)
    return s if len(s) < 60 else s[:57] + "..."


# -- writes (atomic, process 0 only) ---------------------------------------------------------------
def create(recipe, model_path: str, overwrite: bool, recipe_yaml: str) -> None:
    """Make output_dir (emptied first with --overwrite) with run.json and recipe.yaml."""
    out = recipe.output_dir
    if overwrite and os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    write_atomic(os.path.join(out, RUN_FILE), json.dumps(run_identity(recipe, model_path), indent=2))
    write_atomic(os.path.join(out, RECIPE_FILE), recipe_yaml)


def record_resume(out: str, step: int, changes: dict[str, tuple], recipe_yaml: str) -> None:
    """Append this resume (step, changed fields) to run.json; rewrite recipe.yaml if it changed."""
    run_file = os.path.join(out, RUN_FILE)
    run = read_json(run_file)
    run.setdefault("resumes", []).append({"step": step, "changed": {k: list(v) for k, v in changes.items()}})
    write_atomic(run_file, json.dumps(run, indent=2, default=list))
    if changes:
        write_atomic(os.path.join(out, RECIPE_FILE), recipe_yaml)


def read_json(path: str) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); start over with --overwrite") from None


def write_atomic(path: str, text: str) -> None:
    """Write via a temporary file and rename: readers never see half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def read_history(path: str, up_to_step: int) -> list[dict]:
    """metrics.jsonl entries up to `up_to_step` (a resumed run drops what it will redo)."""
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as fh:
        for line in fh:
            try:
                h = json.loads(line)
            except json.JSONDecodeError:  # a line cut by kill -9
                continue
            if h.get("step", 0) <= up_to_step:
                out.append(h)
    return out
