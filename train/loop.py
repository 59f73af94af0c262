"""The training program, top to bottom: data, mesh, model + LoRA, step, restore, loop, export.

`run(recipe, resume=..., overwrite=...)` is everything `lora-jax train` does after parsing. Each
section below has a banner; state flows downward only. Data comes first so that every user error
(paths, columns, rows, model files, output_dir, a refused resume) is reported before the model is
loaded and before anything is written; the output directory is created only once a run is
certain to start.

Invariants that make a killed-and-resumed run end bitwise equal to an uninterrupted one:

* the only things that change during training are the train state {lora, opt_state, step, rng},
  the data position (epoch, index) and the divergence monitor's references — all go into every
  checkpoint (orbax, atomic rename);
* the batch sequence is a pure function of (data seed, position) (`train.data.Batches`) and the
  dropout key a pure function of (rng, step) (inside the compiled step);
* the LoRA init depends on the seed only, and is overwritten by the restore anyway.

Every checkpoint also holds the PEFT adapter of its step (checkpoints/<step>/adapter, written
atomically by process 0), so `lora-jax export` reads adapters, never the training state.

Stopping: SIGINT/SIGTERM (`train.signals`) let the current step finish, save and exit 130/143.
A non-finite or diverging loss (`train.divergence`) stops the run naming the step and the cause;
no checkpoint is written while the run looks suspicious, so the newest one is the last good one,
and nothing is exported. In a multi-process job (`train.hosts`) every process runs this same
code; process 0 alone writes the run's files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time

import jax
import numpy as np

import lora_jax

from . import data as D
from . import hosts
from . import rundir
from . import runtime as R
from . import signals
from .config import Recipe, recipe_to_yaml
from .divergence import Monitor
from .metrics import task_metric

from lora_jax.errors import MissingFileError, UserError


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (non-finite or diverging loss); the message says where and why."""


def _say(msg: str) -> None:
    if hosts.is_main():
        print(msg, flush=True)


class _Say(logging.Handler):
    """Library INFO lines the run should show (which attention implementation serves the step)."""

    def emit(self, record: logging.LogRecord) -> None:
        _say(record.getMessage())


@contextlib.contextmanager
def _library_choices_shown():
    """Show the library's INFO choices during one run, and leave logging as it was afterwards
    (`run` may be called in a process that goes on: tests, notebooks)."""
    log = logging.getLogger("lora_jax.attention")
    handler, level, propagate = _Say(), log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # shown once, by _Say (not again by a root handler another library set up)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


def run(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, eval_only: bool = False) -> int:
    """`lora-jax train`; with `eval_only` it measures output_dir's adapter (or the base model when
    output_dir holds no run) as the run would after training, and writes nothing."""
    with _library_choices_shown():
        return _run(recipe, resume=resume, overwrite=overwrite, eval_only=eval_only)


