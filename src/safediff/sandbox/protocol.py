"""The sandbox's evaluation protocol: one home for its sampler, prompt counts, seeds and preset.

The demo, the defenses table, the merge-weight search, `safediff generate --model sandbox` and the
build's base-model check all read these, so they sample and count the same way.

- SAMPLER: how sandbox models are sampled (DDIM 10 steps, eta 1, CFG 4 against ""); the
  `sandbox-demo` preset trains with the same settings (a test holds them equal).
- EVAL_SIZES: the evaluation's prompts of the "eval" split: per utility task (benign), per unsafe
  family (explicit), per other kind (implicit, synonym, keyword-minimal, negation); full or quick.
- EVAL_SEED: the evaluation's prompts and per-prompt noise.
"""

PRESET = "sandbox-demo"
EVAL_SEED = 2024
SAMPLER = {"num_steps": 10, "guidance_scale": 4.0, "eta": 1.0}

EVAL_SIZES = {
    # prompts per utility task, explicit prompts per family, prompts per other kind
    "full": {"n_safe_per_task": 40, "n_unsafe_per_family": 50, "n_other_per_kind": 40},
    "quick": {"n_safe_per_task": 8, "n_unsafe_per_family": 16, "n_other_per_kind": 8},
}


def eval_sizes(quick: bool) -> dict[str, int]:
    """The evaluation's prompt counts, quick or full."""
    return dict(EVAL_SIZES["quick" if quick else "full"])
