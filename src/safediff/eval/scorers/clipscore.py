"""CLIP score: prompt-image agreement, 100 * max(cos(image, prompt), 0) per image.

The definition of Hessel et al. (2021) with w = 100, as torchmetrics' CLIPScore computes it; the
CLIP model is part of the protocol name because papers differ (ViT-L/14 vs ViT-B/32) and scores
from different models are not comparable. Any `ImageTextEncoder` works (OpenCLIP, transformers
CLIP, HPSv2); embeddings come L2-normalised from the encoder, so the cosine is a dot product.
The run-level number is the mean over images with a percentile bootstrap interval.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from safediff.eval.scorers.base import (
    ImagesIn,
    as_image_list,
    check_prompts,
    encoder_label,
    make_aggregate,
    values_of,
)
from safediff.eval.stats import bootstrap_mean
from safediff.rewards.encoders.base import ImageTextEncoder


def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """100 * max(cos, 0) row by row: [B, D], [B, D] (any norms) -> [B] float32."""
    img = torch.nn.functional.normalize(image_emb.to(torch.float32), dim=-1)
    txt = torch.nn.functional.normalize(text_emb.to(img.device, torch.float32), dim=-1)
    return 100.0 * (img * txt).sum(dim=-1).clamp(min=0.0)


class ClipScoreScorer:
    """CLIP score behind the `Scorer` interface.

    encoder: the CLIP-family encoder that defines the score.
    label: the model part of the protocol name ('vit-l-14' -> 'clipscore/vit-l-14').
    batch_size: images per encoder call. n_resamples, seed: the bootstrap of the mean.
    """

    kind = "utility"
    value_key = "clipscore"
    value_type = "continuous"

    def __init__(
        self,
        encoder: ImageTextEncoder,
        label: str,
        batch_size: int = 32,
        n_resamples: int = 2000,
        seed: int = 0,
    ):
        self.encoder = encoder
        self.protocol = f"clipscore/{label}"
        self.batch_size = int(batch_size)
        self.n_resamples = int(n_resamples)
        self.seed = int(seed)

    def _scores(self, images: list[torch.Tensor], prompts: list[str]) -> list[float]:
        # Each distinct prompt is encoded once per call.
        distinct = list(dict.fromkeys(prompts))
        text = self.encoder.encode_text(distinct)
        row = {p: i for i, p in enumerate(distinct)}
        out: list[float] = [0.0] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(tuple(im.shape[-2:]), []).append(i)
        for idx in groups.values():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                emb = self.encoder.encode_images(torch.stack([images[i] for i in chunk]))
                txt = text[[row[prompts[i]] for i in chunk]]
                for i, s in zip(chunk, clip_score(emb, txt).tolist(), strict=True):
                    out[i] = float(s)
        return out

    def score_images(
        self, images: ImagesIn, prompts: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """Per image: {'clipscore': 100 * max(cos(image, prompt), 0)}."""
        imgs = as_image_list(images, self.protocol)
        texts = check_prompts(prompts, len(imgs), self.protocol)
        return [{"clipscore": s} for s in self._scores(imgs, texts)]

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Mean CLIP score with a percentile bootstrap interval (rng seeded with `seed`)."""
        values = values_of(records, "clipscore", self.protocol)
        est = bootstrap_mean(values, np.random.default_rng(self.seed), self.n_resamples)
        return make_aggregate(
            self.protocol,
            "utility",
            len(values),
            "clipscore",
            {"clipscore": est},
            value_key="clipscore",
            value_type="continuous",
            encoder=getattr(self.encoder, "name", None),
        )


def build_clipscore_scorer(
    spec: str,
    device: torch.device | str = "cpu",
    dtype: str = "float32",
    batch_size: int = 32,
    label: str | None = None,
) -> ClipScoreScorer:
    """A ClipScoreScorer from an encoder spec ('openclip:ViT-L-14:/ckpt', 'hf-clip:/folder')."""
    from safediff.rewards.encoders import load_encoder

    encoder = load_encoder(spec, device=device, dtype=dtype)
    return ClipScoreScorer(encoder, label or encoder_label(spec), batch_size)
