"""transformers CLIP encoders: any local folder holding a CLIPModel and its tokenizer.

The folder is what `CLIPModel.save_pretrained` + `CLIPTokenizer.save_pretrained` (+ optionally
`CLIPImageProcessor.save_pretrained`) write, e.g. a downloaded openai/clip-vit-large-patch14
snapshot. It is read with `local_files_only=True`: nothing is downloaded. The image preprocessing
follows the folder's preprocessor_config.json (shortest-edge resize, center crop, mean/std),
falling back to CLIP's defaults at the vision tower's image size, and runs batched in torch (see
`resize_crop_normalize` for how that departs from the PIL pipeline).
"""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from safediff.errors import SafediffError
from safediff.rewards.encoders.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    center_crop,
    check_images,
    l2_normalize,
    normalize_pixels,
    resize,
    resize_shortest,
)


def _features(out: Any) -> torch.Tensor:
    """get_*_features returns a tensor (transformers v4) or an output whose pooler_output is the
    projected embedding (v5)."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        raise SafediffError(f"unexpected CLIP feature output {type(out).__name__}")
    return pooled


class HFClipEncoder:
    """A transformers CLIPModel behind the `ImageTextEncoder` interface.

    resize: ('shortest', S) to resize the short side to S, or ('squash', (H, W)).
    crop: (H, W) center crop after resizing, or None.
    max_length: text truncation length (the text tower's max_position_embeddings).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        resize: tuple[str, Any],
        crop: tuple[int, int] | None,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        dtype: torch.dtype,
        max_length: int,
        name: str = "hf-clip",
    ):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.resize = resize
        self.crop = crop
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_length = int(max_length)
        self.name = name
        self.embed_dim = int(model.config.projection_dim)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> pixel_values [B, 3, h, w] in `dtype` on `device`.

        CLIPImageProcessor's steps (resize, center crop, normalise), batched in torch.
        """
        x = images.to(self.device, non_blocking=True).to(torch.float32)
        mode, size = self.resize
        x = resize_shortest(x, size) if mode == "shortest" else resize(x, *size)
        if self.crop is not None:
            x = center_crop(x, *self.crop)
        return normalize_pixels(x, self.mean, self.std).to(self.dtype)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] float in [0, 1] -> [B, D] float32, L2-normalised."""
        check_images(images, f"encoder {self.name!r}")
        out = self.model.get_image_features(pixel_values=self.preprocess(images))
        return l2_normalize(_features(out))

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """texts [B] -> [B, D] float32, L2-normalised (truncated to max_length tokens).

        Padding to the longest prompt of the batch is exact: CLIP's text tower is causal and pools
        the end-of-text token, so padding after it changes nothing.
        """
        tok = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        out = self.model.get_text_features(
            input_ids=tok["input_ids"].to(self.device),
            attention_mask=tok["attention_mask"].to(self.device),
        )
        return l2_normalize(_features(out))


def _read_preprocess(folder: Path, image_size: int) -> dict[str, Any]:
    """Resize / crop / mean / std from preprocessor_config.json, or CLIP's defaults."""
    cfg: dict[str, Any] = {}
    path = folder / "preprocessor_config.json"
    if path.is_file():
        cfg = json.loads(path.read_text())
    size = cfg.get("size", {"shortest_edge": image_size})
    if isinstance(size, int):
        size = {"shortest_edge": size}
    if not cfg.get("do_resize", True):
        size = {"shortest_edge": image_size}
    if "shortest_edge" in size:
        resize: tuple[str, Any] = ("shortest", int(size["shortest_edge"]))
    else:
        resize = ("squash", (int(size["height"]), int(size["width"])))
    crop_cfg = cfg.get("crop_size", {"height": image_size, "width": image_size})
    if isinstance(crop_cfg, int):
        crop_cfg = {"height": crop_cfg, "width": crop_cfg}
    crop = (
        (int(crop_cfg["height"]), int(crop_cfg["width"]))
        if cfg.get("do_center_crop", True)
        else None
    )
    return {
        "resize": resize,
        "crop": crop,
        "mean": cfg.get("image_mean", OPENAI_CLIP_MEAN),
        "std": cfg.get("image_std", OPENAI_CLIP_STD),
    }


def load_hf_clip_encoder(
    folder: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> HFClipEncoder:
    """Load CLIPModel + CLIPTokenizer(Fast) from a local folder as an `ImageTextEncoder`.

    folder: holds config.json, the weights (model.safetensors) and the tokenizer files
        (tokenizer.json, or vocab.json + merges.txt); preprocessor_config.json is optional.
    device, dtype: where the model lives and its weight dtype.
    Errors (SafediffError) name the folder and what was missing or unreadable.
    """
    from transformers import CLIPModel

    folder = Path(folder).expanduser()
    who = f"hf-clip encoder {str(folder)!r}"
    if not folder.is_dir():
        raise SafediffError(f"{who}: folder not found: {folder} (pass a local CLIPModel folder)")
    if not (folder / "config.json").is_file():
        raise SafediffError(f"{who}: no config.json in {folder}; is it a CLIPModel folder?")
    try:
        model = CLIPModel.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except Exception as err:
        raise SafediffError(
            f"{who}: could not load a CLIPModel from {folder} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    model.to(device)
    tokenizer = _load_tokenizer(folder, who)
    text_cfg = model.config.text_config
    pp = _read_preprocess(folder, int(model.config.vision_config.image_size))
    max_length = min(
        int(text_cfg.max_position_embeddings),
        int(getattr(tokenizer, "model_max_length", 10**9) or 10**9),
    )
    return HFClipEncoder(
        model,
        tokenizer,
        resize=pp["resize"],
        crop=pp["crop"],
        mean=pp["mean"],
        std=pp["std"],
        device=torch.device(device),
        dtype=dtype,
        max_length=max_length,
        name=f"hf-clip:{folder.name}",
    )


def _load_tokenizer(folder: Path, who: str) -> Any:
    import transformers

    has_files = (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    )
    if not has_files:
        raise SafediffError(
            f"{who}: no CLIP tokenizer in {folder} (need tokenizer.json or vocab.json + merges.txt)"
        )
    errors = []
    for cls_name in ("CLIPTokenizerFast", "CLIPTokenizer"):
        cls = getattr(transformers, cls_name, None)
        if cls is None:
            continue
        try:
            return cls.from_pretrained(folder, local_files_only=True)
        except Exception as err:
            errors.append(f"{cls_name}: {type(err).__name__}: {err}")
    raise SafediffError(f"{who}: could not load the tokenizer in {folder} ({'; '.join(errors)})")
