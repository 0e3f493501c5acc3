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


def test_module_digest_of_a_channels_last_model_equals_the_contiguous_ones():
    """A channels-last 1 x 1 conv weight is 'contiguous' with stride(-1) != 1; the digest reads
    its values in logical order, so the memory format does not change it (and does not crash)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3))
    want = module_digest(net)
    net.to(memory_format=torch.channels_last)
    assert net[0].weight.stride()[-1] != 1
    assert module_digest(net) == want
