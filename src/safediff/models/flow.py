"""Adapter: SD3 / SD3.5 and FLUX transformer pipelines -> safediff's `T2IModel` convention.

Both families are rectified-flow models whose transformer predicts the velocity; their schedule is
a `safediff.sampling.flow.FlowSchedule` (FlowMatchEulerDiscreteScheduler's sigmas), so `sample()`
hands them to the flow sampler (`flow_rollout`). What each pipeline feeds its transformer, and how
it is packed into the one [B, L, D] conditioning tensor of `T2IModel` (as sdxl.py packs SDXL's
pooled embedding):

- SD3 (StableDiffusion3Pipeline.encode_prompt): token states = cat over the sequence of
  [CLIP-L penultimate | CLIP-G penultimate] (77 rows, zero-padded on the feature axis to the T5
  width) and T5's last hidden state (`max_sequence_length` rows); pooled_projections = [CLIP-L
  text_embeds | CLIP-G text_embeds]. Packed: [B, 77 + L_t5 + 1, D], the last row [pooled | 0].
  Without text_encoder_3 the T5 rows are zeros, as the pipeline does.
- FLUX (FluxPipeline.encode_prompt): token states = T5's last hidden state; pooled_projections =
  CLIP's pooler_output. Packed: [B, L_t5 + 1, D], the last row [pooled | 0].

The transformer itself stays the real diffusers module (LoRA targets, save_pretrained and peft
see its usual names); forward hooks (`attach_flow_conditioning`) let it be called the safediff
way, unet(x [B, C, h, w], t [B] = sigma * 1000, encoder_hidden_states=packed[, guidance=g]).sample
-> velocity [B, C, h, w]:
- SD3: the packed row is split off into pooled_projections and t is passed as timestep.
- FLUX: in addition, x is packed into 2 x 2 patches ([B, h/2 * w/2, 4C], FluxPipeline's
  `_pack_latents`), image and text position ids are built as the pipeline builds them, the
  timestep is divided by 1000 (FluxPipeline's `timestep / 1000`), `guidance` ([B], FLUX-dev's
  distilled guidance) is passed through, and the output is unpacked back to [B, C, h, w].
A call made the diffusers way (keyword hidden_states / pooled_projections) is left untouched, so
`StableDiffusion3Pipeline` / `FluxPipeline` built over the same module run as usual.

Guidance: SD3 uses classifier-free guidance (the sampler's guidance_scale, negative prompt "").
A FLUX transformer with guidance_embeds (FLUX.1-dev) takes the guidance value as an input and has
no unconditional pass: the flow sampler passes guidance_scale there instead (see
`safediff.sampling.flow.resolve_flow_guidance`); guidance given to a transformer without that
input is a one-line error. FluxPipeline's "true CFG" (negative prompt with FLUX) is not supported.

Departures: `max_sequence_length` defaults to min(pipeline default, the T5 tokenizer's
model_max_length) (256 for SD3 and 512 for FLUX on the real models; 16 for the tiny ones);
prompt weighting, clip_skip and the per-encoder prompt_2 / prompt_3 are not supported.
The VAE and text encoders are frozen here (requires_grad False, eval mode).
"""

from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from safediff.errors import SafediffError
from safediff.models.base import T2IModel
from safediff.models.flow_family import FLUX_COMPONENTS, SD3_COMPONENTS, transformer_family
from safediff.models.flow_family import flow_pipeline as flow_pipeline  # importable from here too
from safediff.models.lora_adapter import merge_lora_adapter
from safediff.models.sdxl import read_model_index
from safediff.models.stable_diffusion import decode_latents, freeze, vae_scale_factor
from safediff.sampling.flow import FlowSchedule

SD3_MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's default
FLUX_MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default
FLUX_DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size (latent side)
_STATE = "_safediff_flow_hooks"


# ---------------------------------------------------------------------------------------------
# Families


