"""Which attention implementation serves a call: a pure function of the call's static facts.

    Call(platform, dtype, head_dim, heads, kv heads, lengths, mask kind, window, softcap,
         jax version, GPU compute capability, cuDNN version, available jax APIs)
      -> unsupported(impl, call): the reason `impl` cannot serve it exactly, or None
      -> plan(requested, call):   the implementations to try, in order

`attention=` (a `build_model` / `from_pretrained` argument, recipe field `model.attention`):

    "reference"  our einsum path (scores in float32): exact everywhere, the parity-tested numerics
    "xla"        jax.nn.dot_product_attention(implementation="xla"): exact, no soft-capping
    "cudnn"      cuDNN flash attention (NVIDIA GPU, bf16/fp16): `lora_jax.models.attn_cudnn`
    "splash"     Pallas splash attention (TPU; interpret mode on CPU): `lora_jax.models.attn_splash`
    "auto"       per platform, the first of AUTO_ORDER that supports the call; logs once what it
                 picked and why it passed over the others

An explicit choice that cannot serve a call raises a one-line `UserError` naming what is
unsupported — except KV-cache calls (generation prefill and decoding), which the fused kernels do
not take: they run "reference" whatever the choice (logged), so a model trained with
attention="cudnn" still generates. Under "auto", a kernel that jax itself refuses while tracing (NotImplementedError:
an unsupported GPU, cuDNN build, …) hands over to the next candidate; "reference" ends every list.

Facts the table relies on (measured or tested, not assumed):
- cuDNN "causal" (is_causal, GQA, head dim 64) and "segments" (packed layout with the -1
  conventions) are exact on an H100 with jax 0.11.2 (/work/shared/notes/gpu-attention.md); the
  packed layout needs compute capability >= 9.0 (jax checks it too). cuDNN sliding windows are
  exercised by jax's own tests with a plain causal mask only, so a window over padded or packed
  rows is refused until `benchmarks/check_gpu_attention.py` shows it exact on a GPU.
- splash runs (and is tested against the reference) in Pallas interpret mode on CPU; it has not
  run on a TPU here.
- "xla" is never picked by "auto": it materialises the same [B, H, T, S] scores as "reference";
  on CPU its attention core was not faster at the shapes the CPU recipes train (0.91-1.10x the
  reference's time at <= 8x256 tokens, 0.82-0.86x at 2x512 with 32 heads; noisy, shared cores:
  benchmarks/results/cpu_attention.md).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax

from lora_jax.errors import UserError

IMPLEMENTATIONS = ("reference", "xla", "cudnn", "splash")
CHOICES = ("auto",) + IMPLEMENTATIONS
MIN_JAX = (0, 10, 0)  # oldest jax the cuDNN/splash calls were exercised with (0.10.2 CPU, 0.11.2 H100)
# auto: fused kernels first where they exist; "reference" closes every list (always exact). On CPU
# the reference path is today's exact path; "xla" builds the same scores and was not clearly faster
# there (benchmarks/results/cpu_attention.md).
AUTO_ORDER = {"gpu": ("cudnn", "reference"), "tpu": ("splash", "reference"), "cpu": ("reference",)}
SPLASH_BLOCK = 128

log = logging.getLogger("lora_jax.attention")


def _version(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Call:
    """The static facts of one attention call (everything the choice depends on).

    >>> Call("gpu", "bfloat16", 64, 32, 8, 2048, 2048, "causal", gpu_capability=(9, 0), cudnn_version=90800).mask
    'causal'
    """

    platform: str  # "cpu" | "gpu" | "tpu"
    dtype: str  # compute dtype of q/k/v
    head_dim: int
    num_heads: int
    num_kv_heads: int
    q_len: int
    kv_len: int
    mask: str  # "causal" | "segments" | "cache" (lora_jax.models.masks)
    window: bool = False  # a sliding window applies (statically or by a run-time layer flag)
    softcap: bool = False  # logit soft-capping
    jax_version: tuple = dataclasses.field(default_factory=lambda: _version(jax.__version__))
    gpu_capability: tuple | None = None  # CUDA compute capability, e.g. (9, 0); None off NVIDIA GPUs
    cudnn_version: int | None = None  # e.g. 90800; None when jax finds no cuDNN
    cudnn_packed_api: bool = True  # jax._src.cudnn offers the packed layout
    splash_api: bool = True  # jax.experimental.pallas.ops.tpu.splash_attention imports

    def summary(self) -> str:
        extra = "".join([", window" if self.window else "", ", softcap" if self.softcap else ""])
        return (f"{self.platform}, {self.dtype}, head_dim {self.head_dim}, {self.num_heads}/{self.num_kv_heads} heads, "
                f"T={self.q_len} S={self.kv_len}, {self.mask} mask{extra}")


def _cudnn(c: Call) -> str | None:
    if c.platform != "gpu":
        return f"needs an NVIDIA GPU (platform is {c.platform})"
    if c.gpu_capability is None:
        return "needs an NVIDIA GPU with a CUDA compute capability"
    if c.cudnn_version is None:
        return "jax finds no cuDNN"
    if c.jax_version < MIN_JAX:
        return f"needs jax >= {'.'.join(map(str, MIN_JAX))}"
    if c.gpu_capability < (8, 0):
        return f"needs compute capability >= 8.0, this GPU has {c.gpu_capability[0]}.{c.gpu_capability[1]}"
    if c.dtype not in ("bfloat16", "float16"):
        return f"needs bfloat16/float16 compute, the model computes in {c.dtype} (use dtype='bfloat16')"
    max_dim = 256 if c.gpu_capability >= (9, 0) else 128
    if c.head_dim % 8 or c.head_dim > max_dim:
        return f"head_dim {c.head_dim} is not a multiple of 8 up to {max_dim}"
    if c.softcap:
        return "no logit soft-capping"
    if c.mask == "cache":
        return "no KV-cache calls (generation runs the reference path)"
    if c.q_len != c.kv_len:
        return "needs as many keys as queries"
    if c.mask == "segments":
        if c.gpu_capability < (9, 0):
            return "padded or packed rows need cuDNN's packed layout: compute capability >= 9.0 (Hopper)"
        if not c.cudnn_packed_api:
            return "this jax has no cuDNN packed-sequence attention (jax._src.cudnn)"
        if c.window:
            return "a sliding window over padded or packed rows is not yet verified on a GPU"
        if c.q_len < 2:
            return "the packed layout needs at least 2 positions"
    return None


def _splash(c: Call) -> str | None:
    if c.platform == "gpu":
        return "a TPU kernel (its Pallas interpret mode is for CPU tests)"
    if not c.splash_api:
        return "this jax has no Pallas splash attention"
    if c.jax_version < MIN_JAX:
        return f"needs jax >= {'.'.join(map(str, MIN_JAX))}"
    if c.dtype not in ("bfloat16", "float32"):
        return f"needs bfloat16/float32 compute, got {c.dtype}"
    if c.mask == "cache":
        return "no KV-cache calls (generation runs the reference path)"
    if c.q_len != c.kv_len:
        return "needs as many keys as queries"
    if c.q_len % SPLASH_BLOCK:
        return f"needs a sequence length divisible by {SPLASH_BLOCK}, got {c.q_len}"
    return None


def _xla(c: Call) -> str | None:
    return "no logit soft-capping in jax.nn.dot_product_attention" if c.softcap else None


_CHECKS = {"reference": lambda c: None, "xla": _xla, "cudnn": _cudnn, "splash": _splash}


def unsupported(impl: str, call: Call) -> str | None:
    """Why `impl` cannot serve `call` exactly, or None when it can.

    >>> unsupported("cudnn", Call("cpu", "float32", 64, 4, 4, 128, 128, "causal"))
    'needs an NVIDIA GPU (platform is cpu)'
    """
    return _CHECKS[impl](call)


def check_choice(attention: str) -> str:
    """Validate an `attention=` option (one-line UserError otherwise).

    >>> check_choice("cudnn")
    'cudnn'
    """
    if attention not in CHOICES:
        raise UserError(f"attention={attention!r} is not an implementation; use one of {', '.join(CHOICES)}")
    return attention


def plan(requested: str, call: Call) -> tuple[list[str], dict[str, str]]:
    """(implementations to try in order, {implementation passed over: why}) for `attention=requested`.

    >>> gpu = dict(gpu_capability=(9, 0), cudnn_version=90800)
    >>> plan("auto", Call("gpu", "bfloat16", 64, 32, 8, 2048, 2048, "segments", **gpu))[0]
    ['cudnn', 'reference']
    >>> plan("auto", Call("gpu", "float32", 64, 32, 8, 2048, 2048, "causal", **gpu))[0]
    ['reference']
    >>> plan("cudnn", Call("gpu", "bfloat16", 64, 32, 8, 1, 2048, "cache", **gpu))[0]  # generation
    ['reference']
    """
    check_choice(requested)
    if call.mask == "cache" and requested in ("cudnn", "splash"):
        return ["reference"], {requested: unsupported(requested, call) or "not used with a KV cache"}
    if requested != "auto":
        reason = unsupported(requested, call)
        if reason:
            raise UserError(f"attention={requested!r} cannot serve this call ({call.summary()}): {reason}; "
                            "use attention='auto' or 'reference'")
        return [requested], {}
    order = AUTO_ORDER.get(call.platform, ("reference",))
    chosen, passed = [], {}
    for impl in IMPLEMENTATIONS:
        reason = unsupported(impl, call)
        if impl not in order:
            passed[impl] = reason or f"not used by auto on {call.platform}"
        elif reason:
            passed[impl] = reason
    chosen = [impl for impl in order if impl not in passed]
    return chosen, passed


@functools.lru_cache(maxsize=None)
def runtime_facts(platform: str) -> dict:
    """The device facts of `Call` for this process (cached): GPU capability, cuDNN version, APIs.

    >>> sorted(runtime_facts("cpu"))
    ['cudnn_packed_api', 'cudnn_version', 'gpu_capability', 'splash_api']
    """
    from lora_jax.models import attn_cudnn, attn_splash

    capability = None
    if platform == "gpu":
        try:
            capability = tuple(int(x) for x in str(jax.devices()[0].compute_capability).split(".")[:2])
        except (AttributeError, ValueError):  # not an NVIDIA device
            capability = None
    return {"gpu_capability": capability, "cudnn_version": attn_cudnn.cudnn_version() if platform == "gpu" else None,
            "cudnn_packed_api": attn_cudnn.PACKED_API, "splash_api": attn_splash.SPLASH_API}


def current_platform() -> str:
    """The platform attention runs on: jax's default backend ("cpu", "gpu", "tpu"); tests replace it.

    >>> current_platform() in ("cpu", "gpu", "tpu")
    True
    """
    return jax.default_backend()


def describe(q, k, mask, softcap: float | None, platform: str | None = None) -> Call:
    """The `Call` of attention over q [B, T, H, d], k [B, S, K, d] with an `AttentionMask`.

    >>> import jax.numpy as jnp
    >>> from lora_jax.models.masks import AttentionMask
    >>> describe(jnp.ones((1, 4, 2, 8)), jnp.ones((1, 4, 1, 8)), AttentionMask(), None, "cpu").summary()
    'cpu, float32, head_dim 8, 2/1 heads, T=4 S=4, causal mask'
    """
    platform = platform or current_platform()
    return Call(platform, str(jax.numpy.dtype(q.dtype)), q.shape[3], q.shape[2], k.shape[2], q.shape[1], k.shape[1],
                mask.kind, window=mask.window is not None, softcap=softcap is not None, **runtime_facts(platform))


_LOGGED: set = set()


def log_once(requested: str, call: Call, used: str, passed: dict[str, str]) -> None:
    """Log (INFO, logger 'lora_jax.attention') which implementation serves `call`, once per call kind.

    >>> log_once("auto", Call("cpu", "float32", 8, 2, 1, 4, 4, "causal"), "reference", {"cudnn": "needs a GPU"})
    """
    key = (requested, call, used)
    if key in _LOGGED:
        return
    _LOGGED.add(key)
    others = "; ".join(f"{k}: {v}" for k, v in passed.items())
    log.info("attention=%s uses %s for (%s)%s", requested, used, call.summary(), f"; not {others}" if others else "")
