import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP spin-waits
# make them 10-100x slower; one thread keeps the suite fast and its timings stable.
torch.set_num_threads(1)


TINY_GRPO_OVERRIDES = (
    "model.pretrained=tiny-sd",
    "sampling.num_steps=3",
    "sampling.guidance_scale=2.0",
    "sampling.rollout_batch_size=8",
    "grpo.group_size=4",
    "grpo.samples_per_process=8",
    "grpo.clip_range=0.2",
    "grpo.micro_batch=8",
    "optim.lr=1e-3",
    "prompts.file=builtin:smoke",
    "run.log_with=none",
    "run.epochs=1",
)
"""Overrides for a GRPO run on tiny-sd that takes seconds on a CPU (add run.output_dir)."""


@pytest.fixture(scope="session")
def tiny_grpo_overrides():
    return list(TINY_GRPO_OVERRIDES)


@pytest.fixture
def tiny_overrides(tmp_path):
    """TINY_GRPO_OVERRIDES writing under tmp_path."""
    return [*TINY_GRPO_OVERRIDES, f"run.output_dir={tmp_path / 'run'}"]


@pytest.fixture(scope="session")
def te():
    """The sandbox's frozen MiniLM text encoder (shipped by pip, loaded offline), shared by the
    sandbox tests; tests must not train it (DES tests load their own copy)."""
    from safediff.sandbox.text_encoder import load_text_encoder

    return load_text_encoder("cpu")
