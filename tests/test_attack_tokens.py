"""attacks/tokens.py on the two real encoder families: tiny-sd's CLIP and the sandbox's MiniLM."""

import functools

import pytest
import torch

from safediff.attacks.tokens import contains_banned, token_encoder_for
from safediff.config import ModelConfig
from safediff.errors import SafediffError
from safediff.models.loading import load_t2i_model

PROMPTS = ["a photo of a knife", "", "a flaming skull with guns, fire!"]


@functools.cache
def _load(name: str):
    return load_t2i_model(ModelConfig(pretrained=name), device="cpu")


@pytest.fixture(params=["tiny-sd", "sandbox"])
def model(request):
    return _load(request.param)


def test_states_equal_encode_text(model):
    enc = token_encoder_for(model)
    ids = enc.ids(PROMPTS)
    assert ids.shape == (3, enc.max_length) and ids.dtype == torch.long
    with torch.no_grad():
        states = enc.states(ids)
    torch.testing.assert_close(states, model.encode_text(PROMPTS, "cpu"))


def test_states_from_embeds_equals_states_and_has_gradient(model):
    enc = token_encoder_for(model)
    ids = enc.ids(PROMPTS)
    embeds = enc.token_embedding()[ids].detach().clone().requires_grad_(True)
    states = enc.states_from_embeds(embeds, ids)
    torch.testing.assert_close(states, enc.states(ids))
    states.pow(2).sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    # a different embedding in one content slot changes the states (the hook is really used)
    other = embeds.detach().clone()
    other[0, 1] += 1.0
    assert not torch.allclose(enc.states_from_embeds(other, ids), states.detach())


def test_shapes_slots_decode(model):
    enc = token_encoder_for(model)
    assert enc.token_embedding().shape[0] == enc.vocab_size
    assert enc.token_embedding() is enc.module.get_input_embeddings().weight
    ids = enc.ids(PROMPTS)
    slots = enc.content_slots(ids)
    assert slots[1] == []
    assert slots[0] == list(range(1, 1 + len(enc.tokenizer.tokenize(PROMPTS[0]))))
    assert enc.decode(ids[0]) == "a photo of a knife"
    # round trip of a decoded content sequence
    content = ids[0, slots[0]]
    assert torch.equal(enc.ids([enc.decode(content)])[0], ids[0])


def test_allowed_tokens_bans_special_tokens_and_every_piece_of_banned_words(model):
    enc = token_encoder_for(model)
    banned = ["knife", "flame", "gun", "skull", "Kalashnikov"]
    allowed = enc.allowed_tokens(banned)
    assert allowed.shape == (enc.vocab_size,) and allowed.dtype == torch.bool
    assert not allowed[enc.special_ids()].any()
    assert not allowed[[enc.bos_id, enc.eos_id, enc.pad_id]].any()
    texts = enc.token_texts()
    for word in banned:
        for form in (word, word.lower(), " " + word, word + "s", "hand" + word):
            pieces = enc.tokenizer(form, add_special_tokens=False).input_ids
            assert pieces
            # every piece of the word itself is banned; longer forms are banned where a piece
            # contains the whole word
            for p in pieces:
                if form.strip().lower() == word.lower() or word.lower() in texts[p]:
                    assert not allowed[p], (word, form, enc.tokenizer.convert_ids_to_tokens(p))
    knives = enc.tokenizer("knives", add_special_tokens=False).input_ids
    assert not allowed[knives].all()  # the plural's pieces are banned with the word
    keep = enc.tokenizer("a photo of a red ring", add_special_tokens=False).input_ids
    assert allowed[keep].all()
    placeholders = sum(
        t.startswith("[unused")
        for t in enc.tokenizer.convert_ids_to_tokens(list(range(enc.vocab_size)))
    )
    assert enc.allowed_tokens([]).sum() == enc.vocab_size - len(enc.special_ids()) - placeholders


def test_contains_banned_whole_words_and_inflections():
    assert contains_banned("A Knife, sharp", ["knife"])
    assert contains_banned("two KNIVES", ["knife"]) and contains_banned("a flame", ["flames"])
    assert not contains_banned("knifelike", ["knife"])
    assert not contains_banned("anything", ["", " "])


def test_bad_inputs(model):
    enc = token_encoder_for(model)
    with pytest.raises(SafediffError, match="single string"):
        enc.ids("a prompt")
    with pytest.raises(SafediffError, match="ids must be"):
        enc.states(torch.zeros(1, 3, dtype=torch.long))
    ids = enc.ids(["x"])
    with pytest.raises(SafediffError, match="embeds must be"):
        enc.states_from_embeds(torch.zeros(1, enc.max_length, 3), ids)
    with pytest.raises(SafediffError, match="1-D"):
        enc.decode(ids)


def test_model_without_text_encoder_is_refused():
    import dataclasses

    m = _load("tiny-sd")
    bare = dataclasses.replace(m, components={"unet": m.unet})
    with pytest.raises(SafediffError, match="no text encoder"):
        token_encoder_for(bare)


def test_swapped_encoder_is_the_one_attacked(model):
    from safediff.defenses.text_encoder_adapter import adapter_for_model

    clone = adapter_for_model(model).clone()
    with torch.no_grad():
        for p in clone.module.parameters():
            p.add_(0.01 * torch.randn_like(p))
    swapped = clone.swap_into(model)
    enc = token_encoder_for(swapped)
    assert enc.module is not token_encoder_for(model).module
    with torch.no_grad():
        torch.testing.assert_close(
            enc.states(enc.ids(PROMPTS)), swapped.encode_text(PROMPTS, "cpu")
        )


def test_wordpiece_placeholders_and_leading_pieces():
    enc = token_encoder_for(_load("sandbox"))
    unused = enc.tokenizer.convert_tokens_to_ids(["[unused1]", "[unused99]"])
    assert not enc.allowed_tokens([])[unused].any()
    piece = enc.tokenizer.convert_tokens_to_ids(["##ing", "cat"])
    assert enc.decode(torch.tensor(piece)) == "ing cat"


def test_sdxl_is_refused():
    import dataclasses

    m = _load("tiny-sd")
    two = dataclasses.replace(m, components={**m.components, "text_encoder_2": m.unet})
    with pytest.raises(SafediffError, match="SDXL"):
        token_encoder_for(two)
