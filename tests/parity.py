"""Parity helpers shared by the model and interop tests: tiny checkpoints loaded our way and
transformers'/PEFT's way, random nonzero adapters, and logit comparisons."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import lora_jax
from lora_jax.models import from_pretrained

TOL = 1e-4
IDS = np.random.default_rng(1).integers(0, 96, size=(2, 8)).astype(np.int32)


def randomize_lora(params, seed=0, std=0.1):
    """Every lora_a / lora_b leaf redrawn N(0, std²): nonzero A and B."""
    rng = np.random.default_rng(seed)
    lora, frozen = lora_jax.split(params)
    lora, scales = lora_jax.split_constants(lora)
    lora = jax.tree_util.tree_map(lambda x: jax.numpy.asarray(rng.normal(0, std, x.shape), x.dtype), lora)
    return lora_jax.transform.zero_padded_slots(lora_jax.combine(frozen, lora, scales))


def ours(path, lcfg, scan_layers=False, seed=0):
    """(model, base params, params with a random adapter) for a tiny checkpoint."""
    model, params, hf = from_pretrained(path, scan_layers=scan_layers)
    return model.clone(lora=lcfg), params, randomize_lora(lora_jax.inject(params, lcfg, jax.random.key(seed)), seed)


def our_logits(model, params, ids=IDS):
    return np.asarray(model.apply({"params": params}, ids)[0])


def hf_base(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


def peft_logits(base_path, adapter_dir, ids=IDS):
    """PEFT's logits for base + adapter; fails on any missing/unexpected-key warning."""
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(hf_base(base_path), adapter_dir).eval()
    bad = [str(w.message) for w in caught if any(s in str(w.message).lower() for s in ("missing", "unexpected"))]
    assert not bad, bad
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def hf_logits(model, ids=IDS):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def assert_close(a, b, tol=TOL):
    err = float(np.max(np.abs(a - b)))
    assert err <= tol, f"max |diff| = {err:.3g} > {tol}"


@functools.lru_cache(maxsize=None)
def loaded(path: str, scan: bool):
    model, params, hf_config = from_pretrained(path, scan_layers=scan)
    return model, params, jax.jit(model.apply)


def torch_logits(torch_model, ids, mask):
    positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    with torch.no_grad():
        out = torch_model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                          position_ids=torch.tensor(positions, dtype=torch.long))
    return out.logits.numpy()


def assert_parity(name, scan, tiny_checkpoint, padded_batch):
    path, torch_model = tiny_checkpoint(name)
    ids, mask = padded_batch
    model, params, apply = loaded(path, scan)
    logits, cache = apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert cache is None
    expected = torch_logits(torch_model, ids, mask)
    real = mask.astype(bool)
    diff = np.abs(np.asarray(logits)[real] - expected[real]).max()
    assert diff <= 1e-4, f"{name} scan={scan}: max |Δlogits| = {diff}"
    assert np.abs(expected[real]).max() > 0.5  # logits are not trivially small


def assert_remat_grads_equal(name, remat, tiny_checkpoint, padded_batch):
    """LoRA and full fine-tuning gradients under `remat` equal those without (scanned blocks)."""
    path = tiny_checkpoint(name)[0]
    ids, mask = map(jnp.asarray, padded_batch)
    ref_model, params, _ = loaded(path, True)
    cfg = lora_jax.LoraConfig(r=2, target_modules="all-linear")
    lora, frozen = lora_jax.split(lora_jax.inject(params, cfg, jax.random.key(0)))
    lora = jax.tree.map(lambda x: x + 0.1, lora)  # nonzero B: every path carries gradient

    def grads(model, which):
        def loss(lo, fr):
            return (model.clone(lora=cfg).apply({"params": lora_jax.combine(lo, fr)}, ids, mask)[0] ** 2).mean()
        return jax.jit(jax.grad(loss, argnums=which))(lora, frozen)

    model = ref_model.clone(remat=remat)
    for which in (0, 1):  # 0: the adapters (LoRA), 1: the frozen weights (what full fine-tuning needs)
        for a, b in zip(jax.tree.leaves(grads(model, which)), jax.tree.leaves(grads(ref_model, which))):
            # fp32 recomputation fuses differently: agreement to float32 rounding of the largest entry
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4 * float(np.abs(b).max()))


def load_hf(out, dtype=torch.float32):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=dtype,
                                                                    attn_implementation="eager")
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return model.eval()
