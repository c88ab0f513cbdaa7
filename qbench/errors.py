"""Errors a user can cause. The CLI prints their message as one line and exits with status 2."""


class UsageError(Exception):
    """Bad input: a missing path, an unknown method, a corrupt baseline, no GPU where one is needed.

    The message is one line that names the problem and the fix.
    """
