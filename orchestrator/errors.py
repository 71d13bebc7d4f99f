"""The one exception type whose message is shown to the user as a single line (no traceback)."""


class UserError(Exception):
    """Bad input or an unusable environment: the message says what, where and how to fix it."""
