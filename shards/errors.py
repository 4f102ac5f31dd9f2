"""The one exception type for data problems a user can cause and fix.

A missing dataset, a bad mixture, a corrupt shard: each raises DataError with a single message that names
the file, key or population involved, so the CLI can print it and exit non-zero without a traceback.
"""


class DataError(Exception):
    """A user-caused data problem; the message alone must tell the user what to fix."""
