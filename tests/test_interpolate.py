"""Weight interpolation (WiSE-FT) against the formula by hand, on tensors and on a real UNet."""

import pytest
import torch

from safediff.errors import SafediffError
from safediff.models.interpolate import interpolate_weights


def test_interpolation_is_the_straight_line_between_the_models():
    base = {"w": torch.tensor([0.0, 1.0, -2.0]), "steps": torch.tensor(3)}
    trained = {"w": torch.tensor([1.0, 3.0, 2.0]), "steps": torch.tensor(3)}
    assert torch.equal(interpolate_weights(base, trained, 0.0)["w"], base["w"])
    assert torch.equal(interpolate_weights(base, trained, 1.0)["w"], trained["w"])
    assert torch.equal(
        interpolate_weights(base, trained, 0.25)["w"], torch.tensor([0.25, 1.5, -1.0])
    )
    assert torch.equal(interpolate_weights(base, trained, 1.5)["w"], torch.tensor([1.5, 4.0, 4.0]))
    assert interpolate_weights(base, trained, 0.5)["steps"] == 3  # integer buffers copied
    assert base["w"].tolist() == [0.0, 1.0, -2.0]  # inputs untouched


def test_bf16_weights_keep_small_differences():
    base = {"w": torch.full((4,), 1.0, dtype=torch.bfloat16)}
    trained = {"w": torch.full((4,), 1.0078125, dtype=torch.bfloat16)}  # one bf16 step above 1
    out = interpolate_weights(base, trained, 1.0)["w"]
    assert out.dtype == torch.bfloat16 and torch.equal(out, trained["w"])


@pytest.mark.parametrize(
    ("base", "trained", "weight", "match"),
    [
        ({"a": torch.zeros(2)}, {"b": torch.zeros(2)}, 0.5, "weights differ"),
        ({"a": torch.zeros(2)}, {"a": torch.zeros(3)}, 0.5, "shape"),
        ({"a": torch.tensor(1)}, {"a": torch.tensor(2)}, 0.5, "integer buffers differ"),
        ({"a": torch.zeros(2)}, {"a": torch.zeros(2)}, -0.1, ">= 0"),
        ({"a": torch.zeros(2)}, {"a": torch.zeros(2)}, float("nan"), "finite"),
    ],
)
def test_mismatched_models_and_bad_weights_are_refused(base, trained, weight, match):
    with pytest.raises(SafediffError, match=match):
        interpolate_weights(base, trained, weight)
