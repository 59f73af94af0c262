"""lora_jax.apply on a linen transformer written in plain Flax style (nothing in it knows about LoRA)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax import LoraConfig


class Attention(nn.Module):  # plain Flax style: DenseGeneral over (heads, head_dim), as flax's own attention
    heads: int = 2
    head_dim: int = 8

    @nn.compact
    def __call__(self, x):
        proj = lambda name: nn.DenseGeneral((self.heads, self.head_dim), name=name)(x)  # noqa: E731
        q, k, v = proj("query"), proj("key"), proj("value")
        w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / self.head_dim**0.5, axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", w, v)
        return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="out")(o)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x + Attention(name="attn")(nn.LayerNorm(name="ln1")(x))
        h = nn.Dense(32, name="fc1")(nn.LayerNorm(name="ln2")(x))
        return x + nn.Dense(x.shape[-1], name="fc2")(nn.gelu(h))


class TinyLM(nn.Module):
    vocab: int = 40

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(self.vocab, 16, name="embed")(ids)
        for i in range(2):
            x = Block(name=f"block_{i}")(x)
        proj = nn.Einsum((16, self.vocab), "btd,dv->btv", name="head")  # an nn.Einsum, to cover the third kind
        return proj(nn.LayerNorm(name="ln_f")(x))


@pytest.fixture(scope="module")
def setup():
    model = TinyLM()
    ids = jax.random.randint(jax.random.key(0), (2, 5), 0, 40)
    params = model.init(jax.random.key(1), ids)["params"]
    return model, ids, params


def randomize_lora(params, seed=7):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = [jax.random.normal(k, x.shape) * 0.1 if str(p[-1].key) in ("lora_a", "lora_b") else x for (p, x), k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, out)


def test_kernel_layouts_read_dense_general_axes(setup):
    model, ids, _ = setup
    layouts = lora_jax.kernel_layouts(model, ids)
    assert layouts["block_0.attn.query"] == lora_jax.KernelLayout(stack=0, n_in=1)
    assert layouts["block_0.attn.out"] == lora_jax.KernelLayout(stack=0, n_in=2)
    assert layouts["head"] == lora_jax.KernelLayout(stack=0, n_in=1)


def test_inject_keeps_outputs_then_adapters_change_them_and_merge_agrees(setup):
    model, ids, params = setup
    cfg = LoraConfig(r=3, alpha=6, target_modules=["query", "value", "out", "fc1", "fc2", "head"])
    layouts = lora_jax.kernel_layouts(model, ids)
    lp = lora_jax.inject(params, cfg, jax.random.key(2), layouts=layouts)
    assert lp["block_0"]["attn"]["out"]["lora_a"].shape == (16, 3)  # (heads*head_dim, r)
    assert lp["block_0"]["attn"]["query"]["lora_b"].shape == (3, 16)
    f = jax.jit(lora_jax.apply(model.apply, cfg))
    base = jax.jit(model.apply)({"params": params}, ids)
    np.testing.assert_array_equal(f({"params": lp}, ids), base)  # B = 0: exactly the base model

    lp = randomize_lora(lp)
    unmerged = f({"params": lp}, ids)
    merged = model.apply({"params": lora_jax.merge(lp, cfg, layouts=layouts)}, ids)  # 3-axis kernels: layouts, never guessed
    assert float(jnp.abs(unmerged - base).max()) > 1e-2  # the adapters really act
    np.testing.assert_allclose(unmerged, merged, rtol=1e-5, atol=1e-5 * float(jnp.abs(merged).max()))


def test_every_adapted_module_contributes(setup):
    """Removing any single adapter changes the output: none is silently ignored by the interceptor."""
    model, ids, params = setup
    cfg = LoraConfig(r=2, target_modules="all-linear")
    lp = randomize_lora(lora_jax.inject(params, cfg, jax.random.key(3), layouts=lora_jax.kernel_layouts(model, ids)))
    full = lora_jax.apply(model.apply, cfg)({"params": lp}, ids)
    lora, frozen = lora_jax.split(lp)
    for block in ("block_0", "block_1"):
        for name in ("query", "key", "value", "out"):
            ablated = jax.tree_util.tree_map(lambda x: x, lora)
            ablated[block]["attn"][name]["lora_b"] = jnp.zeros_like(ablated[block]["attn"][name]["lora_b"])
            out = lora_jax.apply(model.apply, cfg)({"params": lora_jax.combine(ablated, frozen)}, ids)
            assert float(jnp.abs(out - full).max()) > 1e-6, f"{block}.attn.{name} had no effect"


def test_merge_on_the_fly_fallback_matches(setup):
    model, ids, params = setup
    cfg = LoraConfig(r=2, target_modules=["fc1", "fc2"])
    lp = randomize_lora(lora_jax.inject(params, cfg, jax.random.key(4)))
    lora, frozen = lora_jax.split(lp)
    on_the_fly = model.apply({"params": lora_jax.merge(lora_jax.combine(lora, frozen), cfg)}, ids)
    unmerged = lora_jax.apply(model.apply, cfg)({"params": lp}, ids)
    np.testing.assert_allclose(on_the_fly, unmerged, rtol=1e-5, atol=1e-5)


class Encoder(nn.Module):  # headless: the last MLP's output has the model output's shape, then residual + norm
    tied: bool = False

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(16, 16, embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
                         name="embed")
        x = embed(ids)
        x = x + nn.Dense(16, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed")),
                         name="down")(nn.relu(nn.Dense(32, name="up")(x)))
        x = nn.LayerNorm(name="norm")(x)
        return embed.attend(x) if self.tied else x  # tied logits: vocab == width, so shapes alone cannot tell


class SoftCapped(nn.Module):
    @nn.compact
    def __call__(self, x):
        return 30.0 * jnp.tanh(nn.Dense(4, name="score")(nn.Dense(4, name="fc")(x)) / 30.0)


def test_output_layer_only_when_the_output_is_its_post_processing():
    """all-linear leaves out only a real output layer: not a headless model's last MLP, nor the last
    Dense before a tied Embed.attend; a soft-capped head still is one. Boxed params are read."""
    ids = jnp.ones((1, 3), jnp.int32)
    for tied in (False, True):
        layouts = lora_jax.kernel_layouts(Encoder(tied=tied), ids)  # nn.with_logical_partitioning: no crash
        assert layouts.output_module is None and set(layouts) == {"up", "down"}
    assert lora_jax.kernel_layouts(SoftCapped(), jax.ShapeDtypeStruct((1, 4), jnp.float32)).output_module == "score"  # abstract input
    boxed = Encoder().init(jax.random.key(0), ids)["params"]
    with pytest.raises(ValueError, match=r"metadata boxes .*inject\(flax.linen.unbox\(params\)"):
        lora_jax.inject(boxed, LoraConfig(target_modules=["up"]), jax.random.key(1))
    lp = lora_jax.inject(nn.unbox(boxed), LoraConfig(target_modules="all-linear"), jax.random.key(1),
                         layouts=lora_jax.kernel_layouts(Encoder(), ids))
    assert "lora_a" in lp["up"] and "lora_a" in lp["down"]  # PEFT adapts every Linear of a headless model
    layouts = lora_jax.kernel_layouts(SoftCapped(), jnp.ones((1, 4)))
    params = SoftCapped().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    assert "lora_a" not in lora_jax.inject(params, LoraConfig(target_modules="all-linear"), jax.random.key(1), layouts=layouts)["score"]
    layouts.output_module = None  # PEFT on a plain torch module: no output embedding to leave out (README)
    assert "lora_a" in lora_jax.inject(params, LoraConfig(target_modules="all-linear"), jax.random.key(1), layouts=layouts)["score"]


class ScanLayer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(8, name="fc")(x), None


class ScannedNet(nn.Module):
    axis: int = 0  # MaxText scans its layers' params on axis 1 (param_scan_axis)

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(ScanLayer, variable_axes={"params": self.axis}, split_rngs={"params": True}, length=3)
        return nn.Dense(2, name="head")(stack(name="layers")(x, None)[0])


def test_user_scans_refuse_what_they_cannot_honour_in_one_line():
    x = jnp.ones((1, 8))
    layouts = lora_jax.kernel_layouts(ScannedNet(axis=1), x)  # fc kernel [8, 3, 8]: axis 0 is not the layer axis
    params = ScannedNet(axis=1).init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match=r"'layers.fc' \(8, 3, 8\) is stacked by nn.scan/nn.vmap on an axis other than its first"):
        lora_jax.inject(params, LoraConfig(target_modules="all-linear"), jax.random.key(1), layouts=layouts)
    assert "lora_a" in lora_jax.inject(params, LoraConfig(target_modules=["head"]), jax.random.key(1), layouts=layouts)["head"]
    params = ScannedNet().init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match="layers_to_transform cannot pick layers of 'layers.fc'"):
        lora_jax.inject(params, LoraConfig(target_modules=["fc"], layers_to_transform=[1]), jax.random.key(1),
                        layouts=lora_jax.kernel_layouts(ScannedNet(), x))


def test_batch_dims_dense_general_is_refused_at_inject_only_when_targeted():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):  # x [n, b, d]: one kernel per n
            return nn.Dense(2, name="head")(nn.DenseGeneral(4, batch_dims=(0,), name="per_n")(x))

    x = jnp.ones((3, 2, 5))
    layouts = lora_jax.kernel_layouts(Net(), x)
    params = Net().init(jax.random.key(0), x)["params"]
    assert "lora_a" in lora_jax.inject(params, LoraConfig(target_modules=["head"]), jax.random.key(1), layouts=layouts)["head"]
    with pytest.raises(ValueError, match=r"nn.DenseGeneral with batch_dims \('per_n'\) is not supported"):
        lora_jax.inject(params, LoraConfig(target_modules="all-linear"), jax.random.key(1), layouts=layouts)


class CNN(nn.Module):  # as flax's examples/mnist
    @nn.compact
    def __call__(self, x):
        x = nn.avg_pool(nn.relu(nn.Conv(4, (3, 3), name="conv")(x)), (2, 2), strides=(2, 2))
        return nn.Dense(3, name="head")(nn.relu(nn.Dense(8, name="fc")(x.reshape((x.shape[0], -1)))))


def test_convolutions_are_not_linear_layers():
    """PEFT's all-linear takes Linear layers only; naming a conv is a one-line refusal, not a layout error."""
    x = jnp.ones((1, 4, 4, 1))
    layouts = lora_jax.kernel_layouts(CNN(), x)
    params = CNN().init(jax.random.key(0), x)["params"]
    lp = lora_jax.inject(params, LoraConfig(target_modules="all-linear"), jax.random.key(1), layouts=layouts)
    assert sorted(k for k in lp if "lora_a" in lp[k]) == ["fc"]
    with pytest.raises(ValueError, match=r"'conv' \(flax.linen.linear.Conv\) is not a flax Dense .* lora_jax does not adapt it"):
        lora_jax.inject(params, LoraConfig(target_modules=["conv", "fc"]), jax.random.key(1), layouts=layouts)
    with pytest.raises(ValueError, match="matches the embedding 'embed': LoRA on embeddings"):
        lora_jax.inject(nn.unbox(Encoder().init(jax.random.key(0), jnp.ones((1, 3), jnp.int32))["params"]),
                        LoraConfig(target_modules=["embed", "up"]), jax.random.key(1))


def test_lora_jax_dense_without_its_own_config_takes_the_apply_config_dropout():
    class Net(nn.Module):  # lora_jax.Dense as a drop-in for nn.Dense, run through lora_jax.apply
        @nn.compact
        def __call__(self, x):
            return lora_jax.Dense(4, name="q_proj")(x)

    x = jnp.ones((2, 3))
    cfg = LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.5)
    params = lora_jax.inject(Net().init(jax.random.key(0), x)["params"], cfg, jax.random.key(1))
    params["q_proj"]["lora_b"] = jnp.ones_like(params["q_proj"]["lora_b"])
    f = lora_jax.apply(Net().apply, cfg)
    a, b = (f({"params": params}, x, rngs={"dropout": jax.random.key(s)}) for s in (2, 3))
    assert float(jnp.abs(a - b).max()) > 0  # training: dropout on the adapter input
    np.testing.assert_allclose(f({"params": params}, x), Net().apply({"params": lora_jax.merge(params)}, x), atol=1e-6)  # eval
