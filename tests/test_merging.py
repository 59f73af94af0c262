"""add_weighted_adapter against PEFT's LoraModel.add_weighted_adapter: the merged lora_A / lora_B of
every module equal PEFT's within 1e-5, for every combination type. DARE's random masks are recorded
from PEFT's own run (torch.bernoulli) and handed to ours: the same masks, not the same RNG. svd:
equal up to the sign of each singular pair (the merged ΔW is equal); svd_clamp's threshold is a
quantile of the signed entries, so it is only PEFT's where LAPACK picks the same signs (not tested)."""

import jax
import numpy as np
import pytest
import torch

import lora_jax
from lora_jax.adapters import add_weighted_adapter
from lora_jax.interop import save_peft_adapter
from parity import hf_base, randomize_lora

CFG1 = lora_jax.LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj"))
CFG2 = lora_jax.LoraConfig(r=4, alpha=4, target_modules=("q_proj", "down_proj"), use_rslora=True)
CFG3 = lora_jax.LoraConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj"))
CASES = [("linear", {}, (CFG1, CFG2)), ("cat", {}, (CFG1, CFG3)), ("svd", {}, (CFG1, CFG3)),
         ("svd", dict(svd_rank=3), (CFG1, CFG2)), ("ties", dict(density=0.5), (CFG1, CFG2)),
         ("ties", dict(density=0.3, majority_sign_method="frequency"), (CFG1, CFG2)),
         ("magnitude_prune", dict(density=0.4), (CFG1, CFG2)), ("dare_linear", dict(density=0.5), (CFG1, CFG2)),
         ("dare_ties", dict(density=0.6), (CFG1, CFG2)), ("ties_svd", dict(density=0.5, svd_rank=3), (CFG1, CFG3)),
         ("dare_linear_svd", dict(density=0.5), (CFG1, CFG2))]


@pytest.fixture(scope="module")
def two_adapters(tiny_checkpoint, tmp_path_factory):
    path, _ = tiny_checkpoint("llama")
    _, base, _ = lora_jax.models.from_pretrained(path)
    out = {}
    for name, cfg in (("one", CFG1), ("two", CFG2), ("three", CFG3)):
        params = randomize_lora(lora_jax.inject(base, cfg, jax.random.key(len(name))), seed=len(name) + 10, std=0.3)
        d = save_peft_adapter(params, cfg, tmp_path_factory.mktemp(name) / "a", model_config=lora_jax.models.ModelConfig.from_hf(
            __import__("transformers").AutoConfig.from_pretrained(path)))
        out[name] = (lora_jax.split(params)[0], cfg, d)
    return path, out


