"""User-facing errors: one line naming the file/field and what to do. The CLI prints them
without a traceback (unless --debug) and exits non-zero."""


class PolycatsError(Exception):
    pass


class CannotResume(PolycatsError):
    """A run directory holds a run that cannot continue exactly (no usable checkpoint); starting
    it over (``--restart``) or another directory is the way on."""


class Interrupted(PolycatsError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint; the CLI exits with 128 + the
    signal's number, as shells expect."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number


def printable(text: str) -> str:
    """``text`` safe to echo in a one-line error: newlines, control and invisible characters
    become escapes (``\\n``, ``\\x00``, ``\\u200b``)."""
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in str(text))