def pipeline_family(model_index: dict[str, Any]) -> str | None:
    """'sd3' / 'flux' for a diffusers model_index.json of an SD3 / FLUX pipeline, else None."""
    name = str(model_index.get("_class_name", ""))
    if "Flux" in name:
        return "flux"
    if "StableDiffusion3" in name:
        return "sd3"
    return None


def flow_folder_family(path: str | Path) -> str | None:
    """'sd3' / 'flux' when `path` is a folder with an SD3 / FLUX model_index.json, else None."""
    index = Path(path).expanduser() / "model_index.json"
    return pipeline_family(read_model_index(index)) if index.is_file() else None


# ---------------------------------------------------------------------------------------------
# Packing


def pack_pooled(tokens: Tensor, pooled: Tensor) -> Tensor:
    """[B, L, D] token states and a [B, P] pooled embedding -> [B, L + 1, D] (P <= D): the last
    row is [pooled | zeros]."""
    b, _, d = tokens.shape
    p = pooled.shape[-1]
    if p > d:
        raise SafediffError(
            f"cannot pack a pooled embedding of width {p} into token states of width {d}"
        )
    row = tokens.new_zeros(b, 1, d)
    row[:, 0, :p] = pooled.to(tokens.dtype)
    return torch.cat([tokens, row], dim=1)


def unpack_pooled(packed: Tensor, pooled_width: int) -> tuple[Tensor, Tensor]:
    """[B, L + 1, D] -> ([B, L, D] token states, [B, P] pooled embedding)."""
    return packed[:, :-1], packed[:, -1, :pooled_width]


def pack_latents(x: Tensor) -> Tensor:
    """FLUX's 2 x 2 patch packing: [B, C, h, w] -> [B, h/2 * w/2, 4C] (FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: Tensor, h: int, w: int) -> Tensor:
    """Inverse of `pack_latents`: [B, h/2 * w/2, 4C] -> [B, C, h, w]."""
    b, _, ch = x.shape
    x = x.view(b, h // 2, w // 2, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, ch // 4, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """FLUX's image position ids [h/2 * w/2, 3]: (0, row, column) of each packed patch."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Hooks: call the real transformer the safediff way


def _safediff_call(args: tuple, kwargs: dict[str, Any]) -> bool:
    """unet(x, t, encoder_hidden_states=packed) (not the diffusers keyword call)."""
    return len(args) == 2 and "encoder_hidden_states" in kwargs and "hidden_states" not in kwargs


def _sd3_pre_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
    if not _safediff_call(args, kwargs) or kwargs.get("pooled_projections") is not None:
        return None
    if kwargs.get("guidance") is not None:
        raise SafediffError(
            "guidance was given to an SD3 transformer, which has no guidance input; SD3 uses "
            "classifier-free guidance (guidance_scale with a negative prompt)"
        )
    kwargs = {k: v for k, v in kwargs.items() if k != "guidance"}
    x, t = args
    tokens, pooled = unpack_pooled(
        kwargs["encoder_hidden_states"], int(module.config.pooled_projection_dim)
    )
    return (x,), {
        **kwargs,
        "encoder_hidden_states": tokens,
        "pooled_projections": pooled,
        "timestep": t,
    }


def _flux_pre_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
    setattr(module, _STATE, None)
    if not _safediff_call(args, kwargs) or kwargs.get("pooled_projections") is not None:
        return None
    x, t = args
    guidance = kwargs.get("guidance")
    if module.config.guidance_embeds and guidance is None:
        raise SafediffError(
            "this FLUX transformer takes the guidance value as an input (guidance_embeds); "
            "call it with guidance= (the flow sampler passes its guidance scale)"
        )
    if not module.config.guidance_embeds and guidance is not None:
        raise SafediffError(
            "guidance was given to a FLUX transformer without a guidance input (guidance_embeds "
            "False, e.g. FLUX.1-schnell); sample it with guidance scale 1"
        )
    _, _, h, w = x.shape
    if h % 2 or w % 2:
        raise SafediffError(f"FLUX latents must have even sides, got {h} x {w}")
    tokens, pooled = unpack_pooled(
        kwargs["encoder_hidden_states"], int(module.config.pooled_projection_dim)
    )
    setattr(module, _STATE, (h, w))
    return (), {
        **kwargs,
        "hidden_states": pack_latents(x),
        "encoder_hidden_states": tokens,
        "pooled_projections": pooled,
        "timestep": t / 1000,  # FluxPipeline passes timestep / 1000
        "img_ids": image_ids(h, w, x.device, tokens.dtype),
        "txt_ids": torch.zeros(tokens.shape[1], 3, device=x.device, dtype=tokens.dtype),
        "guidance": guidance,
    }


