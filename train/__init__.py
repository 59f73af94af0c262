"""The `lora-jax` program (big_vision style: a recipe, one loop file that reads top to bottom).

    lora-jax train recipes/smollm2_default.yaml [lora.r=16 optim.lr=1e-4 ...] [--resume | --overwrite]
    lora-jax export --base MODEL --adapter RUN_OR_ADAPTER --format peft|merged --out DIR

Installed as the package `lora_jax_train` (setup.py maps this folder), so no global `train`
module lands on users' import path; in the repo `python -m train ...` runs it too. The library
(`lora_jax/`) never imports the program.

Files:
  config.py   the recipe schema: frozen dataclasses + OmegaConf (YAML <- key=value overrides), --help
  data.py     load (datasets), format (seeds / chat / format string), response-only loss, packing,
              seeded resumable batches
  loop.py     data -> mesh -> model + LoRA -> step -> restore -> loop -> export
  rundir.py   output_dir rules: new run / --resume (which recipe changes a resume accepts) / --overwrite
  runtime.py  model files + tokenizer, schedule, generation, plots
  divergence.py  stop a run whose loss or gradient norm diverges (recipe section divergence:)
  signals.py  SIGINT/SIGTERM -> a flag: save a checkpoint at the next step, exit 130/143
  hosts.py    multi-process runs: jax.distributed, process 0 writes, agreeing on a stop
  metrics.py  task metrics on generated answers (exact match, SQL execution accuracy)
  export.py   `lora-jax export`: adapter (or a run's newest checkpoint adapter) -> PEFT / merged
  cli.py      the `lora-jax` command: exit codes 0 done, 1 stopped (diverged), 2 user error, 130/143 signal
  testing.py  a tiny random Llama + tokenizer for tests and smoke runs

output_dir after a run: run.json (model + LoRA identity, resume record), recipe.yaml (resolved),
checkpoints/<step>/ (orbax train state + data position, and the PEFT adapter of that step),
tb/ (tensorboardX), metrics.jsonl, loss.png,
results.json (before/after eval loss, metric, samples, timings), adapter/ (PEFT), merged/ (opt.).
"""
