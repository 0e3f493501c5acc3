"""The learning rate of each GRPO epoch, as a pure function of the epoch.

The rate is set once per epoch (every optimizer step of an epoch uses it), so it depends only on
(epoch, run.epochs) and a resumed run needs no scheduler state.
"""

from safediff.config import LR_SCHEDULES


def epoch_lr(lr: float, lr_final: float, schedule: str, epoch: int, epochs: int) -> float:
    """The learning rate of `epoch` (0-based) of a run of `epochs`.

    'constant': lr at every epoch (past `epochs` too). 'linear': lr + (lr_final - lr) * epoch /
    epochs, so epoch 0 trains at lr and the last at one step short of lr_final (with lr_final 0,
    8 epochs at 4e-4 give 4e-4, 3.5e-4, ..., 0.5e-4: no epoch is spent at 0).
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if schedule == "constant":  # any epoch, also past run.epochs (a trainer driven by hand)
        return lr
    if epochs < 1 or not 0 <= epoch < epochs:
        raise ValueError(f"need 0 <= epoch < epochs, got epoch {epoch} of {epochs}")
    return lr + (lr_final - lr) * epoch / epochs
