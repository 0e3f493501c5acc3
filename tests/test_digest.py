"""module_digest: equal for equal weights, different for any changed value, shape or class."""

import torch
from torch import nn

from safediff.models.digest import module_digest


def test_module_digest_tracks_values_shapes_and_class():
    torch.manual_seed(0)
    a = nn.Linear(3, 2)
    b = nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert module_digest(a) == module_digest(b) and len(module_digest(a)) == 32
    with torch.no_grad():
        b.weight[0, 0] += 1e-6
    assert module_digest(a) != module_digest(b)
    assert module_digest(nn.Linear(3, 2, bias=False)) != module_digest(a)
    conv = nn.Conv1d(3, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(a.weight[:, :, None])
        conv.bias.copy_(a.bias)
    assert module_digest(conv) != module_digest(a)  # same numbers, other class and shapes
