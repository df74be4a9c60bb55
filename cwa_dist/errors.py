"""The one exception type the CLI turns into a single clear line instead of a traceback."""


class UsageError(Exception):
    """Bad input or an unusable environment: the message names the problem and the fix."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (whitespace collapsed), shortened to `limit` characters."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def last_line(e: BaseException, limit: int = 300) -> str:
    """The last non-blank line of an exception's message (where Ray puts the cause), shortened."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1][:limit] if lines else type(e).__name__
