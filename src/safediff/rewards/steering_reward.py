"""The steering reward: image-text alignment against a prompt embedding moved toward "safe".

For a prompt p and its image x (SafeDiffusion-R1's reward, see `safediff.rewards.steering`):

  v_safe = normalize(mean E(safe anchors) - mean E(unsafe anchors))
  s      = E(p) . v_safe,   w = gate(s)
  z*     = steer(E(p), v_safe, alpha, mode, w)
  reward = cos(E(x), z*)

An unsafe prompt is rewarded for a safe rendering of its content, so GRPO learns to draw the safe
version without a safety classifier. The diffusion model always sees the original prompt; only
the reward's target moves.

Speed: images are scored as one batch on the encoder's device (resize, crop and normalise in
torch). Each distinct prompt is encoded and steered once and kept in `self.cache`, a
`PromptCache` owned by this instance; call `clear_cache()` at each epoch start (or when anchors,
alpha or the encoder change: the constructor fixes them, so in practice a new instance).

Reference quirks, as switches: `gating='all'` steers every prompt, safe ones too (the reference
code); `jpeg_parity=True` scores images after the tensor -> PIL -> JPEG -> tensor round-trip.
"""

from collections.abc import Sequence
from typing import Any

import torch

from safediff.errors import SafediffError
from safediff.rewards.anchors import AnchorSet
from safediff.rewards.base import check_reward_output
from safediff.rewards.encoders.base import (
    ImageTextEncoder,
    PromptCache,
    autocast_context,
    encode_images_chunked,
)
from safediff.rewards.jpeg import REFERENCE_QUALITY, prepare_reward_images
from safediff.rewards.steering import (
    GATING_MODES,
    STEER_MODES,
    gate_weights,
    safety_direction,
    safety_score,
    steer,
)


def resolve_autocast(
    dtype: torch.dtype | str | None, device: torch.device | str
) -> torch.dtype | None:
    """The autocast dtype of a reward on `device`: "auto" is float16 on CUDA and None (off)
    elsewhere; a dtype or None is kept."""
    if isinstance(dtype, str):
        if dtype != "auto":
            raise SafediffError(
                f"autocast_dtype must be a torch dtype, None or 'auto'; got {dtype!r}"
            )
        return torch.float16 if torch.device(device).type == "cuda" else None
    return dtype


class SteeringReward:
    """reward = cos(E(image), z*(prompt)), z* the prompt embedding steered toward v_safe.

    encoder: a frozen `ImageTextEncoder` (OpenCLIP, HPSv2.1, transformers CLIP, ...).
    anchors: the safe/unsafe phrases that define v_safe.
    alpha: steering strength (the paper: 0.5; 0.3-0.7 reported as not knife-edge).
    mode: 'translation' (z + alpha v) or 'projection' (replace z's v-component by alpha).
    gating: 'all', 'threshold' (s < threshold) or 'soft' (sigmoid((threshold - s)/temperature)).
    threshold, temperature: gating parameters, in units of the safety score s (a cosine).
    jpeg_parity, jpeg_quality, jpeg_resize: reproduce the reference's JPEG round-trip before
        scoring (its code: PIL resize to 512, then PIL's default quality 75; see rewards/jpeg.py).
    autocast_dtype: run the encoders under torch.autocast with this dtype (None: off); "auto"
        (the default): float16 when the encoder is on CUDA (the reference scores HPSv2 under
        float16 autocast), off on the CPU.
    chunk_size: encode at most this many images per call (None: the whole batch at once).
    cache_size: the most prompts kept in the cache.
    """

    name = "steering"

    def __init__(
        self,
        encoder: ImageTextEncoder,
        anchors: AnchorSet,
        alpha: float = 0.5,
        mode: str = "translation",
        gating: str = "all",
        threshold: float = 0.0,
        temperature: float = 0.05,
        jpeg_parity: bool = False,
        jpeg_quality: int = REFERENCE_QUALITY,
        jpeg_resize: int | None = None,
        autocast_dtype: torch.dtype | str | None = "auto",
        chunk_size: int | None = None,
        cache_size: int | None = 100_000,
    ):
        if mode not in STEER_MODES:
            raise SafediffError(f"steering mode {mode!r} is not one of {', '.join(STEER_MODES)}")
        if gating not in GATING_MODES:
            raise SafediffError(f"gating {gating!r} is not one of {', '.join(GATING_MODES)}")
        if gating == "soft" and not temperature > 0:
            raise SafediffError(f"soft gating needs temperature > 0, got {temperature}")
        if not isinstance(alpha, int | float) or isinstance(alpha, bool):
            raise SafediffError(f"alpha must be a number, got {alpha!r}")
        self.encoder = encoder
        self.anchors = anchors
        self.alpha = float(alpha)
        self.mode = mode
        self.gating = gating
        self.threshold = float(threshold)
        self.temperature = float(temperature)
        self.jpeg_parity = bool(jpeg_parity)
        self.jpeg_quality = int(jpeg_quality)
        self.jpeg_resize = jpeg_resize
        self.autocast_dtype = resolve_autocast(autocast_dtype, encoder.device)
        self.chunk_size = chunk_size
        self.cache = PromptCache(cache_size)
        with autocast_context(encoder.device, self.autocast_dtype):
            safe = encoder.encode_text(list(anchors.safe)) if anchors.safe else None
            unsafe = encoder.encode_text(list(anchors.unsafe)) if anchors.unsafe else None
        self.v_safe = safety_direction(safe, unsafe).to(encoder.device)  # [D] float32

    def clear_cache(self) -> None:
        """Forget every cached prompt target (call at the start of each epoch)."""
        self.cache.clear()

    def _compute_targets(self, prompts: list[str]) -> tuple[torch.Tensor, ...]:
        """prompts [N] -> (z* [N, D], s [N], w [N]), all float32 on the encoder's device."""
        with autocast_context(self.encoder.device, self.autocast_dtype):
            z = self.encoder.encode_text(prompts).float()
        s = safety_score(z, self.v_safe)
        w = gate_weights(s, self.gating, self.threshold, self.temperature)
        return steer(z, self.v_safe, self.alpha, self.mode, w), s, w

    def prompt_targets(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """For prompts [B]: target z* [B, D], text safety s [B] and gate weight w [B] (cached)."""
        z_star, s, w = self.cache.get_many(prompts, self._compute_targets)
        return {"target": z_star, "text_safety": s, "weight": w}

    def score(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Rewards and diagnostics, each [B] float32 on the images' device.

        reward: cos(E(image), z*); text_safety: s; weight: w (1 = fully steered);
        image_safety: E(image) . v_safe (which side of the safety direction the image is on).
        """
        out_device = images.device
        images = prepare_reward_images(
            images,
            prompts,
            self.name,
            jpeg_parity=self.jpeg_parity,
            jpeg_quality=self.jpeg_quality,
            jpeg_resize=self.jpeg_resize,
        )
        targets = self.prompt_targets(prompts)
        with autocast_context(self.encoder.device, self.autocast_dtype):
            img = encode_images_chunked(self.encoder, images, self.chunk_size).float()  # [B, D]
        reward = (img * targets["target"]).sum(dim=-1)
        result = {
            "reward": reward,
            "text_safety": targets["text_safety"],
            "weight": targets["weight"],
            "image_safety": img @ self.v_safe,
        }
        return {k: v.to(out_device, torch.float32) for k, v in result.items()}

    def __call__(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]] | None = None,
    ) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1], prompts [B] -> rewards [B] float32 in [-1, 1]."""
        rewards = self.score(images, prompts, metadata)["reward"]
        return check_reward_output(rewards, images.shape[0], self.name)
