"""The one error type users can cause. Its message says what is wrong and what to do.

The CLI prints it without a traceback; the server maps it to an OpenAI-shaped 4xx.
"""


class LmforgeError(Exception):
    """A mistake in the user's input, files or configuration (never a bug in lmforge)."""