def _run(recipe: Recipe, *, resume: bool, overwrite: bool, eval_only: bool = False) -> int:
    t_start = time.time()
    hosts.initialize(recipe.distributed)  # before any other JAX call; a no-op for one process
    main = hosts.is_main()
    lora_cfg = recipe.to_lora_config()
    out = recipe.output_dir

    # ================================================================ data (first: bad input fails before the model loads)
    model_path = R.resolve_model_path(recipe.model.path)
    R.check_model_files(model_path)
    if eval_only:  # reads output_dir, never writes it
        if resume or overwrite:
            raise UserError("--eval-only trains and writes nothing; drop --resume / --overwrite")
        changes = None
        if os.path.isfile(os.path.join(out, rundir.RUN_FILE)):
            rundir.check_identity(recipe, model_path, f"evaluate it with the run's recipe ({os.path.join(out, rundir.RECIPE_FILE)})")
    else:
        changes = rundir.check(recipe, model_path, resume, overwrite)  # None: a new run; else the accepted changes
    dc = recipe.data
    cols = (dc.prompt_column, dc.response_column)
    train_rows = D.load_rows(dc.path, dc.split, dc.name, cols)
    if dc.eval_path:
        eval_rows = D.load_rows(dc.eval_path, dc.eval_split or "train", dc.name, cols)
    elif dc.eval_split:
        eval_rows = D.load_rows(dc.path, dc.eval_split, dc.name, cols)
    else:
        train_rows, eval_rows = D.split_eval(train_rows, dc.eval_fraction, recipe.seed)
    if dc.max_eval_examples:
        eval_rows = eval_rows[: dc.max_eval_examples]
    if eval_only and not eval_rows:
        raise UserError("--eval-only: there are no eval examples; set data.eval_path, data.eval_split or data.eval_fraction")
    if dc.metric != "none" and not eval_rows:
        raise UserError(f"data.metric={dc.metric} is measured on eval examples, and there are none; "
                        "set data.eval_path, data.eval_split or data.eval_fraction, or data.metric=none")
    if recipe.eval_steps and not eval_rows and not eval_only:
        raise UserError(f"eval_steps={recipe.eval_steps} measures the eval loss, and there are no eval examples; "
                        "set data.eval_path, data.eval_split or data.eval_fraction, or eval_steps=0")
    if dc.metric == "sql_exec" and not os.path.isfile(dc.metric_db):
        raise MissingFileError(f"data.metric_db {dc.metric_db!r} not found; give the SQL script that builds the metric's database")
    if dc.metric == "sql_exec":  # a broken script or reference query fails now, not after training
        from .metrics import check_references

        check_references([r[dc.response_column] for r in eval_rows[: dc.metric_examples]], dc.metric_db)
    tokenizer = R.load_tokenizer(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    examples, dropped = D.encode_all(train_rows, tokenizer, dc.template, *cols, dc.max_length)
    data_seed = recipe.seed if dc.shuffle_seed is None else dc.shuffle_seed
    rows = D.pack(examples, dc.max_length, dc.packing, data_seed, pad_id)
    eval_examples = D.encode_all(eval_rows, tokenizer, dc.template, *cols, dc.max_length, "eval")[0] if eval_rows else []
    eval_packed = D.pack(eval_examples, dc.max_length, dc.packing, None, pad_id) if eval_examples else None
    n_rows = len(rows["input_ids"])
    if n_rows < recipe.batch_size and not eval_only:  # a batch would repeat rows: not the batch the recipe asks for
        raise UserError(f"batch_size={recipe.batch_size} is more than the {n_rows} training rows ({len(examples)} examples"
                        f"{', packed' if dc.packing else ''}); lower batch_size or give more data")
    total_steps = recipe.max_steps or max(1, math.ceil(recipe.epochs * n_rows / recipe.batch_size))
    _say(f"data: {len(examples)} training examples ({dropped} longer than {dc.max_length} tokens dropped) "
         f"-> {n_rows} rows of {dc.max_length}; {len(eval_examples)} eval examples; {total_steps} steps of {recipe.batch_size} rows")
    signals.check()

    # ================================================================ mesh
    from lora_jax import sharding as shd
    from lora_jax import training

    mc = recipe.mesh
    mesh = shd.make_mesh(shd.MeshConfig(data=mc.data, fsdp=mc.fsdp, tensor=mc.tensor))
    micro = recipe.batch_size // recipe.grad_accum
    n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if micro % n_batch_shards:
        raise UserError(f"micro-batch batch_size/grad_accum = {micro} must be divisible by mesh data*fsdp = {n_batch_shards}")

    # ================================================================ model + LoRA init
    from lora_jax.models import from_pretrained

    compute, frozen_dtype = recipe.dtypes()
    model, params, hf_config = from_pretrained(model_path, dtype=compute, param_dtype=frozen_dtype,
                                               scan_layers=recipe.model.scan_layers,
                                               remat=recipe.model.remat_option(), lora=lora_cfg,
                                               attention=recipe.model.attention,
                                               host=True,  # numpy in host RAM: each device gets only its slice
                                               quantize=recipe.model.quant_config())
    times = {"setup": time.time() - t_start}
    rng = jax.random.key(recipe.seed)
    abstract = jax.eval_shape(lambda p: lora_jax.inject(p, lora_cfg, rng), params)
    specs = shd.param_specs(abstract, shd.default_rules(model.cfg.model_type), mesh)
    lora_specs, frozen_specs = lora_jax.split(specs)
    frozen = shd.load_sharded(params, shd.named_shardings(frozen_specs, mesh))
    del params
    lora = shd.inject_sharded(frozen, lora_cfg, jax.random.fold_in(rng, 1), shd.named_shardings(lora_specs, mesh))
    n_lora, n_all = lora_jax.count_parameters(lora_jax.combine(lora, frozen))
    _say(f"model: {model_path} ({model.cfg.model_type}, {n_all / 1e6:.1f}M params); "
         f"LoRA r={lora_cfg.r} on {lora_cfg.target_modules}: {n_lora:,} trainable ({100 * n_lora / n_all:.3f}%)"
         + (f"; {jax.process_count()} processes, {jax.device_count()} devices" if jax.process_count() > 1 else ""))
    signals.check()

    # ================================================================ step
    schedule = R.make_schedule(recipe.optim, total_steps)
    o = recipe.optim
    tx = training.default_optimizer(schedule, max_grad_norm=o.grad_clip or None, weight_decay=o.weight_decay,
                                    b1=o.b1, b2=o.b2, eps=o.eps)
    if o.name == "adamw_8bit":  # the same chain with 8-bit moments
        import optax

        clip = optax.clip_by_global_norm(o.grad_clip) if o.grad_clip else optax.identity()
        tx = optax.chain(clip, lora_jax.quant.adamw_8bit(schedule, o.b1, o.b2, o.eps, o.weight_decay))
    if o.loraplus_lr_ratio != 1.0:  # LoRA+ (lora_jax.variants.loraplus): B at lr · ratio, one clip over all
        import optax

        adam = (lambda lr: lora_jax.quant.adamw_8bit(lr, o.b1, o.b2, o.eps, o.weight_decay)) if o.name == "adamw_8bit" else (
            lambda lr: optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))
        tx = optax.chain(optax.clip_by_global_norm(o.grad_clip) if o.grad_clip else optax.identity(),
                         lora_jax.variants.loraplus(adam, schedule, o.loraplus_lr_ratio))
    state = training.init_train_state(lora, tx, jax.random.fold_in(rng, 2), mesh=mesh, lora_specs=lora_specs)
    init_lora = state["lora"]  # kept for a 'before' that a resume must regenerate
    train_step = training.make_train_step(model, tx, mesh, specs, schedule=schedule, dropout=lora_cfg.dropout > 0)
    eval_step = training.make_eval_step(model, mesh, specs)
    # trace the step once, abstractly: a setting it cannot serve (model.attention on this platform, ...) fails
    # here, before anything is written, not at the first eval or step
    probe = {k: jax.ShapeDtypeStruct((recipe.grad_accum, micro, dc.max_length), np.int32) for k in D.FIELDS}
    train_step.lower(state, frozen, probe)  # traces and lowers (jax caches both for the first real step)
    eval_batches = D.eval_batches(eval_packed, micro) if eval_packed is not None else []

    def eval_loss(lora_tree) -> float | None:
        if not eval_batches:
            return None
        s = n = 0.0
        for b in eval_batches:
            m = eval_step(lora_tree, frozen, shd.shard_batch(b, mesh))
            s, n = s + float(m["loss_sum"]), n + float(m["n_tokens"])
        return s / max(n, 1.0)

    generating = recipe.max_new_tokens > 0  # 0: no samples, no metric
    metric_rows = eval_rows[: dc.metric_examples] if dc.metric != "none" and generating else []
    sample_prompts = (list(recipe.sample_prompts) or [r[dc.prompt_column] for r in eval_rows[:3]]) if generating else []

    gen_ids = [D.encode_prompt(tokenizer, dc.template, p) for p in sample_prompts + [r[dc.prompt_column] for r in metric_rows]]
    R.check_positions(model.cfg, dc.max_length, max(map(len, gen_ids), default=0), recipe.max_new_tokens)

    def answers(lora_tree) -> tuple[list[str], list[str]]:
        full = lora_jax.combine(lora_tree, frozen)
        ids = gen_ids
        outs = R.generate_answers(model, full, tokenizer, ids, recipe.max_new_tokens,
                                  stop=D.stop_ids(tokenizer, dc.template)) if ids else []
        return outs[: len(sample_prompts)], outs[len(sample_prompts):]

    def metric(preds: list[str]) -> float | None:
        refs = [r[dc.response_column] for r in metric_rows]
        return task_metric(dc.metric, preds, refs, dc.metric_db)

    if eval_only:  # output_dir's adapter (the final one, else the newest checkpoint's) or the base model
        what, lora_tree = "the base model (output_dir holds no run)", init_lora
        if os.path.isfile(os.path.join(out, rundir.RUN_FILE)):
            from .export import resolve_adapter

            adapter_dir, what = resolve_adapter(out)
            loaded, _ = lora_jax.load_peft_adapter(shd.to_host(frozen), adapter_dir)
            lora_tree = jax.device_put(lora_jax.split(loaded)[0], shd.named_shardings(lora_specs, mesh))
        samples, preds = answers(lora_tree)
        loss, score = eval_loss(lora_tree), metric(preds)
        for p, a in zip(sample_prompts, samples):
            _say(f"prompt: {p}\nanswer: {a}\n")
        _say(f"eval only, {what}: eval loss {_fmt(loss)}" + (f", {dc.metric} {_fmt(score)}" if metric_rows else ""))
        return 0

    # ================================================================ checkpoint restore
    batches = D.Batches(rows, recipe.batch_size, data_seed)
    monitor = Monitor(recipe.divergence)
    ckpt_dir = os.path.abspath(os.path.join(out, "checkpoints"))
    before = None
    resumed = False
    hosts.barrier("inputs checked")  # every process has judged output_dir before process 0 writes to it
    if changes is not None:
        ckpt = training.Checkpointer(ckpt_dir, max_to_keep=recipe.save_total_limit)
        if ckpt.latest_step() is None:
            _say(f"--resume: {out} has no checkpoint yet; starting from step 0")
        else:
            target = training.abstract_state(state, mesh, lora_specs)
            state, meta = ckpt.restore(target=target)
            step = int(state["step"])
            if step > total_steps:
                raise UserError(f"--resume: the run is at step {step}, past max_steps={total_steps}; raise max_steps or export it as it is")
            batches = D.Batches(rows, recipe.batch_size, data_seed, **meta["data"])
            monitor = Monitor(recipe.divergence, meta.get("divergence"))
            before = None if any(k in changes for k in rundir.BEFORE_FIELDS) else meta.get("before")
            resumed = True
            if step == total_steps and os.path.isfile(os.path.join(out, "results.json")):
                _say(f"--resume: the run in {out} already finished at step {step} (results.json, adapter/); nothing to do")
                return 0
            if main:
                rundir.record_resume(out, step, changes, recipe_to_yaml(recipe))
            _say(f"resumed from step {step} (epoch {batches.epoch}, row {batches.index})"
                 + (f"; recipe changes: {', '.join(sorted(changes))}" if changes else ""))
    if not resumed:
        if main:
            rundir.create(recipe, model_path, overwrite, recipe_to_yaml(recipe))
        hosts.barrier("output_dir created")
        ckpt = training.Checkpointer(ckpt_dir, max_to_keep=recipe.save_total_limit)
    if before is None:  # the baseline, once per run (kept in checkpoints so a resume reports it too)
        t = time.time()
        samples, preds = answers(init_lora)
        before = {"eval_loss": eval_loss(init_lora), "metric": metric(preds), "samples": samples}
        _say(f"before training: eval loss {_fmt(before['eval_loss'])}" + (f", {dc.metric} {_fmt(before['metric'])}" if metric_rows else ""))
        times["before"] = time.time() - t
    del init_lora
    signals.check()

    def save(step: int) -> None:
        """Checkpoint (every process its shards) + that step's PEFT adapter (process 0), both atomic."""
        ckpt.save(step, state, {"data": batches.position, "before": before, "divergence": monitor.state}, force=True)
        ckpt.wait()
        host_lora = shd.to_host(state["lora"])  # a collective: every process takes part
        if main:
            _save_adapter(host_lora, lora_cfg, model, model_path, os.path.join(ckpt_dir, str(step), "adapter"))
        hosts.barrier(f"saved {step}")

    # ================================================================ loop
    from tensorboardX import SummaryWriter
    from tqdm import tqdm

    step = int(state["step"])
    first_step, t_train = step, time.time()
    history_path = os.path.join(out, "metrics.jsonl")
    if main:
        rundir.write_atomic(history_path, "".join(json.dumps(h) + "\n" for h in rundir.read_history(history_path, step)))
    writer = SummaryWriter(os.path.join(out, "tb"), purge_step=step) if main else None
    bar = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True, file=sys.stdout, mininterval=1.0, disable=not main)
    t_last, tok_last = time.time(), 0
    hist = open(history_path, "a") if main else None
    try:
        while step < total_steps:
            host = batches.next()
            host = {k: v.reshape((recipe.grad_accum, micro) + v.shape[1:]) for k, v in host.items()}
            state, m = train_step(state, frozen, shd.shard_batch(host, mesh, batch_axis=1))
            loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
            why = monitor.update(step + 1, loss, grad_norm)  # the same on every process: the values are global
            if why is not None:
                last = ckpt.latest_step()
                raise TrainingStopped(f"training stopped at step {step + 1}; {why}; not saved, nothing exported "
                                      f"(last good checkpoint: {'none' if last is None else f'step {last}'}); "
                                      "lower optim.lr or check the data (thresholds: the recipe's divergence section)")
            step += 1
            tok_last += D.count_tokens(host)
            bar.update(1)
            if recipe.logging_steps and (step % recipe.logging_steps == 0 or step == total_steps):
                dt = time.time() - t_last
                rec = {"step": step, "loss": loss, "lr": float(m["lr"]), "grad_norm": grad_norm,
                       "tokens_per_s": tok_last / max(dt, 1e-9)}
                t_last, tok_last = time.time(), 0
                if main:
                    for k, v in rec.items():
                        if k != "step":
                            writer.add_scalar(f"train/{k}", v, step)
                    hist.write(json.dumps(rec) + "\n")
                    hist.flush()
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            if recipe.eval_steps and step % recipe.eval_steps == 0 and step < total_steps:
                el = eval_loss(state["lora"])
                if el is not None and main:
                    writer.add_scalar("eval/loss", el, step)
                    hist.write(json.dumps({"step": step, "eval_loss": el}) + "\n")
                    hist.flush()
                    bar.write(f"step {step}: eval loss {el:.4f}")
            sig = signals.requested()
            stopping = hosts.agree(sig is not None) and step < total_steps
            due = (recipe.save_steps and step % recipe.save_steps == 0) or step == total_steps or stopping
            if due and monitor.healthy:
                save(step)
            if stopping:
                bar.close()
                last = ckpt.latest_step()
                sig = sig or signals.SIGNALS[1]  # the signal reached another process
                name = signals.Interrupted(sig).signame
                _say(f"{name}: stopped at step {step}; " + (f"checkpoint saved at step {last}; continue with --resume"
                                                             if last is not None else "no checkpoint saved"))
                return 128 + int(sig)
    finally:
        bar.close()
        if main:
            hist.close()
            writer.flush()
        ckpt.wait()

    if hosts.agree(signals.requested() is not None):  # a signal during the last step: the final checkpoint is saved
        sig = signals.requested() or signals.SIGNALS[1]
        _say(f"{signals.Interrupted(sig).signame}: stopped after the last step (checkpoint saved at step {ckpt.latest_step()}); "
             "--resume writes the results and the adapter")
        return 128 + int(sig)

    # ================================================================ export
    times["train"], t_after = time.time() - t_train, time.time()
    after_loss = eval_loss(state["lora"])
    samples, preds = answers(state["lora"])
    after = {"eval_loss": after_loss, "metric": metric(preds), "samples": samples}
    times["after"] = time.time() - t_after
    host_lora = shd.to_host(state["lora"])
    host_frozen = shd.to_host(frozen) if recipe.export_merged else None
    if not main:
        return 0
    if after_loss is not None:
        writer.add_scalar("eval/loss", after_loss, step)
    writer.close()
    history = rundir.read_history(history_path, step) + ([{"step": step, "eval_loss": after_loss}] if after_loss is not None else [])
    if before["eval_loss"] is not None:
        history.insert(0, {"step": 0, "eval_loss": before["eval_loss"]})
    R.plot_losses(history, os.path.join(out, "loss.png"))
    _save_adapter(host_lora, lora_cfg, model, model_path, os.path.join(out, "adapter"))
    if recipe.export_merged:
        from lora_jax import interop

        interop.save_merged(lora_jax.combine(host_lora, host_frozen), lora_cfg, os.path.join(out, "merged"), hf_config=hf_config,
                            dtype=np.dtype(model.param_dtype).name, tokenizer=tokenizer, overwrite=True)
    times["export"] = time.time() - t_after - times["after"]
    times["total"] = time.time() - t_start
    n_run = max(step - first_step, 1)
    results = {"steps": step, "before": before, "after": after, "sample_prompts": sample_prompts,
               "metric": dc.metric, "seconds": times, "seconds_per_step": times["train"] / n_run}
    rundir.write_atomic(os.path.join(out, "results.json"), json.dumps(results, indent=2))
    _report(sample_prompts, before, after, dc.metric, out)
    _say("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items())
         + f" ({times['train'] / n_run:.2f}s/step incl. compile and evals)")
    return 0


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _save_adapter(host_lora, lora_cfg, model, model_path, directory) -> None:
    """The PEFT adapter (adapter_config.json + adapter_model.safetensors), written atomically."""
    from lora_jax import interop

    interop.save_peft_adapter(host_lora, lora_cfg, directory, model_config=model.cfg,
                              base_model_name_or_path=model_path, overwrite=True)


def _report(prompts, before, after, metric_name, out) -> None:
    _say("\n=== before / after ===")
    for p, b, a in zip(prompts, before["samples"], after["samples"]):
        _say(f"<human>: {p}\n<assistant> (before): {b}\n<assistant> (after):  {a}\n")
    _say(f"eval loss: {_fmt(before['eval_loss'])} -> {_fmt(after['eval_loss'])}")
    if metric_name != "none" and after["metric"] is not None:
        _say(f"{metric_name}: {_fmt(before['metric'])} -> {_fmt(after['metric'])}")
    _say(f"adapter: {os.path.join(out, 'adapter')}  (loss curve: {os.path.join(out, 'loss.png')})")
