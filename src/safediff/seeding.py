"""Explicit, derived randomness.

Every random draw in safediff comes from a `torch.Generator` seeded by `derive_seed(base, *keys)`,
where the keys name the draw (epoch, global sample index, inner epoch, ...). Derived seeds make runs
independent of process count and make exact resume trivial: no RNG state has to be checkpointed.
"""

import hashlib

import torch

_MASK63 = (1 << 63) - 1


def derive_seed(base: int, *keys: int | str) -> int:
    """A 63-bit seed that depends on `base` and every key, in order (blake2b of their text)."""
    text = "/".join(str(k) for k in (base, *keys))
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator on `device` seeded with `seed`."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g
