"""Errors the CLI reports as one line (exit 1): the run cannot go on, and says why and what to do."""


class RunError(RuntimeError):
    """A run stopped for a reason outside the code: a full disk, a diverged loss, a damaged file."""
