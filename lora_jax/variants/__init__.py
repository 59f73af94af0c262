"""LoRA variants beyond plain A·B: DoRA, PEFT's weight-rewriting initialisations, LoRA+.

    lora_jax.variants.dora       DoRA's magnitude leaf: forward, init, merge (PEFT's DoraLinearLayer)
    lora_jax.variants.inits      PiSSA / pissa_niter_N / OLoRA inits (rewrite W) and convert_to_lora for export
    lora_jax.variants.loftq      LoftQ: NF4 base + A/B from the quantization error (PEFT's loftq_init)
    lora_jax.variants.loraplus   LoRA+: B's learning rate × ratio (PEFT's create_loraplus_optimizer)

>>> from lora_jax.variants import dora
>>> dora.__name__
'lora_jax.variants.dora'
"""

from lora_jax.variants import dora  # noqa: F401
from lora_jax.variants.inits import convert_to_lora, rewrites_base  # noqa: F401
from lora_jax.variants.loftq import loftq_init  # noqa: F401
from lora_jax.variants.loraplus import loraplus, loraplus_labels  # noqa: F401
