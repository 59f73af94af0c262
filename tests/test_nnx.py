"""LoRA on a flax.nnx transformer written in plain nnx style (nothing in it knows about LoRA),
checked against PEFT on a PyTorch twin with the same module names and weights."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P

import lora_jax
import lora_jax.nnx as lnnx
from lora_jax import LoraConfig

V, D, F, L = 32, 16, 24, 2


class Attention(nnx.Module):
    def __init__(self, rngs):
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nnx.Linear(D, D, use_bias=False, rngs=rngs) for _ in range(4))

    def __call__(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        s = jnp.einsum("btd,bsd->bts", q, k) / D**0.5
        s = jnp.where(jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool)), s, -1e9)
        return self.o_proj(jnp.einsum("bts,bsd->btd", jax.nn.softmax(s, axis=-1), v))


class Block(nnx.Module):
    def __init__(self, rngs):
        self.input_layernorm = nnx.LayerNorm(D, rngs=rngs)
        self.self_attn = Attention(rngs)
        self.post_attention_layernorm = nnx.LayerNorm(D, rngs=rngs)
        self.mlp = nnx.Dict(up_proj=nnx.Linear(D, F, rngs=rngs), down_proj=nnx.Linear(F, D, rngs=rngs))

    def __call__(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        h = self.post_attention_layernorm(x)
        return x + self.mlp["down_proj"](jax.nn.relu(self.mlp["up_proj"](h)))


class Decoder(nnx.Module):
    def __init__(self, rngs):
        self.embed_tokens = nnx.Embed(V, D, rngs=rngs)
        self.layers = nnx.List([Block(rngs) for _ in range(L)])


class TinyLM(nnx.Module):
    def __init__(self, rngs):
        self.model = Decoder(rngs)
        self.lm_head = nnx.Linear(D, V, use_bias=False, rngs=rngs)

    def __call__(self, ids):
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(x)


def torch_twin(model):
    """The same network in PyTorch, weights copied (Linear weight = kernel.T)."""
    tn = torch.nn

    class TAttn(tn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (tn.Linear(D, D, bias=False) for _ in range(4))

        def forward(self, x):
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            s = q @ k.transpose(1, 2) / D**0.5
            s = s.masked_fill(~torch.tril(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool)), -1e9)
            return self.o_proj(torch.softmax(s, -1) @ v)

    class TBlock(tn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm, self.post_attention_layernorm = tn.LayerNorm(D, eps=1e-6), tn.LayerNorm(D, eps=1e-6)
            self.self_attn = TAttn()
            self.mlp = tn.ModuleDict(dict(up_proj=tn.Linear(D, F), down_proj=tn.Linear(F, D)))

        def forward(self, x):
            x = x + self.self_attn(self.input_layernorm(x))
            return x + self.mlp["down_proj"](torch.relu(self.mlp["up_proj"](self.post_attention_layernorm(x))))

    class TLM(tn.Module):
        def __init__(self):
            super().__init__()
            self.model = tn.Module()
            self.model.embed_tokens = tn.Embedding(V, D)
            self.model.layers = tn.ModuleList([TBlock() for _ in range(L)])
            self.lm_head = tn.Linear(D, V, bias=False)

        def forward(self, ids):
            x = self.model.embed_tokens(ids)
            for layer in self.model.layers:
                x = layer(x)
            return self.lm_head(x)

    twin = TLM().eval()
    sd = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = ".".join(str(p) for p in path)
        arr = torch.tensor(np.asarray(var[...]))
        leaf = name.rsplit(".", 1)[-1]
        base = name.rsplit(".", 1)[0]
        if leaf == "kernel":
            sd[base + ".weight"] = arr.T
        elif leaf in ("scale", "embedding"):
            sd[base + ".weight"] = arr
        else:
            sd[name] = arr
    twin.load_state_dict(sd)
    return twin


IDS = np.random.default_rng(0).integers(0, V, (2, 6)).astype(np.int32)
CFG = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                 rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"down_proj": 2})


def adapted(cfg=CFG, seed=0):
    model = TinyLM(nnx.Rngs(seed))  # (eager calls below: a handful of tiny ops each)
    lnnx.inject(model, cfg, nnx.Rngs(1))
    for i, m in enumerate(lnnx.adapters(model).values()):  # nonzero A and B
        m.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(10 + i), m.lora_b.shape)
    return model


def test_only_lora_params_train_and_the_gradient_exists_only_for_them():
    model = adapted()
    state = nnx.state(model, lnnx.LoraParam)
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(state)}
    assert names and all(n.endswith(("lora_a", "lora_b")) for n in names)
    base = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
            if not isinstance(v, lnnx.LoraParam)}
    opt = nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=0.1), wrt=lnnx.LoraParam)

    @nnx.jit
    def step(model, opt):
        grads = nnx.grad(lambda m: jnp.mean(m(IDS) ** 2), argnums=nnx.DiffState(0, lnnx.LoraParam))(model)
        opt.update(model, grads)
        return grads

    before = {n: np.asarray(v[...]) for n, v in ((".".join(map(str, p)), v) for p, v in nnx.to_flat_state(state))}
    grads = step(model, opt)
    assert {".".join(map(str, p)) for p, _ in nnx.to_flat_state(grads)} == names
    after = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert all(np.array_equal(after[n], x) for n, x in base.items())  # frozen: untouched
    assert all(not np.array_equal(after[n], before[n]) for n in names)  # every adapter moved
    assert lnnx.trainable_parameters_line(model).startswith("trainable params: ")


def test_forward_merge_unmerge_and_dropout():
    model = adapted()
    base_model = TinyLM(nnx.Rngs(0))
    y0, y = base_model(IDS), model(IDS)
    assert float(jnp.abs(y - y0).max()) > 1e-3
    lnnx.merge(model)
    np.testing.assert_allclose(model(IDS), y, atol=1e-5)
    lnnx.unmerge(model)
    np.testing.assert_allclose(model(IDS), y, atol=1e-5)
    plain = lnnx.merge_and_unload(adapted())
    assert isinstance(plain.model.layers[0].self_attn.q_proj, nnx.Linear)
    np.testing.assert_allclose(plain(IDS), y, atol=1e-5)
    drop = adapted(LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.5))
    drop.train()
    assert float(jnp.abs(drop(IDS) - drop(IDS)).max()) > 0  # stochastic in train mode
    drop.eval()
    np.testing.assert_array_equal(drop(IDS), drop(IDS))


def test_targeting_and_all_linear_output_layer():
    model = TinyLM(nnx.Rngs(0))
    lnnx.inject(model, LoraConfig(target_modules="all-linear"), nnx.Rngs(1))  # HF layout: lm_head is the output layer
    keys = set(lnnx.adapters(model))
    assert "lm_head" not in keys and len(keys) == L * 6
    with pytest.raises(ValueError, match="which is not a dense kernel"):
        lnnx.inject(TinyLM(nnx.Rngs(0)), LoraConfig(target_modules=".*self_attn"), nnx.Rngs(1))
    with pytest.raises(ValueError, match="all-linear.*pass output_module="):
        lnnx.inject(Attention(nnx.Rngs(0)), LoraConfig(target_modules="all-linear"), nnx.Rngs(1))
    some = lnnx.inject(Attention(nnx.Rngs(0)), LoraConfig(target_modules="all-linear"), nnx.Rngs(1), output_module="o_proj")
    assert sorted(lnnx.adapters(some)) == ["k_proj", "q_proj", "v_proj"]
    with pytest.raises(ValueError, match="already holds LoRA adapters"):
        lnnx.inject(model, LoraConfig(target_modules=["q_proj"]), nnx.Rngs(1))


def test_peft_export_and_import_match_peft(tmp_path):
    import peft

    model = adapted()
    ours = np.asarray(model(IDS))
    out = lnnx.save_peft_adapter(model, CFG, tmp_path / "a")
    twin = torch_twin(TinyLM(nnx.Rngs(0)))
    with torch.no_grad():
        base_logits = twin(torch.tensor(IDS, dtype=torch.long)).numpy()
    np.testing.assert_allclose(base_logits, np.asarray(TinyLM(nnx.Rngs(0))(IDS)), atol=1e-4)  # the twins agree
    assert peft.LoraConfig.from_pretrained(out).task_type is None  # a custom model, as PEFT saves one
    theirs_model = peft.PeftModel.from_pretrained(twin, out)
    with torch.no_grad():
        theirs = theirs_model(torch.tensor(IDS, dtype=torch.long)).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    back, cfg = lnnx.load_peft_adapter(TinyLM(nnx.Rngs(0)), out)
    np.testing.assert_allclose(np.asarray(back(IDS)), ours, atol=1e-6)
    assert cfg.rank_for("model.layers.1.self_attn.q_proj") == 2


def test_linen_entry_points_refuse_nnx_objects_and_unadaptable_modules():
    import flax.linen as nn

    model = TinyLM(nnx.Rngs(0))
    for obj in (model, nnx.state(model)):
        with pytest.raises(ValueError, match="use lora_jax.nnx.inject"):
            lora_jax.inject(obj, LoraConfig(target_modules=["q_proj"]), jax.random.key(0))

    class Custom(nn.Module):  # owns a 'kernel' but is not a Dense: lora_jax.apply cannot add its adapter
        @nn.compact
        def __call__(self, x):
            return x @ self.param("kernel", nn.initializers.ones, (x.shape[-1], 3))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Custom(name="q_proj")(x)

    x, net = jnp.ones((1, 2)), Net()
    cfg = LoraConfig(r=1, target_modules=["q_proj"])
    params = lora_jax.inject(net.init(jax.random.key(0), x)["params"], cfg, jax.random.key(1))
    with pytest.raises(ValueError, match="'q_proj' .Custom. holds LoRA leaves, but lora_jax.apply adapts only"):
        lora_jax.apply(net.apply, cfg)({"params": params}, x)


def test_inject_refuses_variants_it_would_ignore_and_draws_b_for_init_false():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.q_proj = nnx.Linear(8, 8, rngs=rngs)

    for kw, what in ((dict(use_dora=True), "use_dora=True"), (dict(init="pissa"), "init='pissa'"), (dict(init="olora"), "init='olora'")):
        with pytest.raises(ValueError, match=f"supports plain LoRA .*not {what}"):  # never plain LoRA in their place
            lnnx.inject(Net(nnx.Rngs(0)), LoraConfig(r=2, target_modules=["q_proj"], **kw), nnx.Rngs(1))
    model = lnnx.inject(Net(nnx.Rngs(0)), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), nnx.Rngs(1))
    b = np.asarray(model.q_proj.lora_b[...])
    assert b.any() and np.abs(b).max() <= 1 / 4**0.5  # PEFT's init_lora_weights=False: U(±1/sqrt(r))


class StackedDecoder(nnx.Module):  # the same network with its layers made by nnx.vmap and run by nnx.scan
    def __init__(self, rngs):
        self.embed_tokens = nnx.Embed(V, D, rngs=rngs)

        @nnx.split_rngs(splits=L)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Block(rngs)

        self.layers = make(rngs)


class StackedLM(nnx.Module):
    def __init__(self, rngs):
        self.model = StackedDecoder(rngs)
        self.lm_head = nnx.Linear(D, V, use_bias=False, rngs=rngs)

    def __call__(self, ids):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def run(layer, x):
            return layer(x)

        return self.lm_head(run(self.model.layers, self.model.embed_tokens(ids)))


def stacked_copy_of(listed):
    """A StackedLM holding exactly the weights of a TinyLM (layer i = slice i)."""
    flat = {tuple(p): v[...] for p, v in nnx.to_flat_state(nnx.state(listed, nnx.Param))}
    stacked = StackedLM(nnx.Rngs(5))
    for p, var in nnx.to_flat_state(nnx.state(stacked, nnx.Param)):
        p = tuple(p)
        value = np.stack([flat[p[:2] + (i,) + p[2:]] for i in range(L)]) if p[:2] == ("model", "layers") else flat[p]
        var[...] = jnp.asarray(value)
    nnx.update(stacked, nnx.state(stacked, nnx.Param))
    return stacked


def test_stacked_layers_adapters_match_the_list_model_and_peft(tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], alpha_pattern={"layers.1.self_attn.q_proj": 2})
    listed = TinyLM(nnx.Rngs(0))
    stacked = stacked_copy_of(listed)
    np.testing.assert_allclose(stacked(IDS), listed(IDS), atol=1e-5)
    lnnx.inject(stacked, cfg, nnx.Rngs(1))
    q = stacked.model.layers.self_attn.q_proj
    assert q.lora_a.shape == (L, D, 4) and q.lora_scale[...].tolist() == [2.0, 0.5]  # per-layer alpha, PEFT's names
    for i, m in enumerate(lnnx.adapters(stacked).values()):
        m.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(20 + i), m.lora_b.shape)
    ours = np.asarray(stacked(IDS))
    out = lnnx.save_peft_adapter(stacked, cfg, tmp_path / "a")
    back, _ = lnnx.load_peft_adapter(TinyLM(nnx.Rngs(0)), out)  # into the list model: same function
    np.testing.assert_allclose(np.asarray(back(IDS)), ours, atol=1e-5)
    again, _ = lnnx.load_peft_adapter(stacked_copy_of(TinyLM(nnx.Rngs(0))), out)  # and into a stacked one
    np.testing.assert_allclose(np.asarray(again(IDS)), ours, atol=1e-5)
    lnnx.merge(stacked)
    np.testing.assert_allclose(np.asarray(stacked(IDS)), ours, atol=1e-5)


class TiedLM(nnx.Module):  # as flax's examples/gemma: logits from the embedding, model code reads a kernel's shape
    def __init__(self, rngs):
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.o = nnx.Einsum("btnh,nhd->btd", (2, D // 2, D), rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        heads = self.o.kernel.shape[0]
        return self.embed.attend(x + self.o(x.reshape(x.shape[:2] + (heads, -1))))


def test_wrapped_modules_keep_their_attributes_and_tied_models_have_no_output_layer():
    model = TiedLM(nnx.Rngs(0))
    with pytest.raises(ValueError, match="output_module='embed' is not an nnx.Linear .* pass output_module=''"):
        lnnx.inject(model, LoraConfig(target_modules="all-linear"), nnx.Rngs(1), output_module="embed")
    lnnx.inject(model, LoraConfig(r=2, target_modules="all-linear"), nnx.Rngs(1), output_module="")
    assert list(lnnx.adapters(model)) == ["o"] and model.o.kernel.shape == (2, D // 2, D)
    model.o.lora_b[...] = jnp.ones_like(model.o.lora_b[...])
    y = model(IDS)  # reads self.o.kernel through the wrapper
    np.testing.assert_allclose(lnnx.merge_and_unload(model)(IDS), y, atol=1e-4)


class Shared(nnx.Module):  # one Linear used under two names (weight sharing), and a user attribute called `base`
    def __init__(self, rngs):
        self.up = nnx.Linear(D, D, rngs=rngs)
        self.again = self.up
        self.base = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
        return self.base(self.again(jax.nn.relu(self.up(x))))


def test_shared_modules_are_adapted_wherever_used_and_flax_lora_filters_see_the_adapters():
    x = jax.random.normal(jax.random.key(0), (2, D))
    model = lnnx.inject(Shared(nnx.Rngs(0)), LoraConfig(r=2, target_modules=["up", "base"]), nnx.Rngs(1))
    assert model.again is model.up and sorted(lnnx.adapters(model)) == ["again", "base"]  # listed once, first name in nnx order
    assert len(jax.tree.leaves(nnx.state(model, nnx.LoRAParam))) == 4  # code written for flax's nnx.LoRA trains them
    for m in lnnx.adapters(model).values():
        m.lora_b[...] = jnp.ones_like(m.lora_b[...])
    y = model(x)
    np.testing.assert_allclose(lnnx.merge(model)(x), y, atol=1e-4)  # the shared kernel takes ΔW once, used twice
    plain = lnnx.merge_and_unload(model)
    assert type(plain.again) is nnx.Linear and plain.again is plain.up
    np.testing.assert_allclose(plain(x), y, atol=1e-4)


def test_targeting_an_embedding_or_conv_is_refused_not_skipped():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.embed_tokens, self.q_proj = nnx.Embed(V, D, rngs=rngs), nnx.Linear(D, D, rngs=rngs)
            self.conv = nnx.Conv(D, D, (3,), rngs=rngs)

    for target, kind in ((["embed_tokens", "q_proj"], "Embed"), (["conv"], "Conv")):
        with pytest.raises(ValueError, match=rf"matches '{target[0]}' \({kind}\): lora_jax.nnx adapts nnx.Linear"):
            lnnx.inject(Net(nnx.Rngs(0)), LoraConfig(target_modules=target), nnx.Rngs(1))
    assert list(lnnx.adapters(lnnx.inject(Net(nnx.Rngs(0)), LoraConfig(target_modules="all-linear"), nnx.Rngs(1),
                                          output_module=""))) == ["q_proj"]


def test_adapters_inherit_their_kernel_sharding_annotations():
    """A takes the kernel's input-axis name, B its output-axis name (as lora_jax.sharding derives them)."""

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(D, F, kernel_metadata={"out_sharding": ("embed", "mlp")}, rngs=rngs)
            self.o = nnx.LinearGeneral((2, D // 2), D, axis=(-2, -1), kernel_metadata={"out_sharding": ("heads", None, "embed")},
                                       rngs=rngs)

    mesh = jax.make_mesh((1, 1, 1), ("embed", "mlp", "heads"))
    with jax.set_mesh(mesh):
        net = Net(nnx.Rngs(0))
    lnnx.inject(net, LoraConfig(r=2, target_modules=["up", "o"]), nnx.Rngs(1))  # outside the mesh: annotations only
    specs = nnx.get_partition_spec(nnx.state(net, lnnx.LoraParam))
    assert (specs["up"]["lora_a"].get_value(), specs["up"]["lora_b"].get_value()) == (P("embed", None), P(None, "mlp"))
    assert (specs["o"]["lora_a"].get_value(), specs["o"]["lora_b"].get_value()) == (P("heads", None), P(None, "embed"))
    with jax.set_mesh(mesh):  # under the mesh: placed at creation, as the kernels were
        net = lnnx.inject(Net(nnx.Rngs(0)), LoraConfig(r=2, target_modules=["up"]), nnx.Rngs(1))
        assert net.up.lora_b[...].sharding.spec == P(None, "mlp")


def test_layers_stacked_on_a_later_axis_are_refused_not_misread():
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=1)  # kernel [in, L, out]: its first axis is no layer axis
    def make(rngs):
        return nnx.Dict(q_proj=nnx.Linear(D, F, rngs=rngs))

    class Net(nnx.Module):
        def __init__(self):
            self.layers = make(nnx.Rngs(0))

    with pytest.raises(ValueError, match=rf"'layers.q_proj' has a kernel of shape \({D}, 3, {F}\), not its own \({D}, {F}\)"):
        lnnx.inject(Net(), LoraConfig(r=2, target_modules=["q_proj"]), nnx.Rngs(1))

