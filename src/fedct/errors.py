"""The one error type of fedct's stages.

Every stage raises :class:`FedctError` (or a subclass) for bad input: a missing or
malformed file, an unknown params key, a cohort without training cases. The message
names the file or key and the reason; the CLI prints it as one line and exits non-zero.
Anything else escaping a stage is a bug and keeps its traceback.
"""

from __future__ import annotations


class FedctError(Exception):
    """Bad input to a stage; ``str(exc)`` names the file or params key and why."""
