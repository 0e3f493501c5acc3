"""The text encoder as a trainable module, and swapping a trained one into a `T2IModel`.

DES (des.py) trains "the text encoder" without caring which one it is: it needs prompts turned into
token states [B, L, D] *with* gradient, the module whose parameters it optimises, a frozen copy,
and a way to save the result and put it back into a model. `TextEncoderAdapter` is that interface.
`CLIPTextEncoderAdapter` implements it for Stable Diffusion's CLIP text encoder (transformers'
`CLIPTextModel` + `CLIPTokenizer`); another family's encoder (the sandbox's MiniLM) plugs in by
putting its own adapter into `T2IModel.components["text_encoder_adapter"]` (see
`adapter_for_model`) and by its plug-in's `ModelFamily.text_encoder` loader.

SDXL (`SDXLTextEncodersAdapter`) trains both its CLIP encoders, with DES's losses on each
encoder's own output space (`encode_spaces`: ViT-L's and bigG's penultimate token states and
bigG's pooled projection, see the class). SD3 / SD3.5 and FLUX (`FlowTextEncodersAdapter`) train
all their encoders (CLIP-L, CLIP-G, T5; CLIP-L, T5) as one module on the packed conditioning.

Saved encoders are plain transformers folders (`save_pretrained`: config.json + model.safetensors),
so `CLIPTextModel.from_pretrained(folder)` loads them and they drop into a diffusers pipeline
folder as its `text_encoder/` with no other change; multi-encoder models write one such folder
per encoder, named as the pipeline's components (text_encoder/, text_encoder_2/, ...).
"""

import copy
import dataclasses
import os
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from safediff import plugins
from safediff.errors import SafediffError
from safediff.models.base import T2IModel
from safediff.models.flow import is_flow_spec
from safediff.models.loading import TINY_MODELS, TINY_SDXL_MODELS
from safediff.models.sdxl import (
    encode_prompts_xl,
    is_sdxl_pipeline_folder,
    pack_conditioning,
    read_model_index,
)
from safediff.models.stable_diffusion import encode_prompts, freeze
from safediff.sampling.flow import is_flow_schedule


class TextEncoderAdapter(Protocol):
    """A text encoder that can be trained, saved, reloaded and swapped into a `T2IModel`.

    An adapter may also have encode_spaces(prompts) -> {name: [B, ...]}, several embedding
    spaces with gradient (SDXL's); DES then applies its losses in each of them (des.py).
    """

    @property
    def module(self) -> nn.Module:
        """The trainable module (every parameter of it is what DES optimises)."""
        ...

    def encode(self, prompts: list[str]) -> Tensor:
        """Prompts -> token states [B, L, D] on the module's device, exactly as the diffusion
        model consumes them (padded to the full length L). Gradient flows when enabled."""
        ...

    def clone(self) -> "TextEncoderAdapter":
        """An independent copy (deep-copied module, same tokenizer)."""
        ...

    def save(self, folder: str | Path) -> Path:
        """Write the module's weights and config to `folder`; returns the folder."""
        ...

    def load(self, folder: str | Path) -> "TextEncoderAdapter":
        """A new adapter with the same tokenizer and the weights saved in `folder`, on this
        adapter's device and dtype."""
        ...

    def swap_into(self, model: T2IModel) -> T2IModel:
        """A copy of `model` whose prompts are encoded by this (frozen) encoder; `model` itself,
        its UNet and VAE are left as they are (shared, not copied)."""
        ...


def _device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(module.parameters())
    return param.device, param.dtype


class CLIPTextEncoderAdapter:
    """Stable Diffusion's CLIP text encoder: tokenizer padded/truncated to model_max_length (77),
    last hidden state after the final layer norm (what StableDiffusionPipeline feeds the UNet).

    tokenizer: a transformers CLIPTokenizer; text_encoder: a CLIPTextModel (or any module whose
    output[0] is the last hidden state [B, L, D]).
    """

    def __init__(self, tokenizer: Any, text_encoder: nn.Module) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder

    @property
    def module(self) -> nn.Module:
        return self.text_encoder

    def encode(self, prompts: list[str]) -> Tensor:
        if isinstance(prompts, str):
            raise SafediffError("encode takes a list of prompts, got a single string")
        device, _ = _device_dtype(self.text_encoder)
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(device))[0]  # [B, L, D] last_hidden_state

    def clone(self) -> "CLIPTextEncoderAdapter":
        return CLIPTextEncoderAdapter(self.tokenizer, copy.deepcopy(self.text_encoder))

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.text_encoder.save_pretrained(folder)  # config.json + model.safetensors
        return folder

    def load(self, folder: str | Path) -> "CLIPTextEncoderAdapter":
        from transformers import CLIPTextModel

        where = _text_encoder_folder(folder)
        device, dtype = _device_dtype(self.text_encoder)
        try:
            module = CLIPTextModel.from_pretrained(str(where), dtype=dtype)
        except (OSError, ValueError) as err:
            raise SafediffError(f"could not load a CLIP text encoder from {where}: {err}") from None
        expected = self.text_encoder.config.hidden_size
        if module.config.hidden_size != expected:
            raise SafediffError(
                f"text encoder {where} has width {module.config.hidden_size}, the model's has "
                f"{expected}; train DES on the same base model"
            )
        return CLIPTextEncoderAdapter(self.tokenizer, module.to(device))

    def swap_into(self, model: T2IModel) -> T2IModel:
        encoder = freeze(self.text_encoder)
        components = {**model.components, "text_encoder": encoder}
        return dataclasses.replace(
            model,
            encode_text=partial(encode_prompts, self.tokenizer, encoder),
            components=components,
        )


