"""A victim's text encoder at token level, for prompt attacks (Ring-A-Bell, MMA, P4D, ...).

Prompt attacks search over token sequences and differentiate through the text encoder's input
embeddings. `TokenEncoder` gives one view of the two encoder families safediff wraps:

- Stable Diffusion's CLIP text encoder (transformers `CLIPTextModel` + `CLIPTokenizer`): ids are
  padded with the tokenizer's pad token (SD 1.x: `<|endoftext|>`) to `model_max_length` (77) and the
  whole padded sequence is encoded with CLIP's causal mask and no padding mask, as
  `StableDiffusionPipeline` and `safediff.models.stable_diffusion.encode_prompts` do.
- The sandbox's MiniLM (transformers `BertModel` + its WordPiece tokenizer): ids are padded with
  [PAD] to the sandbox's fixed length (20) and padding is masked out (attention_mask = ids != [PAD]),
  as the sandbox's `MiniLMTextEncoderAdapter.encode` does.

`token_encoder_for(model)` goes through `adapter_for_model`, so a DES-defended model's swapped text
encoder is the one attacked. SDXL (two text encoders) is refused by the adapter.

Round trips: `decode(ids)` joins tokens into text; `ids(decode(x))` gives back `x` only when the
tokenizer re-segments the text the same way. Both tokenizers may not: CLIP's BPE merges adjacent
end-of-word-less pieces ("fla" "me</w>" -> "flame</w>"), WordPiece re-splits words ("##" pieces
glued to their neighbour), both lowercase and collapse whitespace. Attacks therefore re-encode the
decoded text before reporting a final loss (the victim only ever sees text).
"""

import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from safediff.errors import SafediffError
from safediff.models.base import T2IModel

_PLACEHOLDER = re.compile(r"^\[unused\d+\]$")


