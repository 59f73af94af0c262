"""Per-platform defaults of the settings that trade memory for time: the remat policy of the model
(`build_model(remat="auto")`) and the LM-head loss chunk of the train/eval steps
(`make_train_step(loss_chunk="auto")`). Explicit values always win.

    platform  remat              loss chunk   why
    cpu       None               256          host RAM is large; remat costs 5-10% step time there
                                              (benchmarks/results/train_step.md); unchanged defaults
    gpu       save_projections   256          measured on one H100 80GB (issue 10, Llama-3.2-1B
                                              shapes, bf16, batch 4x2048): without remat the step ran
                                              out of memory (one 32 GiB buffer: the einsum attention's
                                              fp32 scores); save_projections with cuDNN attention ran
                                              at 2.1x PEFT's tokens/s in 9.05 GB. No-remat with cuDNN
                                              attention was not measured, so it is not the default.
                                              The chunk is the one those runs used.
    tpu       save_projections   256          not measured: HBM per chip (16-95 GB) is at most a GPU's,
                                              so the GPU's measured setting is the safe one

>>> platform_defaults("gpu").remat, platform_defaults("cpu").loss_chunk
('save_projections', 256)
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class PlatformDefaults:
    """The defaults of one platform (see the module docstring)."""

    remat: str | None
    loss_chunk: int


PLATFORM_DEFAULTS = {
    "cpu": PlatformDefaults(remat=None, loss_chunk=256),
    "gpu": PlatformDefaults(remat="save_projections", loss_chunk=256),
    "tpu": PlatformDefaults(remat="save_projections", loss_chunk=256),
}


def platform_defaults(platform: str | None = None) -> PlatformDefaults:
    """The defaults for `platform` (None: jax's default backend; unknown platforms get the CPU's).

    >>> platform_defaults("tpu").remat
    'save_projections'
    """
    return PLATFORM_DEFAULTS.get(platform or jax.default_backend(), PLATFORM_DEFAULTS["cpu"])
