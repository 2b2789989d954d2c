"""Errors a user can act on: the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """Bad input or state the user must change (a path, a config key, a name)."""


class NotFound(UserError):
    """A named thing (knowledge store, adapter version, record) does not exist."""
