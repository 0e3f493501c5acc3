"""HPSv2.1: the human-preference CLIP that scores SafeDiffusion-R1's steering reward.

HPSv2.1 is an OpenCLIP ViT-H-14 fine-tuned on human preferences; its released checkpoint
(`HPS_v2.1_compressed.pt`) is a dict whose 'state_dict' holds open_clip CLIP keys
('visual.conv1.weight', 'visual.transformer.resblocks.0.attn.in_proj_weight', 'token_embedding.weight',
'text_projection', 'logit_scale', ...). It is read here with torch.load(weights_only=True) from a
path the user gives (never downloaded) and loaded strictly into a freshly built ViT-H-14.

How this departs from the reference code (SafeDiffusion-R1's `inference_reward.py`): it first
loads the LAION ViT-H-14 weights and then overwrites every tensor with the HPS checkpoint
(strict), so only the HPS file matters and it is all we read. Its preprocessing is open_clip's
eval transform (short side to 224, bicubic, center crop, OpenAI mean/std) on a PIL image; ours is
the same pipeline in torch (see `resize_crop_normalize`). HPSv2's own `hpsv2.score` pads the long
side instead (`light_augmentation`); for square images both are identical. Its reward is the
cosine of the normalised embeddings (no logit scale), as here. It runs with
`precision='amp'` (float32 weights under float16 autocast): use dtype float32 and the reward's
`autocast='float16'` to match.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from safediff.rewards.encoders.openclip import OpenClipEncoder, load_openclip_encoder

HPSV2_ARCH = "ViT-H-14"
"""The open_clip architecture of HPSv2 / HPSv2.1."""


def load_hpsv2_encoder(
    checkpoint_path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    precision: str | None = None,
    model_name: str = HPSV2_ARCH,
    model_cfg: Mapping[str, Any] | None = None,
) -> OpenClipEncoder:
    """HPSv2.1 as an `ImageTextEncoder`: open_clip ViT-H-14 + the HPS checkpoint at a user path.

    checkpoint_path: HPS_v2.1_compressed.pt (or HPS_v2_compressed.pt; a .safetensors export of
        the same state dict also works). A missing file, a non-weights-only pickle or keys that do
        not fit the architecture raise SafediffError naming the path.
    model_name / model_cfg: the architecture; only tests change it (a tiny config with the same
        key layout), since the HPS weights are a ViT-H-14.
    """
    if checkpoint_path is None:
        from safediff.errors import SafediffError

        raise SafediffError("hpsv2 encoder needs a checkpoint path (HPS_v2.1_compressed.pt)")
    enc = load_openclip_encoder(
        model_name,
        checkpoint_path,
        device=device,
        dtype=dtype,
        precision=precision,
        model_cfg=model_cfg,
    )
    enc.name = f"hpsv2:{model_name} ({Path(checkpoint_path).name})"
    return enc