FLOW_ENCODER_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3")
"""The encoders of a flow pipeline, in the order its encode function takes them: SD3 / SD3.5:
CLIP-L, CLIP-G, T5 (optional); FLUX: CLIP-L, T5."""


class FlowTextEncodersAdapter:
    """Every text encoder of an SD3 / SD3.5 (CLIP-L, CLIP-G, T5) or FLUX (CLIP-L, T5) model as
    one trainable module (`module`: an nn.ModuleDict by diffusers component name).

    encode: the packed conditioning the transformer reads (`safediff.models.flow`:
    [B, 77 + L_t5 + 1, D] for SD3, [B, L_t5 + 1, D] for FLUX; token states and the pooled row),
    with gradient, so DES distorts what the model is conditioned on through all its encoders at
    once. `tokenizer` is CLIP-L's (DES memoises it); the others are the model's.
    save / load: one transformers folder per encoder, named as in a diffusers pipeline folder
    (text_encoder/, text_encoder_2/, text_encoder_3/), so they drop into one as they are.
    Departure from DES (defined on SD 1.x's one CLIP encoder): the embedding is the packed
    multi-encoder conditioning, so its raw units, and with them the concept guidance g, differ
    from CLIP-L's (g = 200 was tuned on SD 1.4); re-tune g per model.
    """

    def __init__(self, encode: partial, names: tuple[str, ...]) -> None:
        self._func, self._args = encode.func, encode.args
        self.names = names
        self.tokenizer = encode.args[0][0]
        pairs = zip(names, encode.args[1], strict=True)
        self.encoders = nn.ModuleDict({n: e for n, e in pairs if e is not None})

    @classmethod
    def from_model(cls, model: T2IModel) -> "FlowTextEncodersAdapter":
        encode = model.encode_text
        if not isinstance(encode, partial) or len(encode.args) < 3:
            raise SafediffError(
                f"model {model.source!r}: its prompt encoding is not the flow adapter's "
                "(safediff.models.flow); cannot train its text encoders"
            )
        return cls(encode, FLOW_ENCODER_NAMES[: len(encode.args[1])])

    @property
    def module(self) -> nn.Module:
        return self.encoders

    def _partial(self, grad: bool) -> partial:
        modules = dict(self.encoders.items())  # a missing T5 (SD3 without it) stays None
        encoders = tuple(modules.get(n) for n in self.names)
        tokenizers = (self.tokenizer, *self._args[0][1:])
        extra = {"grad": True} if grad else {}
        return partial(self._func, tokenizers, encoders, *self._args[2:], **extra)

    def encode(self, prompts: list[str]) -> Tensor:
        if isinstance(prompts, str):
            raise SafediffError("encode takes a list of prompts, got a single string")
        device, _ = _device_dtype(self.encoders)
        return self._partial(grad=True)(list(prompts), device)

    def clone(self) -> "FlowTextEncodersAdapter":
        other = copy.copy(self)
        other.encoders = copy.deepcopy(self.encoders)
        return other

    def save(self, folder: str | Path) -> Path:
        return _save_encoders(self.encoders, folder)

    def load(self, folder: str | Path) -> "FlowTextEncodersAdapter":
        other = copy.copy(self)
        other.encoders = _load_encoders(self.encoders, folder)
        return other

    def swap_into(self, model: T2IModel) -> T2IModel:
        for encoder in self.encoders.values():
            freeze(encoder)
        components = {**model.components, **dict(self.encoders.items())}
        return dataclasses.replace(
            model, encode_text=self._partial(grad=False), components=components
        )


