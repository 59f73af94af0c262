"""The attention dispatcher as a table: (platform, dtype, head dim, mask kind, window, softcap, GPU,
cuDNN, jax version) -> what "auto" runs and what an explicit choice says. The platform and the
device facts are injected; nothing here needs the device it describes."""

from __future__ import annotations

import pytest

from lora_jax.errors import UserError
from lora_jax.models.attn_dispatch import Call, plan, unsupported

H100 = dict(gpu_capability=(9, 0), cudnn_version=90800)
A100 = dict(gpu_capability=(8, 0), cudnn_version=90800)
T4 = dict(gpu_capability=(7, 5), cudnn_version=90800)


def call(platform="gpu", dtype="bfloat16", head_dim=64, mask="causal", t=2048, s=None, heads=(32, 8), **kw):
    facts = dict(H100) if platform == "gpu" else {}
    facts.update(kw)
    return Call(platform, dtype, head_dim, heads[0], heads[1], t, t if s is None else s, mask, **facts)


AUTO = [  # (call, what auto runs first)
    (call(), "cudnn"),  # Llama-3.2-1B shapes, bf16, causal
    (call(head_dim=128), "cudnn"),
    (call(mask="segments"), "cudnn"),  # padding / packing: cuDNN's packed layout on Hopper
    (call(mask="segments", window=True), "reference"),  # window over packed rows: not verified on a GPU
    (call(window=True), "cudnn"),  # plain causal window: jax's own cuDNN tests cover it
    (call(mask="cache", t=1, s=2048), "reference"),  # decoding
    (call(mask="cache", s=4096), "reference"),  # prefill into a cache
    (call(dtype="float32"), "reference"),  # cuDNN flash attention is bf16/fp16 only
    (call(dtype="float16"), "cudnn"),
    (call(softcap=True), "reference"),  # Gemma 2/3 soft-capping
    (call(head_dim=96), "cudnn"),
    (call(head_dim=100), "reference"),  # not a multiple of 8
    (call(head_dim=256), "cudnn"),  # Hopper: up to 256
    (call(head_dim=256, **A100), "reference"),  # Ampere: up to 128
    (call(mask="segments", **A100), "reference"),  # packed layout needs Hopper
    (call(**A100), "cudnn"),
    (call(**T4), "reference"),
    (call(cudnn_version=None), "reference"),  # jax finds no cuDNN
    (call(gpu_capability=None), "reference"),  # a GPU without CUDA capability (ROCm)
    (call(mask="segments", cudnn_packed_api=False), "reference"),  # jax._src.cudnn moved or absent
    (call(jax_version=(0, 9, 2)), "reference"),  # older than the versions the calls were exercised with
    (call(mask="segments", t=1), "reference"),
    (call("tpu"), "splash"),
    (call("tpu", mask="segments", window=True, softcap=True), "splash"),
    (call("tpu", dtype="float32"), "splash"),
    (call("tpu", t=1000), "reference"),  # splash needs T % 128 == 0
    (call("tpu", mask="cache", s=4096), "reference"),
    (call("tpu", splash_api=False), "reference"),
    (call("cpu", dtype="float32"), "reference"),
    (call("cpu", mask="segments", t=128), "reference"),
]


@pytest.mark.parametrize("c,first", AUTO, ids=[f"{c.platform}-{c.mask}-{i}" for i, (c, _) in enumerate(AUTO)])
def test_auto_picks(c, first):
    chosen, passed = plan("auto", c)
    assert chosen[0] == first
    assert chosen[-1] == "reference"  # the exact path always closes the list
    assert set(chosen) | set(passed) == {"reference", "xla", "cudnn", "splash"}
    assert all(passed.values())  # every implementation passed over says why


EXPLICIT = [  # (requested, call, None = served, else a fragment of the one-line error)
    ("cudnn", call(), None),
    ("cudnn", call("cpu", dtype="float32"), "needs an NVIDIA GPU (platform is cpu)"),
    ("cudnn", call(dtype="float32"), "needs bfloat16/float16 compute, the model computes in float32"),
    ("cudnn", call(softcap=True), "no logit soft-capping"),
    ("cudnn", call(mask="segments", **A100), "compute capability >= 9.0 (Hopper)"),
    ("cudnn", call(mask="segments", window=True), "sliding window over padded or packed rows is not yet verified"),
    ("cudnn", call(**T4), "needs compute capability >= 8.0, this GPU has 7.5"),
    ("cudnn", call(jax_version=(0, 9, 2)), "needs jax >= 0.10.0"),
    ("splash", call(), "a TPU kernel"),
    ("splash", call("cpu", dtype="float32", t=128), None),  # interpret mode: what the CPU tests run
    ("splash", call("tpu", t=100), "sequence length divisible by 128, got 100"),
    ("splash", call("tpu", dtype="float16"), "needs bfloat16/float32 compute"),
    ("xla", call(softcap=True), "no logit soft-capping"),
    ("xla", call("cpu", mask="cache", s=64), None),
    ("reference", call(softcap=True, mask="cache", s=4096), None),
]


@pytest.mark.parametrize("requested,c,error", EXPLICIT, ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(EXPLICIT)])
def test_explicit_choice(requested, c, error):
    if error is None:
        assert plan(requested, c) == ([requested], {})
        assert unsupported(requested, c) is None
    else:
        with pytest.raises(UserError) as e:
            plan(requested, c)
        msg = str(e.value)
        assert "\n" not in msg and error in msg and msg.startswith(f"attention={requested!r} cannot serve this call (")
        assert msg.endswith("use attention='auto' or 'reference'")


@pytest.mark.parametrize("requested", ["cudnn", "splash"])
def test_kv_cache_calls_run_the_reference_path_whatever_the_choice(requested):
    chosen, passed = plan(requested, call("tpu" if requested == "splash" else "gpu", mask="cache", t=1, s=4096))
    assert chosen == ["reference"] and "no KV-cache calls" in passed[requested]


def test_unknown_option():
    with pytest.raises(UserError, match="attention='flash' is not an implementation; use one of auto, reference"):
        plan("flash", call())
