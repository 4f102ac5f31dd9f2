"""The one exception type for evaluation problems a user can cause and fix.

Missing Inception weights, a classifier path that does not exist, an unknown extractor name: each raises
EvaluationError with a single message naming the file or key involved, so the CLI can print it and exit
non-zero without a traceback.
"""


class EvaluationError(Exception):
    """A user-caused evaluation problem; the message alone must tell the user what to fix."""
