"""Exceptions that the command line reports as one line with exit code 2 (no traceback)."""

__all__ = ["UserError"]


class UserError(ValueError):
    """Bad input from the user: a wrong path, an impossible target, an invalid file."""