def _flux_post_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any):
    hw = getattr(module, _STATE, None)
    if hw is None:
        return None
    setattr(module, _STATE, None)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=unpack_latents(output.sample, *hw))


def attach_flow_conditioning(transformer: nn.Module) -> nn.Module:
    """Make an SD3 / FLUX transformer callable the safediff way (in place, once); returns it.

    After this, transformer(x [B, C, h, w], t [B], encoder_hidden_states=packed).sample is the
    velocity [B, C, h, w] (see the module docstring); diffusers-style calls are unchanged.
    """
    family = transformer_family(transformer)
    if getattr(transformer, "_safediff_flow_family", None) == family:
        return transformer
    if family == "sd3":
        transformer.register_forward_pre_hook(_sd3_pre_hook, with_kwargs=True)
    else:
        transformer.register_forward_pre_hook(_flux_pre_hook, with_kwargs=True)
        transformer.register_forward_hook(_flux_post_hook, with_kwargs=True)
    transformer._safediff_flow_family = family
    setattr(transformer, _STATE, None)
    return transformer


# ---------------------------------------------------------------------------------------------
# Prompt encoding


def _ids(tokenizer: Any, prompts: list[str], length: int) -> Tensor:
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    ).input_ids


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _check_prompts(prompts: Any) -> list[str]:
    if isinstance(prompts, str):
        raise SafediffError("encode_text takes a list of prompts, got a single string")
    return list(prompts)


def encode_prompts_sd3(
    tokenizers: tuple[Any, Any, Any | None],
    encoders: tuple[nn.Module, nn.Module, nn.Module | None],
    max_sequence_length: int,
    joint_dim: int,
    prompts: list[str],
    device: torch.device | str,
    *,
    grad: bool = False,
) -> Tensor:
    """Prompts -> packed SD3 conditioning [B, 77 + max_sequence_length + 1, joint_dim] (no grad
    unless `grad`: DES trains the encoders through it), as StableDiffusion3Pipeline.encode_prompt
    computes it (clip_skip None), in CLIP-G's dtype."""
    prompts = _check_prompts(prompts)
    states, pooled = [], []
    with nullcontext() if grad else torch.no_grad():
        for tokenizer, encoder in zip(tokenizers[:2], encoders[:2], strict=True):
            ids = _ids(tokenizer, prompts, tokenizer.model_max_length)
            out = encoder(ids.to(_device_of(encoder)), output_hidden_states=True)
            pooled.append(out[0].to(device))  # text_embeds [B, P_i]
            states.append(out.hidden_states[-2].to(device))  # penultimate [B, 77, D_i]
        dtype = next(encoders[1].parameters()).dtype
        clip = torch.cat(states, dim=-1).to(dtype)
        clip = nn.functional.pad(clip, (0, joint_dim - clip.shape[-1]))
        if encoders[2] is None or tokenizers[2] is None:
            t5 = clip.new_zeros(len(prompts), max_sequence_length, joint_dim)
        else:
            ids = _ids(tokenizers[2], prompts, max_sequence_length)
            t5 = encoders[2](ids.to(_device_of(encoders[2])))[0].to(device=device, dtype=dtype)
    tokens = torch.cat([clip, t5], dim=-2)
    return pack_pooled(tokens, torch.cat(pooled, dim=-1).to(dtype))


