"""Defenses from the literature, composable with each other and with any `T2IModel`.

- DES (des.py): a distorted text encoder, trained once, swapped in with no inference cost;
- the Safe Denoiser (safe_denoiser.py): a training-free correction away from a negation set;
- SLD (sld.py): Safe Latent Diffusion guidance, diffusers' presets;
- negative prompts (negative_prompt.py);
- `DefenseStack` / `apply_defenses` (stack.py): any combination, from a spec string.

Sampler-level defenses are guidance hooks of `safediff.sampling.rollout` (see its docstring).
"""

from safediff.defenses.stack import DefenseSpec, DefenseStack, apply_defenses
from safediff.defenses.text_encoder_adapter import (
    CLIPTextEncoderAdapter,
    TextEncoderAdapter,
    adapter_for_model,
    swap_text_encoder,
)

__all__ = [
    "CLIPTextEncoderAdapter",
    "DefenseSpec",
    "DefenseStack",
    "TextEncoderAdapter",
    "adapter_for_model",
    "apply_defenses",
    "swap_text_encoder",
]
