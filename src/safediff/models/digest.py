"""A content digest of a torch module: tells two weight sets apart without saving them."""

import hashlib

import torch
from torch import nn


def module_digest(module: nn.Module) -> str:
    """blake2b of a module's class, state-dict keys, shapes, dtypes and values (hex, 32 chars)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(module).__name__.encode())
    for key, value in sorted(module.state_dict().items()):
        t = value.detach().cpu().contiguous()
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype}".encode())
        # reshape(-1): a channels-last 1 x 1 conv weight counts as contiguous, so .contiguous()
        # keeps its strides (stride(-1) != 1), which a byte view refuses
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