def encode_prompts_flux(
    tokenizers: tuple[Any, Any],
    encoders: tuple[nn.Module, nn.Module],
    max_sequence_length: int,
    prompts: list[str],
    device: torch.device | str,
    *,
    grad: bool = False,
) -> Tensor:
    """Prompts -> packed FLUX conditioning [B, max_sequence_length + 1, D] (no grad unless
    `grad`), as FluxPipeline.encode_prompt computes it: T5 token states, CLIP's pooler_output."""
    prompts = _check_prompts(prompts)
    clip_tok, t5_tok = tokenizers
    clip, t5 = encoders
    with nullcontext() if grad else torch.no_grad():
        ids = _ids(clip_tok, prompts, clip_tok.model_max_length)
        pooled = clip(ids.to(_device_of(clip)), output_hidden_states=False).pooler_output
        ids = _ids(t5_tok, prompts, max_sequence_length)
        tokens = t5(ids.to(_device_of(t5)), output_hidden_states=False)[0]
    dtype = next(t5.parameters()).dtype
    return pack_pooled(tokens.to(device=device, dtype=dtype), pooled.to(device=device))


# ---------------------------------------------------------------------------------------------
# Components -> T2IModel


def _max_length(tokenizer: Any, default: int, given: int | None) -> int:
    if given is not None:
        return int(given)
    limit = getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None
    return min(default, int(limit)) if isinstance(limit, int) and limit > 0 else default


