"""The errors users see: one message naming the file, tensor or option, and what was expected."""


class DggufError(Exception):
    """A user-facing error: the CLI prints `error: <message>` and exits 2."""