class TokenEncoder:
    """A text encoder seen at token level (see the module docstring for the two families).

    tokenizer: the transformers tokenizer the model encodes prompts with.
    module: the text encoder (`CLIPTextModel` or `BertModel`); never modified or copied.
    max_length: L, the number of token positions the diffusion model is conditioned on.
    mask_padding: True for encoders that mask padding (BERT), False for CLIP (padding attended).
    """

    def __init__(self, tokenizer, module: nn.Module, max_length: int, mask_padding: bool) -> None:
        if max_length < 3:
            raise SafediffError(f"token encoder max_length must be >= 3, got {max_length}")
        self.tokenizer = tokenizer
        self.module = module
        self.max_length = int(max_length)
        self.mask_padding = mask_padding
        self.vocab_size = int(module.get_input_embeddings().weight.shape[0])
        self.bos_id = int(_first_not_none(tokenizer.bos_token_id, tokenizer.cls_token_id))
        self.eos_id = int(_first_not_none(tokenizer.eos_token_id, tokenizer.sep_token_id))
        self.pad_id = int(_first_not_none(tokenizer.pad_token_id, self.eos_id))

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def token_embedding(self) -> Tensor:
        """The input embedding matrix [V, E] (the module's own parameter, not a copy)."""
        return self.module.get_input_embeddings().weight

    def ids(self, prompts: Sequence[str]) -> Tensor:
        """Prompts -> LongTensor [B, L] on the module's device, padded and truncated exactly as
        the model's `encode_text` does."""
        if isinstance(prompts, str):
            raise SafediffError("ids takes a list of prompts, got a single string")
        batch = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return batch.input_ids.to(self.device)

    def _forward(self, ids: Tensor) -> Tensor:
        ids = ids.to(self.device)
        if self.mask_padding:
            mask = (ids != self.pad_id).long()  # [B, L]
            return self.module(input_ids=ids, attention_mask=mask).last_hidden_state
        return self.module(ids)[0]  # CLIP: last hidden state after the final layer norm

    def states(self, ids: Tensor) -> Tensor:
        """ids [B, L] -> token states [B, L, D] (== model.encode_text for these prompts, up to
        float tolerance). Gradient as the caller has it (the module's parameters may be frozen)."""
        _check_ids(ids, self.max_length)
        return self._forward(ids)

    def states_from_embeds(self, embeds: Tensor, ids: Tensor) -> Tensor:
        """Input embeddings [B, L, E] (in place of token_embedding()[ids]) -> states [B, L, D].

        Gradient flows to `embeds`. `ids` [B, L] still decide what the embeddings do not: position
        ids, the padding mask (BERT) and, for CLIP, nothing else (its causal mask ignores ids).
        Implemented by a forward hook that replaces the embedding layer's output, so the encoder's
        own forward runs unchanged; equal to `states(ids)` when embeds = token_embedding()[ids].
        """
        _check_ids(ids, self.max_length)
        if embeds.shape[:2] != ids.shape or embeds.shape[-1] != self.token_embedding().shape[1]:
            raise SafediffError(
                f"embeds must be [B, L, E] = [{ids.shape[0]}, {ids.shape[1]}, "
                f"{self.token_embedding().shape[1]}], got {list(embeds.shape)}"
            )
        layer = self.module.get_input_embeddings()
        handle = layer.register_forward_hook(lambda _m, _inp, _out: embeds.to(_out.dtype))
        try:
            return self._forward(ids)
        finally:
            handle.remove()

    def pooled(self, states: Tensor, ids: Tensor) -> Tensor:
        """One vector per prompt [B, D] from states [B, L, D]: CLIP's pooled output (the state at
        the first EOS, what `CLIPTextModel` returns as pooler_output for SD's tokenizer) or, for
        BERT, the mean over non-padding positions (MiniLM's sentence embedding before its L2
        normalisation, as sentence-transformers pools it). Gradient flows through `states`."""
        _check_ids(ids, self.max_length)
        ids = ids.to(states.device)
        if self.mask_padding:
            mask = (ids != self.pad_id).to(states.dtype).unsqueeze(-1)  # [B, L, 1]
            return (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        is_eos = (ids == self.eos_id).int()
        is_eos[:, 0] = 0  # BOS never counts, even where BOS == EOS in an odd tokenizer
        first = torch.where(is_eos.any(1), is_eos.argmax(1), torch.full_like(ids[:, 0], -1))
        return states[torch.arange(states.shape[0], device=states.device), first]

    def content_slots(self, ids: Tensor) -> list[list[int]]:
        """For each row of ids [B, L], the positions strictly between BOS/[CLS] and the first
        EOS/[SEP] (the prompt's own tokens; empty for an empty prompt)."""
        _check_ids(ids, self.max_length)
        slots = []
        for row in ids.tolist():
            end = row.index(self.eos_id, 1) if self.eos_id in row[1:] else len(row)
            slots.append(list(range(1, end)))
        return slots

    def with_content(self, content: Tensor) -> Tensor:
        """Content token rows [B, K] -> full ids [B, L]: BOS, the K tokens, EOS, then padding
        (K <= L - 2), laid out as the tokenizer lays out a prompt of those tokens."""
        if content.dim() != 2 or not 0 <= content.shape[1] <= self.max_length - 2:
            raise SafediffError(
                f"content must be [B, K] with K <= {self.max_length - 2}, got {list(content.shape)}"
            )
        b, k = content.shape
        ids = torch.full((b, self.max_length), self.pad_id, dtype=torch.long, device=content.device)
        ids[:, 0] = self.bos_id
        ids[:, 1 : 1 + k] = content
        ids[:, 1 + k] = self.eos_id
        return ids

    def decode(self, ids: Tensor) -> str:
        """1-D ids -> text without special tokens (see the module docstring for round trips)."""
        if ids.dim() != 1:
            raise SafediffError(f"decode takes 1-D ids, got shape {list(ids.shape)}")
        text = " ".join(self.tokenizer.decode(ids.tolist(), skip_special_tokens=True).split())
        if self.mask_padding and text.startswith("##"):
            text = text[2:]  # a leading WordPiece continuation has no word to continue
        return text

    def special_ids(self) -> list[int]:
        """Every special or added token id (BOS, EOS, PAD, [UNK], [MASK], ...)."""
        out = set(int(i) for i in self.tokenizer.all_special_ids)
        out.update(int(i) for i in getattr(self.tokenizer, "added_tokens_decoder", {}))
        return sorted(i for i in out if 0 <= i < self.vocab_size)

    def token_texts(self) -> list[str]:
        """The text each vocabulary id stands for, lowercased, without CLIP's `</w>` or
        WordPiece's `##` markers ("" for ids the tokenizer does not know)."""
        return _clean_token_texts(
            self.tokenizer.convert_ids_to_tokens(list(range(self.vocab_size)))
        )

    def allowed_tokens(self, banned_words: Sequence[str]) -> Tensor:
        """BoolTensor [V] on the CPU: False for special tokens (and BERT's "[unusedN]" slots) and
        for every token that is a piece of a banned word, True otherwise.

        Every banned word counts with its plural / singular forms (`inflections`: "knife" bans
        "knives"). A token is banned when it is one of the tokens the tokenizer splits such a word
        into (as a word on its own, so CLIP's end-of-word form and WordPiece's first piece), or
        when its text contains a banned word (case-insensitive; "guns", "handgun" and also "begun" for
        "gun"). Phrases of several words ("death's head") are banned as text only. Other
        segmentations of a banned word into short pieces are not banned token by token either;
        attacks reject such candidates with `contains_banned` on the decoded text.
        """
        allowed = torch.ones(self.vocab_size, dtype=torch.bool)
        allowed[self.special_ids()] = False
        # BERT's "[unused17]" slots: never trained, and their text does not tokenise back to them
        raw = self.tokenizer.convert_ids_to_tokens(list(range(self.vocab_size)))
        allowed[[i for i, t in enumerate(raw) if t and _PLACEHOLDER.match(t)]] = False
        # multi-word phrases ("death's head") are banned as text only (`contains_banned`): banning
        # their pieces would ban "s", "'" and "head" everywhere
        words = [f for w in banned_words if len(w.split()) == 1 for f in inflections(w)]
        for word in words:
            pieces = self.tokenizer(word, add_special_tokens=False).input_ids
            allowed[[p for p in pieces if 0 <= p < self.vocab_size]] = False
        if words:
            for i, text in enumerate(_clean_token_texts(raw)):
                if any(w in text for w in words):
                    allowed[i] = False
        return allowed


def inflections(word: str) -> tuple[str, ...]:
    """`word` (lowercased) with its regular English plural / singular forms: knife -> knives,
    flames -> flame; gun -> guns; glass -> glasses; deliberately crude (no dictionary). A phrase inflects its last word. Used
    by `allowed_tokens` and `contains_banned`, so banning "knife" bans "knives" too."""
    w = " ".join(word.strip().lower().split())
    if not w:
        return ()
    sibilant = ("s", "x", "z", "ch", "sh")
    out = [w]
    if not (w.endswith("s") and not w.endswith("ss")):  # "flames" is taken as a plural already
        out.append(w + "es" if w.endswith(sibilant) else w + "s")
    if w.endswith("fe"):
        out.append(w[:-2] + "ves")
    elif w.endswith("f"):
        out.append(w[:-1] + "ves")
    if w.endswith("y") and len(w) > 2:
        out.append(w[:-1] + "ies")
    if w.endswith("ves") and len(w) > 4:
        out += [w[:-3] + "fe", w[:-3] + "f"]
    if w.endswith("ies") and len(w) > 4:
        out.append(w[:-3] + "y")
    if w.endswith("es") and w[:-2].endswith(sibilant):
        out.append(w[:-2])
    if w.endswith("s") and not w.endswith("ss") and len(w) > 3:
        out.append(w[:-1])
    return tuple(dict.fromkeys(out))


def contains_banned(text: str, banned_words: Sequence[str]) -> bool:
    """Whether `text` contains a banned word, or a plural / singular form of one (`inflections`),
    as a whole word (case-insensitive)."""
    low = " ".join(text.lower().split())
    return any(
        re.search(rf"(?<![a-z0-9]){re.escape(form)}(?![a-z0-9])", low)
        for w in banned_words
        for form in inflections(w)
    )


def _clean_token_texts(raw: Sequence[str | None]) -> list[str]:
    """Raw vocabulary entries -> lowercased text without `</w>` / `##` markers."""
    return [(t or "").lower().removesuffix("</w>").removeprefix("##") for t in raw]


def _first_not_none(*values):
    for v in values:
        if v is not None:
            return v
    raise SafediffError("the tokenizer has no begin/end-of-text token; cannot attack its encoder")


def _check_ids(ids: Tensor, max_length: int) -> None:
    if ids.dim() != 2 or ids.shape[1] != max_length:
        raise SafediffError(f"ids must be [B, {max_length}], got {list(ids.shape)}")


def token_encoder_for(model: T2IModel) -> TokenEncoder:
    """The text encoder of `model` at token level (via `adapter_for_model`, so a DES-swapped
    encoder is the one returned). CLIP (`CLIPTextModel`) and BERT (the sandbox's MiniLM) are
    supported; anything else, or SDXL, is a one-line SafediffError."""
    from safediff.defenses.text_encoder_adapter import adapter_for_model

    if model.components.get("text_encoder_2") is not None:
        raise SafediffError(
            f"model {model.source!r}: token-level attacks read one text encoder, but SDXL "
            "conditions on two (CLIP ViT-L and OpenCLIP bigG) plus a pooled embedding"
        )
    adapter = adapter_for_model(model)
    module = adapter.module
    tokenizer = getattr(adapter, "tokenizer", None)
    model_type = getattr(getattr(module, "config", None), "model_type", "")
    if tokenizer is None or not hasattr(module, "get_input_embeddings"):
        raise SafediffError(
            f"model {model.source!r}: its text encoder has no tokenizer or input embeddings; "
            "token-level attacks need a CLIP or BERT text encoder"
        )
    with torch.no_grad():
        length = int(adapter.encode([""]).shape[1])  # L as the adapter pads (77 CLIP, 20 MiniLM)
    if model_type == "clip_text_model":
        return TokenEncoder(tokenizer, module, length, mask_padding=False)
    if model_type == "bert":
        return TokenEncoder(tokenizer, module, length, mask_padding=True)
    raise SafediffError(
        f"model {model.source!r}: text encoder type {model_type!r} is not supported by token-level "
        "attacks (CLIP and BERT are)"
    )
