"""The error users can fix: `UserError`, a `ValueError` whose message is one line naming the cause
and the fix. The `lora-jax` CLI prints it (without a traceback) and exits 2; any other exception is
an internal error and keeps its traceback.

>>> raise UserError("lora.r must be >= 1, got 0")
Traceback (most recent call last):
...
lora_jax.errors.UserError: lora.r must be >= 1, got 0
"""


class UserError(ValueError):
    """Bad input or an unsupported setting: one line naming the cause and the fix."""