class SDXLTextEncodersAdapter:
    """SDXL's two CLIP text encoders (transformers' `CLIPTextModel` ViT-L and
    `CLIPTextModelWithProjection` bigG) as one trainable module (`module`: an nn.ModuleDict by
    diffusers component name, text_encoder and text_encoder_2).

    encode: the packed conditioning the UNet reads (`safediff.models.sdxl.encode_prompts_xl`,
    [B, 77 + 1, 768 + 1280]: both encoders' penultimate token states side by side, and a row
    [text_embeds | time_ids | 0]), with gradient; "" gets the pipeline's zeros.
    encode_spaces: what DES trains on, each encoder's own outputs as three embedding spaces,
    with every DES loss (unsafe target, safe preservation and its concept-shifted term, concept
    neutralisation) computed in each space separately and the three objectives summed:
    - "text_encoder": ViT-L's penultimate hidden states [B, 77, 768], the first 768 channels of
      the UNet's cross-attention context;
    - "text_encoder_2": bigG's penultimate hidden states [B, 77, 1280], the other 1280 channels;
    - "text_embeds": bigG's pooled projection [B, 1280], which the UNet reads through its added
      (time) embedding, a global conditioning that would carry the concept past distorted
      token states if it were left out.
    Why separate spaces and not the packed tensor (as the flow adapter does): the two encoders'
    states have different widths and scales, so one cosine over their concatenation would
    weigh them by their norms, and the pooled embedding is one vector beside 77 token rows and
    would barely count once flattened with them. Per space, ViT-L's objective is exactly DES's
    on SD 1.x's encoder (on the penultimate layer SDXL reads), and bigG is trained by the sum of
    its two outputs' objectives; codebook, least-similar target and concept direction u are
    each space's own. The spaces hold the encoders' real outputs for "" (E_orig("") of u and of
    the concept loss), not the pipeline's zeros: a cosine with a zero vector is undefined. The
    time ids are constants and enter no loss.
    Departure: DES's g = 200 is in SD 1.4 CLIP-L last-hidden-state units; the same g is used in
    all three spaces (raw units, not re-tuned for SDXL).
    save / load: text_encoder/ and text_encoder_2/ transformers folders, as in a diffusers
    StableDiffusionXLPipeline folder.
    """

    def __init__(
        self,
        tokenizers: tuple[Any, Any],
        encoders: tuple[nn.Module, nn.Module],
        time_ids: tuple[int, ...],
        zeros_for_empty: bool,
    ) -> None:
        self.tokenizer, self.tokenizer_2 = tokenizers
        self.encoders = nn.ModuleDict(dict(zip(SDXL_ENCODER_NAMES, encoders, strict=True)))
        self.time_ids = tuple(time_ids)
        self.zeros_for_empty = zeros_for_empty

    @classmethod
    def from_model(cls, model: T2IModel) -> "SDXLTextEncodersAdapter":
        encode = model.encode_text
        if not isinstance(encode, partial) or encode.func is not encode_prompts_xl:
            raise SafediffError(
                f"model {model.source!r}: its prompt encoding is not the SDXL adapter's "
                "(safediff.models.sdxl); cannot train its text encoders"
            )
        tokenizers, encoders, time_ids, zeros = encode.args
        return cls(tokenizers, encoders, time_ids, zeros)

    @property
    def module(self) -> nn.Module:
        return self.encoders

    def _tokenizers(self) -> tuple[Any, Any]:
        return self.tokenizer, self.tokenizer_2

    def _encoders(self) -> tuple[nn.Module, nn.Module]:
        return self.encoders["text_encoder"], self.encoders["text_encoder_2"]

    def encode_spaces(self, prompts: list[str]) -> dict[str, Tensor]:
        """{"text_encoder": [B, 77, 768], "text_encoder_2": [B, 77, 1280], "text_embeds":
        [B, 1280]} (widths of SDXL base), with gradient, as StableDiffusionXLPipeline.encode_prompt
        computes them (clip_skip None), in each encoder's dtype, on its device."""
        if isinstance(prompts, str):
            raise SafediffError("encode takes a list of prompts, got a single string")
        out: dict[str, Tensor] = {}
        for name, tokenizer, encoder in zip(
            SDXL_ENCODER_NAMES, self._tokenizers(), self._encoders(), strict=True
        ):
            ids = tokenizer(
                list(prompts),
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            result = encoder(ids.to(_device_dtype(encoder)[0]), output_hidden_states=True)
            out[name] = result.hidden_states[-2]
            if name == "text_encoder_2":
                out["text_embeds"] = result[0]  # CLIPTextModelWithProjection.text_embeds
        return out

    def encode(self, prompts: list[str]) -> Tensor:
        spaces = self.encode_spaces(prompts)
        device, dtype = _device_dtype(self.encoders["text_encoder_2"])
        tokens = torch.cat(
            [spaces[n].to(device=device, dtype=dtype) for n in SDXL_ENCODER_NAMES], dim=-1
        )
        pooled = spaces["text_embeds"].to(device=device, dtype=dtype)
        if self.zeros_for_empty:
            empty = torch.tensor([p == "" for p in prompts], device=device)
            tokens = torch.where(empty[:, None, None], torch.zeros_like(tokens), tokens)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        ids = torch.tensor(self.time_ids, dtype=dtype, device=device).expand(len(prompts), -1)
        return pack_conditioning(tokens, pooled, ids)

    def clone(self) -> "SDXLTextEncodersAdapter":
        other = copy.copy(self)
        other.encoders = copy.deepcopy(self.encoders)
        return other

    def save(self, folder: str | Path) -> Path:
        return _save_encoders(self.encoders, folder)

    def load(self, folder: str | Path) -> "SDXLTextEncodersAdapter":
        other = copy.copy(self)
        other.encoders = _load_encoders(self.encoders, folder)
        return other

    def swap_into(self, model: T2IModel) -> T2IModel:
        encoders = tuple(freeze(e) for e in self._encoders())
        encode = partial(
            encode_prompts_xl, self._tokenizers(), encoders, self.time_ids, self.zeros_for_empty
        )
        components = {**model.components, **dict(zip(SDXL_ENCODER_NAMES, encoders, strict=True))}
        return dataclasses.replace(model, encode_text=encode, components=components)


SDXL_ENCODER_NAMES = ("text_encoder", "text_encoder_2")
"""SDXL's text encoders by diffusers component name: CLIP ViT-L, OpenCLIP bigG (with projection)."""


def _save_encoders(encoders: nn.ModuleDict, folder: str | Path) -> Path:
    """One transformers folder (config.json + model.safetensors) per encoder, by its name."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, encoder in encoders.items():
        encoder.save_pretrained(folder / name)
    return folder


def _load_encoders(encoders: nn.ModuleDict, folder: str | Path) -> nn.ModuleDict:
    """The encoders saved by `_save_encoders` in `folder`, each of its model's class, dtype and
    device; a missing subfolder or another width is a one-line SafediffError."""
    where = Path(folder).expanduser().resolve()
    modules = {}
    for name, encoder in encoders.items():
        sub = where / name
        if not (sub / "config.json").is_file():
            raise SafediffError(
                f"{where} has no {name}/ text encoder folder; pass the folder `safediff des "
                "train` wrote for this model family"
            )
        device, dtype = _device_dtype(encoder)
        try:
            module = type(encoder).from_pretrained(str(sub), dtype=dtype)
        except (OSError, ValueError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise SafediffError(f"could not load text encoder {sub}: {first}") from None
        width = _width(module.config)
        if width != _width(encoder.config):
            raise SafediffError(
                f"text encoder {sub} has width {width}, the model's has "
                f"{_width(encoder.config)}; train DES on the same base model"
            )
        modules[name] = module.to(device)
    return nn.ModuleDict(modules)


def _width(config: Any) -> int | None:
    return getattr(config, "hidden_size", None) or getattr(config, "d_model", None)


def _text_encoder_folder(folder: str | Path) -> Path:
    """A transformers text-encoder folder (config.json at its root), or a SafediffError."""
    where = Path(folder).expanduser().resolve()
    if not where.is_dir():
        raise SafediffError(f"text encoder folder not found: {where}")
    if not (where / "config.json").is_file() and (where / "text_encoder" / "config.json").is_file():
        where = where / "text_encoder"  # a diffusers pipeline folder
    if not (where / "config.json").is_file():
        raise SafediffError(
            f"{where} is not a transformers text encoder folder (no config.json); pass the folder "
            "`safediff des train` wrote"
        )
    return where


def adapter_for_model(model: T2IModel) -> TextEncoderAdapter:
    """The text encoder of `model` as an adapter (sharing the model's module, not a copy).

    A model family with its own encoder puts an adapter into
    `model.components["text_encoder_adapter"]`; Stable Diffusion models are recognised by their
    `tokenizer` and `text_encoder` components.
    """
    own = model.components.get("text_encoder_adapter")
    if own is not None:
        return own
    if is_flow_schedule(model.schedule):  # SD3 / FLUX: every encoder, as one module
        return FlowTextEncodersAdapter.from_model(model)
    if model.components.get("text_encoder_2") is not None:  # SDXL: both CLIP encoders
        return SDXLTextEncodersAdapter.from_model(model)
    tokenizer = model.components.get("tokenizer")
    encoder = model.components.get("text_encoder")
    if tokenizer is None or not isinstance(encoder, nn.Module):
        raise SafediffError(
            f"model {model.source!r} exposes no text encoder (components 'tokenizer' and "
            "'text_encoder', or a 'text_encoder_adapter'); cannot train or swap its text encoder"
        )
    return CLIPTextEncoderAdapter(tokenizer, encoder)


def swap_text_encoder(model: T2IModel, folder: str | Path) -> T2IModel:
    """`model` with the text encoder saved in `folder` (e.g. by `safediff des train`) swapped in.

    Works on any T2IModel whose encoder has an adapter (base, GRPO-trained, ...). The returned model
    shares the UNet, VAE and tokenizer with `model`; only prompt encoding changes. `source` records
    the swap.
    """
    swapped = adapter_for_model(model).load(folder).swap_into(model)
    return dataclasses.replace(swapped, source=f"{model.source} + text encoder {folder}")


def load_text_encoder_adapter(
    pretrained: str,
    revision: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TextEncoderAdapter:
    """The text encoder and tokenizer of a base model, without loading its UNet or VAE.

    pretrained: "tiny-sd" / "tiny-sd-v" / "tiny-sdxl" / "tiny-sd3" / "tiny-flux" (the offline
    tiny models), a plug-in's model family spec (e.g. "sandbox": the sandbox's MiniLM), a
    diffusers pipeline folder, or a hub id (read from the local cache when HF_HUB_OFFLINE is set).
    SDXL, SD3 and FLUX load the whole model (UNet / transformer too) and take its encoders.
    """
    family = plugins.model_family(pretrained)
    if family is not None:
        if family.text_encoder is None:
            raise SafediffError(
                f"model family {family.name!r} has no trainable text encoder; DES cannot run on it"
            )
        return family.text_encoder(plugins.split_spec(pretrained)[1], device)
    if pretrained in TINY_SDXL_MODELS or is_flow_spec(pretrained):
        return _whole_model_adapter(pretrained, revision, device, dtype)
    if pretrained in TINY_MODELS:
        from safediff.models.tiny_sd import build_tiny_sd

        comps = build_tiny_sd(seed=0, prediction_type=TINY_MODELS[pretrained])
        return CLIPTextEncoderAdapter(comps["tokenizer"], comps["text_encoder"].to(device, dtype))

    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(pretrained).expanduser()
    kwargs: dict[str, Any] = {}
    if folder.exists():
        where = str(folder.resolve())
        if is_sdxl_pipeline_folder(read_model_index(folder / "model_index.json")):
            return _whole_model_adapter(where, revision, device, dtype)
        if not (folder / "text_encoder").is_dir() or not (folder / "tokenizer").is_dir():
            raise SafediffError(
                f"{folder.resolve()} is not a diffusers pipeline folder: expected the subfolders "
                "text_encoder and tokenizer"
            )
    else:
        where = pretrained
        kwargs["revision"] = revision
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes")
        kwargs["local_files_only"] = offline
        if _is_sdxl_hub_id(pretrained, revision, offline):
            return _whole_model_adapter(pretrained, revision, device, dtype)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(where, subfolder="tokenizer", **kwargs)
        encoder = CLIPTextModel.from_pretrained(
            where, subfolder="text_encoder", dtype=dtype, **kwargs
        )
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SafediffError(f"could not load the text encoder of {pretrained!r}: {first}") from None
    return CLIPTextEncoderAdapter(tokenizer, encoder.to(device))


def _whole_model_adapter(
    pretrained: str, revision: str | None, device: torch.device | str, dtype: torch.dtype
) -> TextEncoderAdapter:
    """The encoders of a multi-encoder model (SDXL, SD3, FLUX), read from the loaded model."""
    from safediff.config import ModelConfig
    from safediff.models.loading import load_t2i_model

    config = ModelConfig(pretrained=pretrained, revision=revision)
    return adapter_for_model(load_t2i_model(config, device=device, dtype=dtype))


def _is_sdxl_hub_id(repo_id: str, revision: str | None, offline: bool) -> bool:
    """Whether a hub id's model_index.json names an SDXL pipeline; a hub id whose
    model_index.json cannot be fetched is left to the encoder's own load to report."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        index = hf_hub_download(
            repo_id, "model_index.json", revision=revision, local_files_only=offline
        )
    except (OSError, ValueError, EntryNotFoundError):
        return False
    return is_sdxl_pipeline_folder(read_model_index(index))
