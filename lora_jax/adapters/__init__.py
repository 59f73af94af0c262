"""Many adapters on one base: merging (PEFT's add_weighted_adapter), named adapters, per-example adapters.

    lora_jax.adapters.merging      add_weighted_adapter: linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune
    lora_jax.adapters.named        Adapters: named adapters on one base (add / set_active / disable / delete, PEFT dirs)
    lora_jax.adapters.per_example  per-row adapters in one batch, inference and training; hot swap

>>> from lora_jax.adapters import add_weighted_adapter
>>> add_weighted_adapter.__module__
'lora_jax.adapters.merging'
"""

from lora_jax.adapters.merging import COMBINATIONS, add_weighted_adapter  # noqa: F401
from lora_jax.adapters.named import Adapters  # noqa: F401, E402
from lora_jax.adapters import per_example  # noqa: F401, E402