def flow_components_to_t2i(
    components: dict[str, Any],
    source: str,
    resolution: int | None = None,
    max_sequence_length: int | None = None,
) -> T2IModel:
    """Wrap SD3 or FLUX components (diffusers names) into a `T2IModel` (flow schedule).

    components: transformer, vae, text_encoder(s), tokenizer(s), scheduler (see SD3_COMPONENTS /
        FLUX_COMPONENTS); the family is read from the transformer's class.
    resolution: image side in pixels; None -> SD3: transformer sample_size x VAE factor (1024);
        FLUX: FluxPipeline's default, 128 x VAE factor. Must be a multiple of 2 x VAE factor.
    max_sequence_length: T5 tokens; None -> min(pipeline default, tokenizer's model_max_length).
    The VAE and text encoders are frozen in place; the transformer gets the hooks
    (`attach_flow_conditioning`); its trainability is left to the caller.
    """
    transformer = components.get("transformer")
    if transformer is None:
        raise SafediffError(
            f"model {source!r} has no transformer; an SD3 / FLUX pipeline needs "
            f"{', '.join(SD3_COMPONENTS)}"
        )
    family = transformer_family(transformer)
    needed = SD3_COMPONENTS if family == "sd3" else FLUX_COMPONENTS
    missing = [name for name in needed if components.get(name) is None]
    if missing:
        raise SafediffError(
            f"{family.upper()} model {source!r} lacks the component(s) {', '.join(missing)}; "
            f"it needs {', '.join(needed)}"
        )
    vae = components["vae"]
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        if components.get(name) is not None:
            freeze(components[name])
    factor = vae_scale_factor(vae)
    if resolution is None:
        side = transformer.config.sample_size if family == "sd3" else FLUX_DEFAULT_SAMPLE_SIZE
        resolution = int(side) * factor
    if resolution <= 0 or resolution % (2 * factor):
        raise SafediffError(
            f"resolution {resolution} does not fit model {source!r}: it must be a positive "
            f"multiple of {2 * factor} (VAE factor {factor} x patch size 2)"
        )
    side = resolution // factor
    channels = int(vae.config.latent_channels)
    cfg = transformer.config
    if family == "sd3":
        length = _max_length(
            components.get("tokenizer_3"), SD3_MAX_SEQUENCE_LENGTH, max_sequence_length
        )
        encode = partial(
            encode_prompts_sd3,
            (components["tokenizer"], components["tokenizer_2"], components.get("tokenizer_3")),
            (
                components["text_encoder"],
                components["text_encoder_2"],
                components.get("text_encoder_3"),
            ),
            length,
            int(cfg.joint_attention_dim),
        )
        spacing, in_channels = "scheduler", int(cfg.in_channels)
    else:
        length = _max_length(
            components["tokenizer_2"], FLUX_MAX_SEQUENCE_LENGTH, max_sequence_length
        )
        encode = partial(
            encode_prompts_flux,
            (components["tokenizer"], components["tokenizer_2"]),
            (components["text_encoder"], components["text_encoder_2"]),
            length,
        )
        spacing, in_channels = "flux", int(cfg.in_channels) // 4
    if in_channels != channels:
        raise SafediffError(
            f"{family.upper()} model {source!r}: the transformer takes {in_channels} latent "
            f"channels, the VAE makes {channels}; the components come from different models"
        )
    schedule = FlowSchedule.from_scheduler_config(
        dict(components["scheduler"].config),
        sigma_spacing=spacing,
        image_seq_len=(side // 2) * (side // 2),
    )
    return T2IModel(
        unet=attach_flow_conditioning(transformer),
        encode_text=encode,
        decode=partial(decode_latents, vae),
        schedule=schedule,
        latent_shape=(channels, side, side),
        components={
            **{k: v for k, v in components.items() if k != "transformer"},
            "max_sequence_length": length,
        },
        source=source,
    )


def load_flow_components(where: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The components of an SD3 / FLUX pipeline folder (diffusers names), on the CPU: the
    transformer in float32, the VAE and text encoders in `dtype`."""
    hub_family = None if Path(where).expanduser().is_dir() else FLOW_HUB_IDS.get(str(where))
    if hub_family is not None:  # a known hub id: diffusers downloads it or reads its cache
        family = hub_family
    else:
        where = Path(where).expanduser().resolve()
        family = flow_folder_family(where)
        if family is None:
            raise SafediffError(f"{where} is not an SD3 / FLUX diffusers pipeline folder")
    from diffusers import (
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    cls, tcls = (
        (StableDiffusion3Pipeline, SD3Transformer2DModel)
        if family == "sd3"
        else (FluxPipeline, FluxTransformer2DModel)
    )
    try:
        transformer = tcls.from_pretrained(
            where, subfolder="transformer", torch_dtype=torch.float32
        )
        pipe = cls.from_pretrained(where, transformer=transformer, torch_dtype=dtype)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise SafediffError(
            f"could not load {family.upper()} pipeline folder {where}: {first}"
        ) from None
    return dict(pipe.components)


# ---------------------------------------------------------------------------------------------
# Bare transformer checkpoints


def file_transformer_family(path: str | Path) -> str | None:
    """'flux', 'sd3' or 'unet' (an SD / SDXL UNet) from a .safetensors file's tensor names; None
    when it cannot tell."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
    except (SafetensorError, OSError):
        return None
    if any(k.startswith(("single_transformer_blocks.", "x_embedder.")) for k in keys):
        return "flux"
    if any(k.startswith("pos_embed.") for k in keys):
        return "sd3"
    if any(k.startswith(("down_blocks.", "conv_in.")) for k in keys):
        return "unet"
    return None


_FAMILY_NAMES = {"flux": "a FLUX transformer", "sd3": "an SD3 transformer", "unet": "a UNet"}
_BASES = {
    "flux": "a FLUX base (tiny-flux, or a FLUX pipeline folder)",
    "sd3": "an SD3 base (tiny-sd3, or an SD3 pipeline folder)",
    "unet": "an SD / SDXL base (tiny-sd, tiny-sdxl)",
}


def load_transformer_weights(transformer: nn.Module, path: str | Path) -> Path:
    """Replace every weight of an SD3 / FLUX transformer (in place) with a bare .safetensors
    file's, keys and shapes checked strictly. A checkpoint of another family (a FLUX transformer
    on an SD3 base, an SD UNet, ...) is refused from the file's tensor names first."""
    from safetensors.torch import load_file

    p = Path(path).expanduser().resolve()
    if not p.is_file() or p.suffix != ".safetensors":
        raise SafediffError(f"transformer weights {p} must be an existing .safetensors file")
    base, found = transformer_family(transformer), file_transformer_family(p)
    if found is not None and found != base:
        raise SafediffError(
            f"transformer weights {p} are {_FAMILY_NAMES[found]} but the base model's is "
            f"{_FAMILY_NAMES[base]}; pass {_BASES[found]} as model.pretrained"
        )
    state = load_file(str(p))
    own = transformer.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or bad:
        raise SafediffError(
            f"transformer weights {p} do not match the base transformer: {len(missing)} missing, "
            f"{len(unexpected)} unexpected and {len(bad)} mis-shaped tensor(s) (e.g. "
            f"{(missing + unexpected + bad)[0]}); is it a transformer of the same base model?"
        )
    transformer.load_state_dict(state, strict=True)
    return p


# ---------------------------------------------------------------------------------------------
# Loading (model ids and folders)

TINY_FLOW_MODELS = ("tiny-sd3", "tiny-flux")
FLOW_HUB_IDS = {
    "stabilityai/stable-diffusion-3-medium-diffusers": "sd3",
    "stabilityai/stable-diffusion-3.5-medium": "sd3",
    "stabilityai/stable-diffusion-3.5-large": "sd3",
    "black-forest-labs/FLUX.1-dev": "flux",
    "black-forest-labs/FLUX.1-schnell": "flux",
}
"""Hub ids loaded as flow models (SD3 / FLUX pipelines) without a local folder: diffusers
downloads them (gated repositories: log in first) or reads the Hugging Face cache."""


def is_flow_spec(pretrained: str) -> bool:
    """Whether `pretrained` names a flow model: "tiny-sd3", "tiny-flux", an SD3 / FLUX
    pipeline folder or a hub id of `FLOW_HUB_IDS`."""
    if pretrained in TINY_FLOW_MODELS:
        return True
    if pretrained in FLOW_HUB_IDS and not Path(pretrained).expanduser().is_dir():
        return True
    try:
        return flow_folder_family(pretrained) is not None
    except (OSError, ValueError):
        return False


def load_flow_t2i(
    pretrained: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    resolution: int | None = None,
    transformer_weights: str | Path | None = None,
    lora_dir: str | Path | None = None,
) -> T2IModel:
    """The `T2IModel` of "tiny-sd3", "tiny-flux" or an SD3 / FLUX pipeline folder, on `device`.

    transformer_weights: a bare transformer .safetensors swapped in (`load_transformer_weights`;
    another family's checkpoint is a one-line error). lora_dir: a peft LoRA adapter folder (a
    GRPO checkpoint's lora/) merged into the transformer after the weights are swapped in
    (`safediff.models.lora_adapter.merge_lora_adapter`). The transformer stays float32; VAE and text
    encoders in `dtype`.
    """
    if pretrained == "tiny-sd3":
        from safediff.models.tiny_sd3 import build_tiny_sd3

        components = build_tiny_sd3(seed=0)
    elif pretrained == "tiny-flux":
        from safediff.models.tiny_flux import TINY_FLUX_RESOLUTION, build_tiny_flux

        components = build_tiny_flux(seed=0)
        resolution = resolution or TINY_FLUX_RESOLUTION
    else:
        components = load_flow_components(pretrained, dtype)
    if pretrained in TINY_FLOW_MODELS and dtype != torch.float32:
        for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            if components.get(name) is not None:
                components[name].to(dtype=dtype)
    source = pretrained
    if transformer_weights is not None:
        p = load_transformer_weights(components["transformer"], transformer_weights)
        source = f"{source} + {p}"
    if lora_dir is not None:
        components["transformer"] = merge_lora_adapter(components["transformer"], lora_dir)
        source = f"{source} + LoRA {lora_dir}"
    model = flow_components_to_t2i(components, source=source, resolution=resolution)
    return model.to(device)
