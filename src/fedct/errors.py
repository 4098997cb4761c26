"""The one error type of fedct's stages.

Every stage raises :class:`FedctError` (or a subclass) for bad input: a missing or
malformed file, an unknown params key, a cohort without training cases. The message
names the file or key and the reason; the CLI prints it as one line and exits non-zero.
Anything else escaping a stage is a bug and keeps its traceback.
"""

from __future__ import annotations


class FedctError(Exception):
    """Bad input to a stage; ``str(exc)`` names the file or params key and why."""


class Rejected(FedctError):
    """Bad input that costs one item (a series), not the run.

    ``str(exc)`` names the file or folder for the person at the console; ``reason`` says
    why without a path or an identifier, fit for a rejects table and metrics.
    """

    def __init__(self, where: object, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.reason = reason


def printable(text: str) -> str:
    """``text`` with the undecodable bytes of a file name (surrogate escapes, as
    ``os.fsdecode`` gives them) written as ``\\xNN``: any console can print it."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
