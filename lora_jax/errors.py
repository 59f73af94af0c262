"""The errors users can fix: `UserError`, a `ValueError` whose message is one line naming the cause
and the fix, and two kinds of it that name a file. The `lora-jax` CLI prints them (without a
traceback) and exits 2; any other exception is an internal error and keeps its traceback.

    UserError          bad input or an unsupported setting
    MissingFileError   a file or directory that should be there is not (also a FileNotFoundError)
    CorruptFileError   a file is there but cannot be read: truncated, corrupt, malformed

>>> raise UserError("lora.r must be >= 1, got 0")
Traceback (most recent call last):
...
lora_jax.errors.UserError: lora.r must be >= 1, got 0
>>> isinstance(MissingFileError("x"), FileNotFoundError)
True
"""


class UserError(ValueError):
    """Bad input or an unsupported setting: one line naming the cause and the fix."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory that should exist does not (one line: which, and how to fix it)."""


class CorruptFileError(UserError):
    """A file exists but cannot be read (truncated, corrupt or malformed): one line naming it."""
