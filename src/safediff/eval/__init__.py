"""Evaluation: prompt sets, image generation for a prompt set, detectors, metrics and reports.

Protocols follow DESIGN.md section 7: prompt sets are files the user provides (I2P, MMA-Diffusion,
COCO captions, CoPro-style, plain text), generation honours each row's seed, guidance and size,
and every output records what made it.
"""
