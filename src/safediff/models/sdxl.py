"""Adapter: Stable Diffusion XL components -> safediff's `T2IModel` convention.

SDXL conditions its UNet on more than token states. StableDiffusionXLPipeline feeds it:
- encoder_hidden_states [B, 77, D1 + D2]: the *penultimate* hidden states of two CLIP text
  encoders (CLIP ViT-L, D1 = 768, and OpenCLIP ViT-bigG, D2 = 1280), concatenated on the last axis;
- added_cond_kwargs["text_embeds"] [B, P]: the pooled, projected embedding of the second encoder
  (`CLIPTextModelWithProjection.text_embeds`, P = 1280);
- added_cond_kwargs["time_ids"] [B, 6]: the size/crop micro-conditioning (original_size,
  crops_coords_top_left, target_size) = (H, W, 0, 0, H, W) for a generation at H x W.

Everything downstream of a `T2IModel` (rollout, CFG batching against a [1, L, D] negative, the
trainer's log-prob recomputation, SLD, the Safe Denoiser) treats prompt conditioning as one opaque
[B, L, D] tensor. To keep that one convention, SDXL's extra conditioning is *packed* into one more
token row at this boundary:

    encode_text(prompts) -> [B, 77 + 1, D1 + D2]
        rows 0..76: the concatenated token states, exactly as the pipeline computes them;
        row 77:     [text_embeds (P) | time_ids (6) | zeros]   (needs D1 + D2 >= P + 6)

and the SDXL UNet unpacks it: `attach_packed_conditioning(unet)` registers a forward pre-hook that,
when a call carries no `added_cond_kwargs`, splits the last row off `encoder_hidden_states` and
passes it on as `added_cond_kwargs={"text_embeds", "time_ids"}`. CFG, batching and indexing act
on rows, so the pooled embedding and time ids of each prompt travel with its token states; a
negative prompt packs its own pooled row.

Why a hook on the real UNet rather than a wrapper module: `model.unet` stays a plain diffusers
`UNet2DConditionModel`, so everything that touches the module itself works unchanged and writes
what plain diffusers and peft read: the trainer's LoRA targets its attention projections by their
usual names (`to_q`, ...), checkpoints are `UNet2DConditionModel.save_pretrained` folders, a LoRA
adapter's keys are those of the plain SDXL UNet (`PeftModel.from_pretrained(sdxl_unet, ...)`
loads it), and deep copies, `merge_and_unload`, DDP and gradient checkpointing keep the hook
(peft calls the base model through `__call__`). A call that passes `added_cond_kwargs` itself (the
diffusers way) is left untouched.

The empty negative prompt: StableDiffusionXLPipeline with `negative_prompt=None` and its config's
`force_zeros_for_empty_prompt` (True for SDXL base 1.0) uses zero token states and a zero pooled
embedding instead of encoding "". safediff spells "no negative prompt" as "", so with that flag
`encode_text` returns zeros (token rows and pooled embedding; the time ids are kept, as the
pipeline does) for every prompt that is exactly "". Departure: a *positive* prompt "" is zeroed too
(the pipeline would encode it), which only matters for unconditional sampling.

The VAE and both text encoders are frozen here (requires_grad False, eval mode).
"""

import json
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from safediff.errors import SafediffError
from safediff.models.base import T2IModel
from safediff.models.stable_diffusion import (
    checked_resolution,
    decode_latents,
    freeze,
    vae_scale_factor,
)
from safediff.sampling.schedule import DDIMSchedule

SDXL_COMPONENTS = (
    "unet",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "scheduler",
)
NUM_TIME_IDS = 6  # (original H, W, crop top, left, target H, W)
PACKED_ROWS = 1  # extra token rows `encode_text` appends (the pooled embedding and time ids)
_HOOK_FLAG = "_safediff_packed_conditioning"


def is_sdxl_unet_config(config: Any) -> bool:
    """Whether a UNet config (dict or diffusers FrozenDict) is SDXL's (addition_embed_type
    'text_time': pooled text embedding + time ids)."""
    return dict(config).get("addition_embed_type") == "text_time"


def is_sdxl_pipeline_folder(model_index: dict[str, Any]) -> bool:
    """Whether a diffusers model_index.json describes an SDXL pipeline (text_encoder_2)."""
    return "XL" in str(model_index.get("_class_name", "")) or "text_encoder_2" in model_index


