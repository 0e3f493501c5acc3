"""OpenCLIP encoders: any open_clip architecture, weights from a local file, preprocessing in torch.

The architecture comes from open_clip's catalogue of model configs (a built-in name such as
'ViT-B-32' or 'ViT-H-14', or a name added with `open_clip.add_model_config`), from a JSON config
file, or from a config dict (`model_cfg`, the same schema: embed_dim, vision_cfg, text_cfg). The
weights come from a local file only (never downloaded): a `.safetensors` file or a torch file read
with `torch.load(weights_only=True)`; a dict holding 'state_dict' (the layout of open_clip training
checkpoints and of HPS_v2.1) is unwrapped, and a 'module.' prefix is stripped. Keys must match the
architecture exactly; otherwise a SafediffError names the file and a few of the wrong keys.

Preprocessing mirrors open_clip's eval transform (resize the short side with bicubic
interpolation, center crop, normalise with the model's mean/std), batched in torch on the model's
device; see `safediff.rewards.encoders.base.resize_crop_normalize` for how it departs from PIL.
"""

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from safediff.errors import SafediffError
from safediff.rewards.encoders.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    check_images,
    l2_normalize,
    resize_crop_normalize,
)

# open_clip precision names -> the dtype of the weights the image tower sees.
_PRECISION_DTYPE = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "pure_fp16": torch.float16,
    "pure_bf16": torch.bfloat16,
}
_DTYPE_PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class OpenClipEncoder:
    """An open_clip CLIP model behind the `ImageTextEncoder` interface.

    model: an open_clip CLIP / CustomTextCLIP in eval mode on `device`.
    tokenizer: callable list[str] -> LongTensor [B, context_length] (open_clip's tokenizers).
    image_size: (H, W) the image tower expects.
    mean, std: per-channel pixel statistics used to normalise.
    resize_mode: 'shortest' (open_clip's default), 'longest' or 'squash'.
    dtype: the dtype of the image tower's weights; preprocessed images are cast to it.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        image_size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        dtype: torch.dtype,
        resize_mode: str = "shortest",
        name: str = "openclip",
    ):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.device = torch.device(device)
        self.dtype = dtype
        self.resize_mode = resize_mode
        self.name = name
        self.embed_dim = int(_embed_dim(model))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> model input [B, 3, S_h, S_w] in `dtype` on `device`."""
        x = images.to(self.device, non_blocking=True)
        x = resize_crop_normalize(x, self.image_size, self.mean, self.std, self.resize_mode)
        return x.to(self.dtype)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] float in [0, 1] -> [B, D] float32, L2-normalised."""
        check_images(images, f"encoder {self.name!r}")
        return l2_normalize(self.model.encode_image(self.preprocess(images)))

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """texts [B] -> [B, D] float32, L2-normalised (truncated to the context length)."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return l2_normalize(self.model.encode_text(tokens))


def _embed_dim(model: nn.Module) -> int:
    proj = getattr(model, "text_projection", None)
    if isinstance(proj, nn.Parameter | torch.Tensor):
        return proj.shape[-1]
    if isinstance(proj, nn.Linear):
        return proj.out_features
    return int(getattr(model, "embed_dim", 0) or model.visual.output_dim)


def resolve_precision(dtype: torch.dtype, precision: str | None) -> tuple[str, torch.dtype]:
    """(open_clip precision, weight dtype) from a dtype and an optional explicit precision.

    precision None: 'fp32' / 'fp16' / 'bf16' from `dtype` (open_clip's 'fp16'/'bf16' keep
    LayerNorms in float32, as OpenAI's CLIP does). Mixed precision ('amp' in open_clip) is not a
    weight format: keep float32 weights and turn on the reward's `autocast` instead.
    """
    if precision is None:
        if dtype not in _DTYPE_PRECISION:
            raise SafediffError(
                f"unsupported encoder dtype {dtype}; use float32, float16, bfloat16"
            )
        precision = _DTYPE_PRECISION[dtype]
    if precision not in _PRECISION_DTYPE:
        hint = " (use float32 weights and the reward's autocast)" if "amp" in precision else ""
        raise SafediffError(
            f"unsupported open_clip precision {precision!r}{hint}; use one of "
            f"{', '.join(_PRECISION_DTYPE)}"
        )
    return precision, _PRECISION_DTYPE[precision]


