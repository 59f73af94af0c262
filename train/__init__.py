"""The `lora-jax train` program (big_vision style: a recipe, one loop file that reads top to bottom).

    lora-jax train recipes/smollm2_default.yaml [lora.r=16 optim.lr=1e-4 ...] [--resume | --overwrite]

Files:
  config.py   the recipe schema: frozen dataclasses + OmegaConf (YAML <- key=value overrides), --help
  data.py     load (datasets), format (seeds / chat / format string), response-only loss, packing,
              seeded resumable batches
  loop.py     mesh -> model + LoRA -> data -> restore -> step -> loop -> export
  runtime.py  model/tokenizer resolution, output_dir rules, schedule, generation, plots, atomic writes
  metrics.py  task metrics on generated answers (exact match, SQL execution accuracy)
  cli.py      argument parsing and exit codes (0 done, 1 stopped on NaN, 2 user error, 130 Ctrl-C)
  testing.py  a tiny random Llama + tokenizer for tests and smoke runs

output_dir after a run: run.json (model + LoRA identity), recipe.yaml (resolved), checkpoints/
(orbax: train state + data position), tb/ (tensorboardX), metrics.jsonl, loss.png,
results.json (before/after eval loss, metric, samples, timings), adapter/ (PEFT), merged/ (opt.).
"""
