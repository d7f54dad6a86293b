"""Named random streams: every seed the tool uses is derived from the run's seed and a name.

A name says what the stream is for, so two streams never share draws by accident and a new one
changes no existing one.

Example:
    >>> derive_seed(0, "loader") == derive_seed(0, "loader")
    True
    >>> derive_seed(0, "loader") != derive_seed(1, "loader") != derive_seed(0, "ae-val")
    True
    >>> 0 <= derive_seed(7, "stage", 2) < 2**63
    True
"""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, name: str, *parts: int | str) -> int:
    """A 63-bit seed from the run's ``seed``, a stream ``name`` and optional parts (an epoch, a stage)."""
    text = "\0".join(map(str, (seed, name, *parts)))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1
