"""Layout of an adapter state: which tensors, in which order, of which shapes and dtypes."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping

import torch


def layout_hash(state: Mapping[str, torch.Tensor]) -> int:
    """64-bit hash over (name, shape, dtype) of every tensor, in order.

    Two parties agree on an adapter's layout iff their hashes agree; the wire format
    carries it so a payload built for another layout is rejected.
    """
    h = hashlib.blake2b(digest_size=8)
    for name, t in state.items():
        h.update(name.encode())
        h.update(b"\0")
        h.update(str(t.dtype).encode())
        h.update(struct.pack(f"<{t.dim() + 1}q", t.dim(), *t.shape))
    return int.from_bytes(h.digest(), "little")


def combine_hashes(*values: int) -> int:
    """A 64-bit hash of several 64-bit hashes, order-sensitive."""
    h = hashlib.blake2b(digest_size=8)
    for v in values:
        h.update(struct.pack("<Q", v & 0xFFFF_FFFF_FFFF_FFFF))
    return int.from_bytes(h.digest(), "little")