@pytest.mark.parametrize("kind,kw,cfgs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_merge_matches_peft(kind, kw, cfgs, two_adapters, monkeypatch):
    from peft import PeftModel
    from peft.utils import merge_utils

    path, made = two_adapters
    names = [n for n, (_, c, _) in made.items() if c in cfgs]
    names = sorted(names, key=lambda n: cfgs.index(made[n][1]))
    pm = PeftModel.from_pretrained(hf_base(path), made[names[0]][2], adapter_name=names[0])
    pm.load_adapter(made[names[1]][2], adapter_name=names[1])
    drawn = []
    real = merge_utils.random_pruning
    monkeypatch.setattr(merge_utils, "random_pruning", lambda t, d, rescale: (drawn.append(torch.bernoulli(torch.full_like(t, d))),
                                                                               t * drawn[-1] / d if rescale else t * drawn[-1])[1])
    weights = [0.7, -0.4]
    torch.manual_seed(0)
    pm.base_model.add_weighted_adapter(names, weights, "merged", combination_type=kind, **kw)
    assert real is not merge_utils.random_pruning
    theirs = {n[len("base_model.model."):].replace(".lora_A.merged.weight", ""): p.detach().numpy()
              for n, p in pm.named_parameters() if n.endswith("lora_A.merged.weight")}
    theirs_b = {n[len("base_model.model."):].replace(".lora_B.merged.weight", ""): p.detach().numpy()
                for n, p in pm.named_parameters() if n.endswith("lora_B.merged.weight")}
    masks = None
    if kind.startswith("dare"):  # PEFT's draw order: modules in named_modules order; per module A's then B's
        masks, it = {}, iter(drawn)
        for mod in theirs:
            present = [n for n in names if lora_jax.tree.has_path(made[n][0], tuple(mod.split(".")) + ("lora_a",))]
            for leaf in (("delta",) if kind.endswith("svd") else ("lora_a", "lora_b")):
                masks[(tuple(mod.split(".")), None, leaf)] = [next(it).numpy() for _ in present]
        assert next(it, None) is None
    mine, mcfg = add_weighted_adapter([(made[n][0], made[n][1]) for n in names], weights, kind, masks=masks, **kw)
    assert mcfg.r == pm.peft_config["merged"].r and mcfg.alpha == pm.peft_config["merged"].lora_alpha
    assert set(theirs) == {".".join(p[:-1]) for p, _ in lora_jax.tree.iter_leaves(mine) if p[-1] == "lora_a"}
    for mod, a in theirs.items():
        node = lora_jax.tree.get(mine, tuple(mod.split(".")))
        my_a, my_b = np.asarray(node["lora_a"]).T, np.asarray(node["lora_b"]).T
        if kind.endswith("svd"):  # singular pairs are unique up to sign, and LAPACK builds (MKL in torch) pick their own
            flip = np.where((my_a * a).sum(1) < 0, -1.0, 1.0).astype(np.float32)
            my_a, my_b = my_a * flip[:, None], my_b * flip[None, :]
        rtol = 1e-4 if kind.endswith("_svd") else 1e-7  # two LAPACKs' float32 SVD of a pruned ΔW: factors agree to ~1e-5 relative
        np.testing.assert_allclose(my_a, a, atol=1e-5, rtol=rtol, err_msg=mod)
        np.testing.assert_allclose(my_b, theirs_b[mod], atol=1e-5, rtol=rtol, err_msg=mod)
        assert float(node["lora_scale"]) == pytest.approx(pm.base_model.model.get_submodule(mod).scaling["merged"])
    assert any(np.abs(a).max() > 1e-3 for a in theirs.values())


def test_merge_errors_and_seeded_dare(two_adapters):
    _, made = two_adapters
    pair = [made["one"][:2], made["two"][:2]]
    with pytest.raises(ValueError, match="needs adapters of one rank"):
        add_weighted_adapter([made["one"][:2], made["three"][:2]], [1, 1], "linear")
    with pytest.raises(ValueError, match="pass rng="):
        add_weighted_adapter(pair, [1, 1], "dare_linear", density=0.5)
    with pytest.raises(ValueError, match="needs density"):
        add_weighted_adapter(pair, [1, 1], "ties")
    with pytest.raises(ValueError, match="needs density"):
        add_weighted_adapter(pair, [1, 1], "magnitude_prune_svd", density=1.5)
    with pytest.raises(ValueError, match="density=0 drops every entry"):  # PEFT: 0/0 = NaN everywhere
        add_weighted_adapter(pair, [1, 1], "dare_linear", density=0.0, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="majority_sign_method must be"):
        add_weighted_adapter(pair, [1, 1], "ties", density=0.5, majority_sign_method="mean")
    toy = {"q": {"kernel": np.ones((4, 4), np.float32)}, "v": {"kernel": np.ones((4, 4), np.float32)}}
    c4 = lora_jax.LoraConfig(r=4, target_modules=["q", "v"])
    c_pat = lora_jax.LoraConfig(r=4, target_modules=["q", "v"], rank_pattern={"v": 2})  # max rank 4, but v is rank 2
    t4, t_pat = (lora_jax.split(lora_jax.inject(toy, c, jax.random.key(0)))[0] for c in (c4, c_pat))
    with pytest.raises(ValueError, match=r"at 'v' the adapters have ranks \[2, 4\]"):
        add_weighted_adapter([(t_pat, c_pat), (t4, c4)], [1, 1], "linear")
    assert add_weighted_adapter([(t_pat, c_pat), (t4, c4)], [1, 1], "cat")[0]["v"]["lora_a"].shape == (4, 8)
    c_ex = lora_jax.LoraConfig(r=4, target_modules=["q", "v"], exclude_modules=["v"])  # PEFT: the first's exclusion wins
    with pytest.raises(ValueError, match="differ in exclude_modules"):
        add_weighted_adapter([(t4, c4), (lora_jax.split(lora_jax.inject(toy, c_ex, jax.random.key(1)))[0], c_ex)], [1, 1], "cat")
    x = add_weighted_adapter(pair, [1, 1], "dare_ties", density=0.5, rng=jax.random.key(3))[0]
    y = add_weighted_adapter(pair, [1, 1], "dare_ties", density=0.5, rng=jax.random.key(3))[0]
    z = add_weighted_adapter(pair, [1, 1], "dare_ties", density=0.5, rng=jax.random.key(4))[0]
    leaves = lambda t: np.concatenate([np.ravel(v) for v in jax.tree.leaves(t)])  # noqa: E731
    assert np.array_equal(leaves(x), leaves(y)) and not np.array_equal(leaves(x), leaves(z))
