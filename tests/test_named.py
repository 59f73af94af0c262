"""Named adapters: add / set_active / disable / delete, and PEFT's multi-adapter directory layout both
ways (ours read by PeftModel.from_pretrained + load_adapter(adapter_name=), PEFT's read by ours)."""

import dataclasses
import os

import jax
import numpy as np
import pytest
import torch

import lora_jax
from lora_jax.adapters import Adapters
from parity import IDS, assert_close, hf_base, randomize_lora


def test_named_adapters_and_peft_multi_adapter_dirs(tiny_checkpoint, tmp_path):
    from peft import PeftModel

    path, _ = tiny_checkpoint("llama")
    model, base, _ = lora_jax.models.from_pretrained(path)
    c1 = lora_jax.LoraConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj"))
    c2 = lora_jax.LoraConfig(r=4, alpha=8, target_modules=("o_proj", "up_proj"))
    t1 = lora_jax.split(randomize_lora(lora_jax.inject(base, c1, jax.random.key(0)), seed=1, std=0.3))[0]
    t2 = lora_jax.split(randomize_lora(lora_jax.inject(base, c2, jax.random.key(1)), seed=2, std=0.3))[0]
    ad = Adapters.from_params(base).add("default", t1, c1).add("chat", t2, c2)
    assert ad.names == ("default", "chat") and ad.active == "default"
    logits = lambda a: np.asarray(model.clone(lora=a.config).apply({"params": a.params}, IDS)[0])  # noqa: E731
    mine = {n: logits(ad.set_active(n)) for n in ad.names}
    mine_base = logits(ad.disable())
    assert np.max(np.abs(mine["default"] - mine["chat"])) > 1e-2

    out = ad.save_all(tmp_path / "multi", model_config=model.cfg)
    assert sorted(os.listdir(out)) == [
        "adapter_config.json", "adapter_model.safetensors", "chat"]
    pm = PeftModel.from_pretrained(hf_base(path), out).eval()
    pm.load_adapter(f"{out}/chat", adapter_name="chat")
    with torch.no_grad():
        t = torch.tensor(IDS, dtype=torch.long)
        assert_close(mine["default"], pm(t).logits.numpy())
        pm.set_adapter("chat")
        assert_close(mine["chat"], pm(t).logits.numpy())
        with pm.disable_adapter():
            assert_close(mine_base, pm(t).logits.numpy())
        pm.save_pretrained(tmp_path / "peft_multi")  # PEFT's own layout, read back by ours
    back = Adapters.load_all(base, str(tmp_path / "peft_multi"))
    assert back.names == ("default", "chat")
    for n in back.names:
        assert_close(logits(back.set_active(n)), mine[n], 1e-5)

    gone = ad.delete("default")
    assert gone.names == ("chat",) and gone.active == "chat" and gone.delete("chat").active is None
    with pytest.raises(ValueError, match="no adapter named 'x'"):
        ad.set_active("x")
    with pytest.raises(ValueError, match="takes one adapter name.*'cat'"):  # PEFT's set_adapter(["a", "b"])
        ad.set_active(["default", "chat"])
    both = ad.add_weighted(["default", "chat"], [1.0, 1.0], "both", "cat").set_active("both")  # = both active in PEFT
    with torch.no_grad():
        pm.base_model.set_adapter(["default", "chat"])
        assert_close(logits(both), pm(t).logits.numpy())
    with pytest.raises(ValueError, match="exists"):
        ad.add("chat", t2, c2)
    # one jit for every adapter of the same shapes: Adapters is a pytree with static names/active
    f = jax.jit(lambda a: a.params["model"]["layers"]["0"]["self_attn"]["q_proj"]["lora_a"].sum())
    f(ad.replace_adapter("default", randomize_lora(t1, seed=5)))
    f(ad)
    assert f._cache_size() == 1


def test_merge_and_unload_names_and_delete_order_match_peft(tiny_checkpoint, tmp_path):
    """PEFT's merge_and_unload(adapter_names=[plain, DoRA]) (DoRA's norm on the already-merged kernel), its
    delete_adapter rule (the active one deleted: sorted(remaining)[0], not the order added), and add's refusals."""
    import warnings

    from peft import PeftModel

    path, _ = tiny_checkpoint("llama")
    model, base, _ = lora_jax.models.from_pretrained(path)
    c1 = lora_jax.LoraConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj"))
    c2 = lora_jax.LoraConfig(r=4, alpha=8, target_modules=("q_proj", "up_proj"), use_dora=True)
    t1 = lora_jax.split(randomize_lora(lora_jax.inject(base, c1, jax.random.key(0)), seed=1, std=0.3))[0]
    t2 = lora_jax.split(randomize_lora(lora_jax.inject(base, c2, jax.random.key(1)), seed=2, std=0.3))[0]
    ad = Adapters.from_params(base).add("zeta", t1, c1).add("mid", t1, c1).add("alpha", t2, c2)
    dirs = {n: ad.save(n, str(tmp_path / n), model_config=model.cfg) for n in ad.names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(hf_base(path), dirs["zeta"], adapter_name="zeta").eval()
        for n in ("mid", "alpha"):
            pm.load_adapter(dirs[n], adapter_name=n)
        pm.delete_adapter("zeta")
    assert pm.active_adapter == "alpha" == ad.delete("zeta").active  # insertion order would give "mid"
    merged = ad.merge_and_unload(["mid", "alpha"])
    assert not lora_jax.transform.has_lora(merged)
    mine = np.asarray(model.apply({"params": merged}, IDS)[0])
    with torch.no_grad():
        theirs = pm.merge_and_unload(adapter_names=["mid", "alpha"])(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    assert_close(mine, theirs, 1e-4)
    assert np.max(np.abs(mine - np.asarray(model.apply({"params": base}, IDS)[0]))) > 1e-2
    assert_close(np.asarray(model.apply({"params": ad.disable().merge_and_unload()}, IDS)[0]),
                 np.asarray(model.apply({"params": base}, IDS)[0]), 0)
    with pytest.raises(ValueError, match="'v_proj' is not a kernel of the base|which is not a kernel of the base"):
        Adapters.from_params(base).add("x", {"v_proj": t1["model"]["layers"]["0"]["self_attn"]["v_proj"]}, c1)
    pissa = dataclasses.replace(c1, init="pissa")
    t_p = lora_jax.split(lora_jax.inject(base, pissa, jax.random.key(2)))[0]
    with pytest.raises(ValueError, match="'p' \\(init='pissa'\\) rewrote the base kernels.*convert_to_lora"):
        Adapters.from_params(base).add("a", t1, c1).add("p", t_p, pissa)
    wrong = jax.tree.map(lambda x: x[..., :-1, :] if x.ndim == 2 and x.shape[-1] == 2 else x, t1)  # A one input short
    with pytest.raises(ValueError, match="do not fit the base kernel"):
        Adapters.from_params(base).add("x", wrong, c1)
    with pytest.raises(ValueError, match="do not fit the base kernel"):
        Adapters.from_params(base).add("x", t1, c1).replace_adapter("x", wrong)
