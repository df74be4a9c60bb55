"""The one exception type the CLI turns into a single clear line instead of a traceback."""


class UsageError(Exception):
    """Bad input or an unusable environment: the message names the problem and the fix."""
