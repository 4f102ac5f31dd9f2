"""The errors a user can cause and fix, and nothing else.

Each carries one message that names the key, file, population or model at fault, so the CLI prints it on
one line and exits with code 2, without a traceback. They live in the bottom package (shards imports none
of the others) so that every package can raise them; the CLI catches the base class.
"""


class UserError(Exception):
    """A problem the user can fix; the message alone must say what to do."""


class ConfigError(UserError):
    """A config key, a command-line argument or a file a key names."""


class DataError(UserError):
    """A source, a population, a shard or a manifest."""


class UndecodableItem(DataError):
    """One item of a source whose stored bytes are not an image (a corrupt file, a bad lmdb value): prepare
    skips and counts it, and stops only past data.max_bad_samples of them."""


class CheckpointError(UserError):
    """A checkpoint or a saved model that is missing or cannot be used."""


class ModelError(UserError):
    """Models that cannot be trained, fused or distilled as asked (mismatched shapes, non-finite outputs or
    gradients, a stage that needs another stage's model first)."""
