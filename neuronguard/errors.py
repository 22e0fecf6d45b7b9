"""Errors shared by every package: a user mistake is a `UsageError`, reported in one line."""


class UsageError(ValueError):
    """Bad input from the user: the message says what is wrong and how to fix it."""
