"""Many adapters on one base: merging (PEFT's add_weighted_adapter), named adapters, per-example adapters.

    lora_jax.adapters.merging    add_weighted_adapter: linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune

>>> from lora_jax.adapters import add_weighted_adapter
>>> add_weighted_adapter.__module__
'lora_jax.adapters.merging'
"""

from lora_jax.adapters.merging import COMBINATIONS, add_weighted_adapter  # noqa: F401
