"""The one exception type that reaches the user as a message instead of a traceback."""


class KDError(Exception):
    """Bad input or state the user can fix: the message names what is wrong, where, and what was expected."""
