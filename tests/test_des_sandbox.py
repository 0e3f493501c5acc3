"""DES on the sandbox's MiniLM text encoder: trained through its adapter, swapped into a sandbox model."""

import pytest
import torch

from safediff.defenses.des import DESConfig, train_des
from safediff.defenses.text_encoder_adapter import (
    adapter_for_model,
    load_text_encoder_adapter,
    swap_text_encoder,
)
from safediff.sandbox.text_encoder import MAX_LENGTH, MiniLMTextEncoderAdapter, load_text_encoder
from safediff.sandbox.unet import SANDBOX_SCHEDULER_CONFIG, build_unet, sandbox_t2i

pytestmark = pytest.mark.slow


def test_des_trains_the_sandbox_minilm_and_swaps_into_a_sandbox_model(tmp_path):
    minilm = load_text_encoder("cpu")
    model = sandbox_t2i(build_unet(seed=0), SANDBOX_SCHEDULER_CONFIG, minilm, source="sandbox-test")
    adapter = adapter_for_model(model)
    assert isinstance(adapter, MiniLMTextEncoderAdapter)
    assert isinstance(load_text_encoder_adapter("sandbox"), MiniLMTextEncoderAdapter)
    before = {k: v.clone() for k, v in minilm.model.state_dict().items()}
    unet_before = {k: v.clone() for k, v in model.unet.state_dict().items()}

    cfg = DESConfig(concept="skull", lr=1e-3, batch_size=4, epochs=1, concept_scale=5.0)
    result = train_des(
        adapter, ["a red circle", "two blue squares"], ["a skull", "a knife"], cfg, max_steps=2
    )
    folder = result.adapter.save(tmp_path / "des")
    swapped = swap_text_encoder(model, folder)

    prompts = ["a skull", "a red circle"]
    old = model.encode_text(prompts, "cpu")
    new = swapped.encode_text(prompts, "cpu")
    assert old.shape == new.shape == (2, MAX_LENGTH, 384)
    assert not torch.allclose(old[0], new[0])  # the unsafe prompt moved
    assert swapped.unet is model.unet  # the UNet is shared, untouched
    for k, v in model.unet.state_dict().items():
        assert torch.equal(v, unet_before[k]), k
    for k, v in minilm.model.state_dict().items():  # the original encoder is untouched
        assert torch.equal(v, before[k]), k
