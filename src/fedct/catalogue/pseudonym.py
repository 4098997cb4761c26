"""Pseudonymisation: the site's HMAC key and keyed hashes of identifiers."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedct.config import CatalogueParams
from fedct.errors import FedctError

log = logging.getLogger(__name__)

KEY_ENV = "FEDCT_PSEUDONYM_KEY"
# Public demo key: pseudonyms made with it can be reversed by anyone holding the
# original identifiers. Synthetic data only; outputs record its use.
DEMO_KEY = b"fedct-public-demo-key: synthetic data only"
DEMO_KEY_ID = "demo"
MIN_KEY_BYTES = 16


class PseudonymKeyError(FedctError):
    """No usable HMAC key: the message says where one is expected."""


@dataclass(frozen=True)
class PseudonymKey:
    """The site's HMAC secret and where it came from (never logged)."""

    secret: bytes = field(repr=False)
    demo: bool
    source: str  # "env", "file" or "demo"

    @property
    def key_id(self) -> str:
        """Public fingerprint: two catalogues with the same key_id share pseudonyms."""
        if self.demo:
            return DEMO_KEY_ID
        return hmac.new(self.secret, b"fedct:key-id", hashlib.sha256).hexdigest()[:12]


def load_key(params: CatalogueParams) -> PseudonymKey:
    """The HMAC key: ``FEDCT_PSEUDONYM_KEY``, else ``params.key_file``, else the demo key.

    The secret stays with the site that holds the archive; without it the pseudonyms
    cannot be linked back to patients. Raises PseudonymKeyError when no key is
    configured and ``demo_key`` is false, or a configured key is unusable.
    """
    env = os.environ.get(KEY_ENV)
    if env:
        secret, source = env.encode("utf-8"), "env"
        where = f"environment variable {KEY_ENV}"
    elif params.key_file:
        path = Path(params.key_file).expanduser()
        try:
            secret = path.read_bytes().strip()
        except OSError as exc:
            raise PseudonymKeyError(
                f"catalogue.key_file {path}: cannot read the pseudonymisation key ({exc})"
            ) from exc
        source, where = "file", f"catalogue.key_file {path}"
    elif params.demo_key:
        log.warning("pseudonymising with the public demo key (demo_key: true): "
                    "synthetic data only")
        return PseudonymKey(DEMO_KEY, demo=True, source="demo")
    else:
        raise PseudonymKeyError(
            "no pseudonymisation key: set the environment variable "
            f"{KEY_ENV} or catalogue.key_file to a secret the site keeps "
            "(catalogue.demo_key: true allows the public demo key, synthetic data only)"
        )
    if len(secret) < MIN_KEY_BYTES:
        raise PseudonymKeyError(
            f"{where}: the pseudonymisation key has {len(secret)} bytes; "
            f"use at least {MIN_KEY_BYTES} random bytes"
        )
    return PseudonymKey(secret, demo=False, source=source)


class Hasher:
    """HMAC-SHA256 pseudonyms, truncated to 128 bits (32 hex), one domain per kind.

    The domain prefix ("patient:", "study:", ...) keeps equal strings of different
    kinds from sharing a pseudonym. The keyed HMAC state is set up once and copied for
    each value (``hmac.HMAC.copy``), so a pseudonym costs two SHA-256 updates.
    """

    def __init__(self, secret: bytes) -> None:
        self._keyed = hmac.new(secret, digestmod=hashlib.sha256)

    def __call__(self, kind: str, value: str) -> str:
        h = self._keyed.copy()
        h.update(f"{kind}:{value}".encode("utf-8", "surrogateescape"))
        return h.hexdigest()[:32]

    def column(self, kind: str, values: Sequence[str | None], distinct: bool = False
               ) -> list[str | None]:
        """The pseudonym of every value of a chunk (None for None or ""), each distinct
        value hashed once (the files of a series share its study and series UIDs).
        ``distinct``: the values nearly all differ (SOP instance UIDs): no lookup table."""
        if distinct:
            return [self(kind, v) if v else None for v in values]
        table = {v: self(kind, v) if v else None for v in dict.fromkeys(values)}
        return list(map(table.__getitem__, values))


def pseudonym(secret: bytes, kind: str, value: str) -> str:
    """HMAC-SHA256 of ``kind:value`` under ``secret``, first 32 hex digits."""
    return Hasher(secret)(kind, value)