def read_model_index(path: Any) -> dict[str, Any]:
    """A model_index.json file as a dict ({} when it does not parse)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def pooled_dim(unet_config: Any) -> int:
    """P, the width of the pooled text embedding the SDXL UNet expects:
    projection_class_embeddings_input_dim - 6 * addition_time_embed_dim."""
    cfg = dict(unet_config)
    return int(cfg["projection_class_embeddings_input_dim"]) - NUM_TIME_IDS * int(
        cfg["addition_time_embed_dim"]
    )


def pack_conditioning(tokens: Tensor, pooled: Tensor, time_ids: Tensor) -> Tensor:
    """[B, L, D] token states, [B, P] pooled embedding, [B, 6] time ids -> [B, L + 1, D].

    The last row holds [pooled | time_ids | zeros]; D >= P + 6 is required.
    """
    b, _, d = tokens.shape
    p = pooled.shape[-1]
    if d < p + time_ids.shape[-1]:
        raise SafediffError(
            f"cannot pack a pooled embedding of width {p} and {time_ids.shape[-1]} time ids into "
            f"token states of width {d}"
        )
    row = tokens.new_zeros(b, 1, d)
    row[:, 0, :p] = pooled.to(tokens.dtype)
    row[:, 0, p : p + time_ids.shape[-1]] = time_ids.to(tokens.dtype)
    return torch.cat([tokens, row], dim=1)


def unpack_conditioning(packed: Tensor, pooled_width: int) -> tuple[Tensor, Tensor, Tensor]:
    """[B, L + 1, D] -> ([B, L, D] token states, [B, P] pooled embedding, [B, 6] time ids)."""
    row = packed[:, -1]
    end = pooled_width + NUM_TIME_IDS
    return packed[:, :-1], row[:, :pooled_width], row[:, pooled_width:end]


def _unpack_hook(
    module: nn.Module, args: tuple, kwargs: dict[str, Any]
) -> tuple[tuple, dict[str, Any]] | None:
    """Forward pre-hook of an SDXL UNet: packed encoder_hidden_states -> added_cond_kwargs."""
    if kwargs.get("added_cond_kwargs") is not None:
        return None  # called the diffusers way
    if "encoder_hidden_states" in kwargs:
        packed = kwargs["encoder_hidden_states"]
    elif len(args) >= 3:
        packed, args = args[2], args[:2] + args[3:]
    else:
        return None  # let diffusers report the missing argument
    tokens, pooled, time_ids = unpack_conditioning(packed, pooled_dim(module.config))
    kwargs = {
        **kwargs,
        "encoder_hidden_states": tokens,
        "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids},
    }
    return args, kwargs


def attach_packed_conditioning(unet: nn.Module) -> nn.Module:
    """Make an SDXL UNet2DConditionModel accept safediff's packed conditioning (in place, once).

    After this, unet(x, t, encoder_hidden_states=packed [B, L + 1, D]) equals
    unet(x, t, encoder_hidden_states=packed[:, :-1], added_cond_kwargs={text_embeds, time_ids})
    with the last row unpacked (see the module docstring). Returns `unet`.
    """
    if not is_sdxl_unet_config(unet.config):
        raise SafediffError(
            "attach_packed_conditioning needs an SDXL UNet (addition_embed_type 'text_time'), "
            f"got addition_embed_type {unet.config.get('addition_embed_type')!r}"
        )
    if not getattr(unet, _HOOK_FLAG, False):
        unet.register_forward_pre_hook(_unpack_hook, with_kwargs=True)
        setattr(unet, _HOOK_FLAG, True)
    return unet


def encode_prompts_xl(
    tokenizers: tuple[Any, Any],
    text_encoders: tuple[nn.Module, nn.Module],
    time_ids: tuple[int, ...],
    zeros_for_empty: bool,
    prompts: list[str],
    device: torch.device | str,
) -> Tensor:
    """Prompts -> packed SDXL conditioning [B, 77 + 1, D1 + D2] on `device` (no grad).

    Each tokenizer pads/truncates to its model_max_length; each encoder's penultimate hidden
    state is taken and the two are concatenated, and the pooled embedding is the second
    encoder's `text_embeds`, as StableDiffusionXLPipeline.encode_prompt does (clip_skip None).
    time_ids: the 6 micro-conditioning numbers. zeros_for_empty: prompts that are exactly "" get
    zero token states and pooled embedding (the pipeline's force_zeros_for_empty_prompt).
    The result is in the second text encoder's dtype, as in the pipeline.
    """
    if isinstance(prompts, str):
        raise SafediffError("encode_text takes a list of prompts, got a single string")
    prompts = list(prompts)
    states, pooled = [], None
    with torch.no_grad():
        for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
            enc_device = next(encoder.parameters()).device
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            out = encoder(ids.to(enc_device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # CLIPTextModelWithProjection.text_embeds
                pooled = out[0]
            states.append(out.hidden_states[-2].to(enc_device))
    if pooled is None:
        raise SafediffError(
            "SDXL's second text encoder must return a pooled projection (CLIPTextModelWithProjection)"
        )
    dtype = next(text_encoders[1].parameters()).dtype
    tokens = torch.cat([s.to(device=device, dtype=dtype) for s in states], dim=-1)  # [B, 77, D]
    pooled = pooled.to(device=device, dtype=dtype)  # [B, P]
    if zeros_for_empty:
        empty = torch.tensor([p == "" for p in prompts], device=device)
        tokens = torch.where(empty[:, None, None], torch.zeros_like(tokens), tokens)
        pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
    ids_row = torch.tensor(time_ids, dtype=dtype, device=device).expand(len(prompts), -1)
    return pack_conditioning(tokens, pooled, ids_row)


def decode_latents_xl(vae: nn.Module, latents: Tensor) -> Tensor:
    """SDXL latents [B, C, h, w] -> images [B, 3, H, W] float32 in [0, 1] (no grad).

    As `stable_diffusion.decode_latents`, plus the VAE config's latents_mean / latents_std when it
    has them (z * std / scaling_factor + mean, as StableDiffusionXLPipeline does).
    """
    mean = getattr(vae.config, "latents_mean", None)
    std = getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return decode_latents(vae, latents)
    c = latents.shape[1]
    mean_t = torch.tensor(mean, dtype=torch.float32, device=latents.device).view(1, c, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=latents.device).view(1, c, 1, 1)
    scaling = float(vae.config.scaling_factor)
    # decode_latents divides by scaling_factor again, so hand it (z * std + mean * s)
    return decode_latents(vae, latents.float() * std_t + mean_t * scaling)


def sdxl_components_to_t2i(
    components: dict[str, Any], source: str, resolution: int | None = None
) -> T2IModel:
    """Wrap SDXL components (diffusers names) into a `T2IModel` with packed conditioning.

    components: unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler, and
        optionally "force_zeros_for_empty_prompt" (bool, default True as the pipeline's).
    resolution: image side in pixels; None -> unet.config.sample_size * VAE factor (1024 for
        SDXL). It also sets the time ids (R, R, 0, 0, R, R).
    The VAE and text encoders are frozen in place; the UNet gets the unpacking hook
    (`attach_packed_conditioning`) and its trainability is left to the caller.
    """
    missing = [name for name in SDXL_COMPONENTS if components.get(name) is None]
    if missing:
        raise SafediffError(
            f"model {source!r} lacks the component(s) {', '.join(missing)}; an SDXL pipeline "
            f"needs {', '.join(SDXL_COMPONENTS)} (the refiner, which has one text encoder, is "
            "not supported)"
        )
    unet, vae = components["unet"], components["vae"]
    encoders = (components["text_encoder"], components["text_encoder_2"])
    tokenizers = (components["tokenizer"], components["tokenizer_2"])
    for module in (vae, *encoders):
        freeze(module)

    width = sum(int(e.config.hidden_size) for e in encoders)
    cross = int(unet.config.cross_attention_dim)
    p = pooled_dim(unet.config)
    proj = int(getattr(encoders[1].config, "projection_dim", -1))
    if width != cross or proj != p:
        raise SafediffError(
            f"SDXL model {source!r}: the text encoders give token states of width {width} and a "
            f"pooled embedding of width {proj}, the UNet expects {cross} and {p}; the components "
            "come from different models"
        )
    if cross < p + NUM_TIME_IDS:
        raise SafediffError(
            f"SDXL model {source!r}: token width {cross} cannot hold the pooled embedding ({p}) "
            f"and {NUM_TIME_IDS} time ids in one packed row"
        )

    resolution = checked_resolution(unet, vae, resolution, source)
    side = resolution // vae_scale_factor(vae)
    # (original_size, crops_coords_top_left, target_size): the pipeline's defaults at R x R.
    time_ids = (resolution, resolution, 0, 0, resolution, resolution)
    zeros = bool(components.get("force_zeros_for_empty_prompt", True))

    schedule = DDIMSchedule.from_scheduler_config(dict(components["scheduler"].config))
    return T2IModel(
        unet=attach_packed_conditioning(unet),
        encode_text=partial(encode_prompts_xl, tokenizers, encoders, time_ids, zeros),
        decode=partial(decode_latents_xl, vae),
        schedule=schedule,
        latent_shape=(int(unet.config.in_channels), side, side),
        components={
            **{k: v for k, v in components.items() if k != "unet"},
            "force_zeros_for_empty_prompt": zeros,
        },
        source=source,
    )


def sdxl_pipeline(components: dict[str, Any], unet: nn.Module | None = None) -> Any:
    """A diffusers `StableDiffusionXLPipeline` over SDXL components (no watermarker, progress bar
    off): the reference sampler for parity tests and what `save_pretrained` writes.

    components: as `sdxl_components_to_t2i` takes them (a `T2IModel`'s components plus its unet:
    `sdxl_pipeline(model.components, model.unet)`).
    """
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        unet=unet if unet is not None else components["unet"],
        force_zeros_for_empty_prompt=bool(components.get("force_zeros_for_empty_prompt", True)),
        add_watermarker=False,
        **{k: components[k] for k in SDXL_COMPONENTS if k != "unet"},
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
