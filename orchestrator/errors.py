"""The one exception type whose message is shown to the user as a single line (no traceback)."""


class UserError(Exception):
    """Bad input or an unusable environment: the message says what, where and how to fix it."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (the error of a storage or filesystem call), or its
    type's name when the message is empty."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def last_line(exc: BaseException) -> str:
    """"<type>: <last line of the message>" (a failed task's or trial's exception, whose last line
    is the raised error), or the type's name when the message is empty."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[-1]}" if lines else type(exc).__name__
