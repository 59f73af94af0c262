"""LoRA variants beyond plain A·B: DoRA, PEFT's weight-rewriting initialisations, LoRA+.

    lora_jax.variants.dora       DoRA's magnitude leaf: forward, init, merge (PEFT's DoraLinearLayer)

>>> from lora_jax.variants import dora
>>> dora.__name__
'lora_jax.variants.dora'
"""

from lora_jax.variants import dora  # noqa: F401
