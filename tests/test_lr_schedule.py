"""The per-epoch learning rate schedule, by hand (the trainer's use of it: tests/test_trainer.py)."""

import pytest

from safediff.rl.lr_schedule import epoch_lr


def test_constant_and_linear_schedules_by_hand():
    assert [epoch_lr(3e-4, 0.0, "constant", e, 4) for e in range(6)] == [3e-4] * 6
    linear = [epoch_lr(4e-4, 0.0, "linear", e, 8) for e in range(8)]
    assert linear == pytest.approx([4e-4, 3.5e-4, 3e-4, 2.5e-4, 2e-4, 1.5e-4, 1e-4, 0.5e-4])
    # towards a higher final rate too (a warm-up): 1e-4 -> 3e-4 over 4 epochs
    assert [epoch_lr(1e-4, 3e-4, "linear", e, 4) for e in range(4)] == pytest.approx(
        [1e-4, 1.5e-4, 2e-4, 2.5e-4]
    )
    with pytest.raises(ValueError, match="schedule must be"):
        epoch_lr(1e-4, 0.0, "cosine", 0, 4)
    with pytest.raises(ValueError, match="0 <= epoch < epochs"):
        epoch_lr(1e-4, 0.0, "linear", 4, 4)
