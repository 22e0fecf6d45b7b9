"""Bearer API keys, compared in constant time. Keys are never logged or echoed."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})


def needs_auth(path: str, keys: Sequence[bytes]) -> bool:
    return bool(keys) and path not in OPEN_PATHS


def authorized(header: str | None, keys: Sequence[bytes]) -> bool:
    """True when `Authorization: Bearer <key>` names one of `keys`.

    Every key is compared (no early exit), so timing reveals neither which key matched nor
    how much of a wrong key was right.
    """
    scheme, _, token = (header or "").partition(" ")
    candidate = token.strip().encode()
    matches = [hmac.compare_digest(candidate, key) for key in keys]
    return scheme.lower() == "bearer" and any(matches)
