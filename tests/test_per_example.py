"""Per-example adapters: a mixed batch equals PEFT's adapter_names= forward; one compiled training
step on a mixed batch equals separate per-adapter steps; hot swaps reuse the compiled functions."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import lora_jax
from lora_jax.adapters import per_example as pe
from lora_jax.interop import load_peft_adapter, save_peft_adapter
from lora_jax.models import ModelConfig, build_model
from parity import IDS, assert_close, hf_base, randomize_lora

CFG_A = lora_jax.LoraConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj"))
CFG_B = lora_jax.LoraConfig(r=4, alpha=16, target_modules=("q_proj", "down_proj"), use_rslora=True)


def test_mixed_batch_matches_peft_adapter_names(tiny_checkpoint, tmp_path, scan=True):
    # scanned layers (the bank's adapter axis sits behind the layer axis); the training test below is unscanned
    from peft import PeftModel

    path, _ = tiny_checkpoint("llama")
    model, base, _ = lora_jax.models.from_pretrained(path)
    dirs = []
    for i, cfg in enumerate((CFG_A, CFG_B)):
        params = randomize_lora(lora_jax.inject(base, cfg, jax.random.key(i)), seed=i, std=0.3)
        dirs.append(save_peft_adapter(params, cfg, tmp_path / f"a{i}", model_config=model.cfg))
    pm = PeftModel.from_pretrained(hf_base(path), dirs[0], adapter_name="sql").eval()
    pm.load_adapter(dirs[1], adapter_name="chat")
    rows = ["chat", "__base__", "sql", "chat"]
    ids = np.concatenate([IDS, IDS[::-1]])
    with torch.no_grad():
        theirs = pm(torch.tensor(ids, dtype=torch.long), adapter_names=rows).logits.numpy()

    model, frozen, _ = lora_jax.models.from_pretrained(path, scan_layers=scan)
    trees = [lora_jax.split(load_peft_adapter(frozen, d)[0])[0] for d in dirs]
    f = pe.forward(model)
    mine = np.asarray(f(frozen, pe.stack_adapters(trees), ids, pe.adapter_ids(rows, ["sql", "chat"])))
    assert_close(mine, theirs)
    assert np.max(np.abs(mine[1] - mine[2])) > 1e-2 and np.max(np.abs(mine[0] - mine[3])) < 1e-5  # same input: base vs sql, chat twice
    # hot swap: another adapter of the same shapes in slot 0 reuses the compiled forward
    swapped = pe.swap_adapter(pe.stack_adapters(trees), 0, randomize_lora(trees[0], seed=9))
    f(frozen, swapped, ids, pe.adapter_ids(rows, ["sql", "chat"]))
    assert f.traces() == 1


def test_one_step_trains_n_adapters_like_separate_runs():
    cfg_model = ModelConfig("llama", 64, 32, 64, 1, 4, 2, 8)
    model = build_model(cfg_model)
    frozen = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    cfgs = [lora_jax.LoraConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj")),
            lora_jax.LoraConfig(r=4, alpha=8, target_modules=("q_proj", "up_proj"), use_rslora=True)]
    trees = [lora_jax.split(randomize_lora(lora_jax.inject(frozen, c, jax.random.key(i)), seed=i, std=0.2))[0]
             for i, c in enumerate(cfgs)]
    rng = np.random.default_rng(0)
    ids_rows = np.array([0, 1, 1, 0, -1, 0], np.int32)
    batches = [{"input_ids": rng.integers(0, 64, (6, 12)).astype(np.int32), "adapter_ids": ids_rows} for _ in range(2)]
    for b in batches:
        b["labels"] = np.where(rng.random((6, 12)) < 0.3, -100, b["input_ids"]).astype(np.int32)
    make_tx = lambda: optax.adamw(1e-2, weight_decay=0.1)  # noqa: E731

    step = pe.make_multi_train_step(model, make_tx(), max_grad_norm=0.5)
    state = step.init(pe.stack_adapters(trees))
    mixed_losses = []
    for b in batches:
        state, metrics = step(state, frozen, b)
        mixed_losses.append(np.asarray(metrics["loss"]))
    assert step.traces() == 1

    for k, (tree, cfg) in enumerate(zip(trees, cfgs)):
        tx = optax.chain(optax.clip_by_global_norm(0.5), make_tx())
        lora = tree
        opt = tx.init(lora_jax.split_constants(lora)[0])

        @jax.jit
        def one_step(lora, opt, sub, cfg=cfg, tx=tx):
            def loss(p):
                return lora_jax.training.loss.masked_ce(model.clone(lora=cfg).apply({"params": p}, sub["input_ids"])[0], sub)

            value, grads = lora_jax.lora_value_and_grad(loss)(lora, frozen)
            trained, consts = lora_jax.split_constants(lora)
            updates, opt = tx.update(lora_jax.split_constants(grads)[0], opt, trained)
            return lora_jax.combine(optax.apply_updates(trained, updates), consts), opt, value

        for i, b in enumerate(batches):
            rows = ids_rows == k
            lora, opt, value = one_step(lora, opt, {"input_ids": b["input_ids"][rows], "labels": b["labels"][rows]})
            np.testing.assert_allclose(mixed_losses[i][k], value, rtol=1e-5)
        mine = pe.unstack_adapter(state["bank"], k, tree)
        for (p1, x), (p2, y) in zip(lora_jax.tree.iter_leaves(mine), lora_jax.tree.iter_leaves(lora)):
            assert p1 == p2
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-6, err_msg=".".join(p1))
        moved = max(float(jnp.abs(x - y).max()) for (_, x), (_, y) in zip(lora_jax.tree.iter_leaves(mine), lora_jax.tree.iter_leaves(tree)))
        assert moved > 1e-3
    # padding (adapter 0 has rank 2 in a rank-4 bank) stays exactly zero; hot swap reuses the step
    assert float(jnp.abs(state["bank"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["lora_a"][0][:, 2:]).max()) == 0.0
    state = dict(state, bank=pe.swap_adapter(state["bank"], 1, randomize_lora(trees[1], seed=7)))
    step(state, frozen, batches[0])
    assert step.traces() == 1


def test_errors():
    with pytest.raises(ValueError, match="not among the bank's adapters"):
        pe.adapter_ids(["nope"], ["a"])
    t = {"q": {"lora_a": jnp.ones((3, 2)), "lora_b": jnp.ones((2, 3)), "lora_scale": 1.0, "lora_magnitude": jnp.ones(3)}}
    with pytest.raises(ValueError, match="DoRA"):
        pe.stack_adapters([t])


def test_dense_and_gathered_forms_equal_the_per_row_product(monkeypatch):
    k = jax.random.split(jax.random.key(0), 3)
    x, a, b = jax.random.normal(k[0], (5, 7, 16)), jax.random.normal(k[1], (3, 16, 4)), jax.random.normal(k[2], (3, 4, 8))
    s, ids = jnp.array([0.5, 2.0, 1.0]), jnp.array([0, 2, -1, 1, 2])
    ref = np.stack([np.zeros((7, 8)) if i < 0 else np.asarray(x[r]) @ np.asarray(a[i]) @ np.asarray(b[i]) * float(s[i])
                    for r, i in enumerate(ids.tolist())])
    np.testing.assert_allclose(pe._bank_delta(x, a, b, s, ids), ref, atol=1e-4)
    monkeypatch.setattr(pe, "DENSE_MAX", 0)
    np.testing.assert_allclose(pe._bank_delta(x, a, b, s, ids), ref, atol=1e-4)


def test_multi_adapter_example_runs_on_a_tiny_model(tmp_path, capsys):
    """examples/multi_adapter.py end to end (2 steps, 2 eval rows per task) on a tiny random Llama."""
    import importlib.util
    import pathlib

    from train.testing import make_tiny_model

    spec = importlib.util.spec_from_file_location("multi_adapter", pathlib.Path(__file__).parents[1] / "examples" / "multi_adapter.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    result = mod.main(steps=2, batch=4, seq=48, n_eval=2, model_path=make_tiny_model(str(tmp_path / "tiny")))
    out = capsys.readouterr().out
    assert "adapter 'sql': exact match" in out and "adapter 'domain': exact match" in out
    assert set(result["scores"]) == {"sql", "domain"} and len(result["losses"]) == 2