def read_state_dict(path: str | Path, who: str) -> dict[str, torch.Tensor]:
    """Tensors of a local checkpoint: .safetensors, or torch.load(weights_only=True).

    A dict holding 'state_dict' is unwrapped (open_clip / HPS_v2.1 checkpoints) and a leading
    'module.' (DistributedDataParallel) is stripped. Errors name the path.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise SafediffError(f"{who}: checkpoint not found: {path} (pass the path of a local file)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refusals, truncated files, wrong formats
        raise SafediffError(
            f"{who}: could not read checkpoint {path} as safetensors or a weights-only torch file "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise SafediffError(
            f"{who}: checkpoint {path} holds {type(obj).__name__}, not a non-empty dict of tensors"
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise SafediffError(
            f"{who}: checkpoint {path} is not a state dict (entry {bad[0]!r} is not a named tensor)"
        )
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load_weights_strict(
    model: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path, who: str, arch: str
) -> None:
    """Copy `state` into `model`; any missing, unexpected or misshaped key is a SafediffError."""
    state = dict(state)
    own = model.state_dict()
    # open_clip checkpoints store logit_scale as a scalar or as [1]; accept both.
    for key in ("logit_scale", "logit_bias"):
        if (
            key in state
            and key in own
            and state[key].shape != own[key].shape
            and state[key].numel() == own[key].numel() == 1
        ):
            state[key] = state[key].reshape(own[key].shape)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshaped = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if misshaped:
            k = misshaped[0]
            parts.append(
                f"{len(misshaped)} keys with wrong shapes (e.g. {k}: checkpoint "
                f"{tuple(state[k].shape)} vs model {tuple(own[k].shape)})"
            )
        raise SafediffError(
            f"{who}: checkpoint {path} does not fit architecture {arch}: {'; '.join(parts)}. "
            "Check that the architecture matches the weights."
        )
    model.load_state_dict(state, strict=True)


def _config_from_name(model_name: str) -> tuple[str, dict[str, Any] | None]:
    """A JSON file path -> (its stem, its config); a catalogue name -> (name, None)."""
    if model_name.endswith(".json"):
        path = Path(model_name).expanduser()
        if not path.is_file():
            raise SafediffError(f"open_clip model config not found: {path}")
        cfg = json.loads(path.read_text())
        return path.stem, cfg.get("model_cfg", cfg)
    return model_name, None


def build_openclip_model(
    model_name: str,
    model_cfg: Mapping[str, Any] | None,
    device: torch.device,
    precision: str,
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """A randomly initialised open_clip model, its tokenizer and its preprocess config.

    model_cfg given: build CLIP (or CustomTextCLIP when the text tower is custom) from the dict,
    with the default preprocess config (OpenAI mean/std, bicubic, shortest side) and open_clip's
    SimpleTokenizer (works offline). Otherwise look `model_name` up in open_clip's catalogue.
    """
    import open_clip

    if model_cfg is None:
        known = open_clip.list_models()
        if model_name not in known:
            raise SafediffError(
                f"open_clip has no model config named {model_name!r}; use a catalogue name "
                f"(e.g. ViT-B-32, ViT-H-14), a .json config file, or pass model_cfg"
            )
        model = open_clip.create_model(
            model_name, pretrained=None, precision=precision, device=device
        )
        tokenizer = open_clip.get_tokenizer(model_name)
        preprocess = dict(open_clip.get_model_preprocess_cfg(model))
        return model, tokenizer, preprocess

    cfg = copy.deepcopy(dict(model_cfg))
    cfg = dict(cfg.get("model_cfg", cfg))
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise SafediffError(f"open_clip model_cfg for {model_name!r} lacks {missing}")
    custom_text = bool(cfg.pop("custom_text", False)) or "hf_model_name" in cfg["text_cfg"]
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    model = cls(**cfg, cast_dtype=open_clip.get_cast_dtype(precision))
    if precision in ("fp16", "bf16"):
        model.to(device=device)
        open_clip.convert_weights_to_lp(model, dtype=_PRECISION_DTYPE[precision])
    else:
        model.to(device=device, dtype=_PRECISION_DTYPE[precision])
    size = model.visual.image_size
    preprocess = {
        "size": size,
        "mean": OPENAI_CLIP_MEAN,
        "std": OPENAI_CLIP_STD,
        "interpolation": "bicubic",
        "resize_mode": "shortest",
        "fill_color": 0,
    }
    open_clip.set_model_preprocess_cfg(model, preprocess)
    context_length = int(cfg["text_cfg"].get("context_length", 77))
    tokenizer = open_clip.SimpleTokenizer(context_length=context_length)
    return model, tokenizer, preprocess


def load_openclip_encoder(
    model_name: str,
    checkpoint_path: str | Path | None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    precision: str | None = None,
    model_cfg: Mapping[str, Any] | None = None,
) -> OpenClipEncoder:
    """Build an OpenCLIP encoder from an architecture and a local weights file.

    model_name: an open_clip catalogue name ('ViT-B-32', 'ViT-H-14', or one registered with
        open_clip.add_model_config), or a path to a JSON model config; used as a label when
        `model_cfg` is given.
    checkpoint_path: local weights (.safetensors, .pt, .bin). None keeps random weights (tests
        and benchmarks only: the embeddings mean nothing).
    device, dtype: where the model lives and its weight dtype (float32, float16, bfloat16).
    precision: an explicit open_clip precision ('fp32', 'fp16', 'bf16', 'pure_fp16',
        'pure_bf16'); None derives it from `dtype`.
    model_cfg: an architecture dict (embed_dim, vision_cfg, text_cfg) instead of a name.
    """
    device = torch.device(device)
    precision, weight_dtype = resolve_precision(dtype, precision)
    if model_cfg is None:
        model_name, model_cfg = _config_from_name(model_name)
    who = f"openclip encoder {model_name!r}"
    # Read the checkpoint first: a wrong path fails before a large model is built.
    state = read_state_dict(checkpoint_path, who) if checkpoint_path is not None else None
    model, tokenizer, pp = build_openclip_model(model_name, model_cfg, device, precision)
    if state is not None:
        load_weights_strict(model, state, checkpoint_path, who, model_name)
        del state
    size = pp.get("size", model.visual.image_size)
    size_hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    weights = Path(checkpoint_path).name if checkpoint_path is not None else "random weights"
    return OpenClipEncoder(
        model,
        tokenizer,
        image_size=size_hw,
        mean=pp.get("mean", OPENAI_CLIP_MEAN),
        std=pp.get("std", OPENAI_CLIP_STD),
        device=device,
        dtype=weight_dtype,
        resize_mode=pp.get("resize_mode", "shortest"),
        name=f"openclip:{model_name} ({weights})",
    )
