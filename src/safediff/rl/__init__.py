"""GRPO for diffusion: the math as small pure functions (`grpo`) and the trainer loop."""
