"""User-facing errors.

Every mistake a user can make (bad flag, missing file, wrong shape) raises a
`HearthError` subclass whose message is one line naming the field or file.
The CLI prints it as `error: ...` and exits 1; it never shows a traceback.
"""


class HearthError(Exception):
    """Base class: a user mistake with a one-line, actionable message."""


class ConfigError(HearthError):
    """A model configuration that cannot work (unknown preset, heads that don't divide...)."""


class CheckpointError(HearthError):
    """A checkpoint folder or file that is missing, corrupt or mismatched."""


class TokenizerError(HearthError):
    """A tokenizer file or chat that cannot be encoded."""
