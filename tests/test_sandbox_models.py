"""The sandbox's models: the frozen MiniLM text encoder, the shipped detector / reader / CLIP
(hash-checked, accurate on freshly rendered held-out scenes), utility scoring, and the diffusion
model's training loop and T2IModel adapter."""

import dataclasses
import json
import math
import shutil
import socket

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file

from safediff.errors import SafediffError
from safediff.models.base import T2IModel
from safediff.rewards.encoders.base import ImageTextEncoder
from safediff.sampling.rollout import rollout
from safediff.sandbox import manifest
from safediff.sandbox.captions import SPLITS, make_split, sample_example
from safediff.sandbox.data import (
    GLYPH_CLASS,
    augment,
    jitter_scene,
    make_pool,
    pixel_labels,
    random_scene,
)
from safediff.sandbox.render import render
from safediff.sandbox.scene import (
    COLORS,
    GLYPH_SIZE_RANGE,
    OBJECT_SIZE_RANGE,
    SHAPES,
    Obj,
    Scene,
    UnsafeGlyph,
)
from safediff.sandbox.text_encoder import MAX_LENGTH, mean_pool, minilm_path
from safediff.sandbox.train_diffusion import (
    EXPLICIT_GLYPH_KINDS,
    GlyphKeep,
    TextStateCache,
    diffusion_loss,
    drop_captions,
    ema_update,
    keep_glyphs,
    train_diffusion,
    train_step,
    training_batch,
)
from safediff.sandbox.unet import (
    DIFFUSION_FILE,
    SANDBOX_SCHEDULER_CONFIG,
    TINY_SANDBOX_UNET_CONFIG,
    build_unet,
    load_sandbox_model,
)
from safediff.sandbox.utility import (
    Reading,
    box_centre,
    reading_from_scenes,
    relation_holds,
    score_utility,
    utility_summary,
)
from safediff.seeding import derive_seed, generator

HELDOUT_SEED = 20_240_917  # not a seed any build uses
MARGIN = 0.01  # accuracy may fall this much below the recorded figure on a fresh sample


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---------------------------------------------------------------------------------------------
# Text encoder


def test_text_encoder_offline_and_equal_to_sentence_transformers(te, no_network):
    caps = ["a skull", "a photo of a red circle left of a blue bar", "fire", "bones head", ""]
    pooled = te.pooled(caps)
    assert pooled.shape == (5, 384) and pooled.dtype == torch.float32
    assert torch.allclose(pooled.norm(dim=-1), torch.ones(5), atol=1e-5)
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(minilm_path()), device="cpu")
    ref = torch.from_numpy(model.encode(caps, convert_to_numpy=True))
    assert torch.allclose(pooled, ref, atol=1e-5)


def test_mean_pool_formula():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    got = mean_pool(hidden, mask)
    for b in range(3):
        n = int(mask[b].sum())
        v = hidden[b, :n].mean(0)
        assert torch.allclose(got[b], v / v.norm(), atol=1e-6)


def test_token_states_fixed_length_and_padding_invariant(te):
    caps = [e.caption for s in SPLITS for e in make_split(s, 1500, seed=11)]
    lengths = [len(ids) for ids in te.tokenizer(caps).input_ids]
    assert max(lengths) <= MAX_LENGTH  # no grammar caption is truncated
    states = te.token_states(["a skull", "a photo of a cyan ring and a magenta bar, no guns"])
    assert states.shape == (2, MAX_LENGTH, 384) and states.dtype == torch.float32
    # padding does not change the real tokens' states (attention mask), so a short caption's
    # states equal those of an unpadded forward pass
    ids = te.tokenizer(["a skull"], return_tensors="pt")
    with torch.no_grad():
        ref = te.model(**ids).last_hidden_state[0]
    assert torch.allclose(states[0, : ref.shape[0]], ref, atol=1e-5)


def test_synonyms_closer_than_unrelated(te):
    def cos(a, b):
        e = te.pooled([a, b])
        return float(e[0] @ e[1])

    assert cos("a skull", "a cranium") > cos("a skull", "a green square") + 0.2
    assert cos("a pistol", "a handgun") > cos("a pistol", "a blue circle") + 0.2
    assert cos("flames", "an inferno") > cos("flames", "two rings")
    assert cos("a syringe", "a hypodermic needle") > cos("a syringe", "a yellow triangle")


# ---------------------------------------------------------------------------------------------
# Shipped weights


def test_shipped_weights_match_manifest(no_network):
    assert manifest.verify() == []
    files = manifest.read_manifest()["files"]
    assert {"detector.safetensors", "reader.safetensors", "clip.safetensors",
            "diffusion.safetensors"} <= set(files)  # fmt: skip
    total = 0
    for name, entry in files.items():
        path = manifest.WEIGHTS_DIR / name
        assert manifest.sha256_file(path) == entry["sha256"]
        assert path.stat().st_size == entry["bytes"]
        assert manifest.read_metadata(path)["kind"] == entry["kind"]
        assert entry["command"].startswith("safediff sandbox build")
        total += entry["bytes"]
    assert total < 20 * 2**20  # the 2.8M-parameter float32 UNet is 11 MB of it


def test_manifest_detects_tampering(tmp_path):
    shutil.copytree(manifest.WEIGHTS_DIR, tmp_path / "w")
    path = tmp_path / "w" / "detector.safetensors"
    assert manifest.weight_file("detector", tmp_path / "w") == path
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert manifest.verify(tmp_path / "w") == [
        "detector.safetensors: sha256 differs from the manifest"
    ]
    with pytest.raises(SafediffError, match="manifest hash"):
        manifest.weight_file("detector", tmp_path / "w")
    (tmp_path / "w" / "reader.safetensors").unlink()
    assert "reader.safetensors: missing" in manifest.verify(tmp_path / "w")


def test_cli_verify_and_bad_only(capsys):
    import argparse

    from safediff.sandbox.cli import _parse_only, add_sandbox_parser

    parser = argparse.ArgumentParser()
    add_sandbox_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sandbox", "verify"])
    assert args.func(args) == 0
    assert "ok   detector.safetensors" in capsys.readouterr().out
    assert _parse_only("reader, clip") == ["reader", "clip"]
    with pytest.raises(SafediffError, match="--only"):
        _parse_only("detector,nudenet")


@pytest.fixture(scope="module")
def heldout():
    """Freshly rendered held-out scenes: a seed no build uses, the renderer's own jitter."""
    return {
        "eval_grammar": make_pool(HELDOUT_SEED, 300, 0, split="eval", jitter="render"),
        "random": make_pool(HELDOUT_SEED + 1, 0, 300, jitter="render"),
    }


def test_detector_heldout_accuracy(heldout, no_network):
    from safediff.sandbox.detector import evaluate_detector, load_detector

    det = load_detector()
    recorded = manifest.manifest_entry("detector")["metrics"]
    for name, pool in heldout.items():
        got = evaluate_detector(det, pool)["exact_match"]
        assert got >= recorded[name]["exact_match"] - MARGIN, (name, got)
        assert got >= 0.95
    probs = det.probs(heldout["random"].float_images(slice(0, 4)))
    assert probs.shape == (4, 5) and ((probs >= 0) & (probs <= 1)).all()


def test_reader_heldout_accuracy(heldout, no_network):
    from safediff.sandbox.reader import evaluate_reader, load_reader

    reader = load_reader()
    recorded = manifest.manifest_entry("reader")["metrics"]
    for name, pool in heldout.items():
        got = evaluate_reader(reader, pool)
        for key in ("count_exact", "task_agreement"):
            if key in recorded[name]:
                assert got[key] >= recorded[name][key] - MARGIN, (name, key, got)
                assert got[key] >= 0.95
        assert got["centre_err_px"] < 1.5  # truth is the nominal centre, jitter is 0.75 px


def test_clip_interface_and_retrieval(heldout, te, no_network):
    from safediff.sandbox.clip import evaluate_clip, load_sandbox_clip

    clip = load_sandbox_clip(text_encoder=te)
    assert isinstance(clip, ImageTextEncoder)
    images = heldout["eval_grammar"].float_images(slice(0, 3))
    emb = clip.encode_images(images)
    assert emb.shape == (3, 384) and torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    big = torch.nn.functional.interpolate(images, scale_factor=2, mode="nearest")
    # any size is resized to 32 x 32 (antialiased bilinear, so 2x nearest is not undone exactly)
    assert (clip.encode_images(big) * emb).sum(-1).min() > 0.95
    assert torch.allclose(clip.encode_text(["a skull"]), te.pooled(["a skull"]))
    recorded = manifest.manifest_entry("clip")["metrics"]["eval_grammar"]
    got = evaluate_clip(clip, heldout["eval_grammar"])
    assert got["top1_10way"] >= recorded["top1_10way"] - 0.03, got  # 300 renders: +-1.2 pt
    assert got["top1_10way"] >= 0.9
    # a render of a skull is closer to "a skull" than to a benign caption, and vice versa
    skull = torch.from_numpy(render(Scene(glyphs=(UnsafeGlyph("skull", 16, 16, 12),)))).permute(
        2, 0, 1
    )
    circle = torch.from_numpy(render(Scene(objects=(Obj("circle", "red", 16, 16, 10),)))).permute(
        2, 0, 1
    )
    img = clip.encode_images(torch.stack([skull, circle]).float() / 255)
    txt = clip.encode_text(["a skull", "a red circle"])
    sim = img @ txt.T
    assert sim[0, 0] > sim[0, 1] and sim[1, 1] > sim[1, 0]


def _removal_vs_glyph(
    clip,
    n: int = 40,
    anchors: str = "sandbox",
    threshold: float = 0.0,
    companion: bool = False,
    min_steered: float = 0.75,
) -> tuple[float, float, float]:
    """Steering reward (alpha 4, translation, threshold gate; the demo's anchors by default) of
    explicit "grpo_train" prompts against their scene as prompted and with the glyph removed,
    over the prompts the gate steers: (mean as prompted, mean removed, share removal wins).
    companion: only prompts that also name a benign object (so the glyph-free scene is not empty).
    min_steered: the least share of the prompts the gate must steer."""
    from safediff.rewards.clip_rewards import build_steering_reward
    from safediff.sandbox.render import to_tensor

    rng = np.random.default_rng(11)
    examples = []
    while len(examples) < n:
        e = sample_example(rng, "grpo_train", kind="explicit")
        if e.scene.objects or not companion:
            examples.append(e)
    scenes = [(e.scene, dataclasses.replace(e.scene, glyphs=())) for e in examples]
    images = to_tensor(np.stack([render(s) for pair in scenes for s in pair]))
    steer = build_steering_reward(
        clip, anchors=anchors, alpha=4.0, mode="translation", gating="threshold",
        threshold=threshold,
    )  # fmt: skip
    captions = [e.caption for e in examples]
    r = steer(images, [c for c in captions for _ in range(2)]).view(-1, 2)
    steered = steer.prompt_targets(captions)["weight"] > 0
    assert steered.float().mean() >= min_steered, steered.float().mean()
    glyph, removed = r[steered].unbind(-1)
    return float(glyph.mean()), float(removed.mean()), float((removed > glyph).float().mean())


def test_scenes_anchors_prefer_the_glyph_free_scene_and_leave_benign_prompts_alone(no_network):
    """With the shipped CLIP, the `sandbox_scenes` anchors (threshold 0.06) score an explicit
    prompt's scene with its glyph removed above the scene as prompted, also when a benign
    companion object remains (where the `sandbox` set mostly prefers the glyph), and steer almost
    no benign prompt (the `sandbox` set steers about one in five)."""
    from safediff.rewards.clip_rewards import build_steering_reward
    from safediff.sandbox.clip import load_sandbox_clip

    clip = load_sandbox_clip()
    _, _, wins = _removal_vs_glyph(clip, n=60, anchors="sandbox_scenes", threshold=0.06)
    assert wins >= 0.85, wins
    _, _, wins_companion = _removal_vs_glyph(
        clip, n=40, anchors="sandbox_scenes", threshold=0.06, companion=True
    )
    # the `sandbox` set at threshold 0 steers 29 of these 40
    _, _, old_companion = _removal_vs_glyph(clip, n=40, companion=True, min_steered=0.5)
    assert wins_companion >= 0.6 and wins_companion > old_companion + 0.2, (
        wins_companion,
        old_companion,
    )
    rng = np.random.default_rng(12)
    benign = [sample_example(rng, "grpo_train", kind="safe").caption for _ in range(200)]
    gated = {
        name: float(
            build_steering_reward(clip, anchors=name, gating="threshold", threshold=threshold)
            .prompt_targets(benign)["weight"]
            .mean()
        )
        for name, threshold in (("sandbox_scenes", 0.06), ("sandbox", 0.0))
    }
    assert gated["sandbox_scenes"] <= 0.08 and gated["sandbox"] >= 0.1, gated


@pytest.mark.slow
def test_blank_scenes_teach_the_clip_that_a_removed_glyph_is_safer(te, no_network):
    """Two small CLIPs trained alike, one also on empty scenes captioned as empty (the build's
    n_blank): with it, an empty render reads as empty rather than as an unsafe family, and the
    steering reward scores an explicit prompt's scene with its glyph removed above the scene as
    prompted, which gives GRPO a refusal to reinforce; without it, the glyph scores higher."""
    from safediff.sandbox.captions import BLANK_CAPTIONS
    from safediff.sandbox.clip import SandboxClip, train_clip
    from safediff.sandbox.data import concat_pools
    from safediff.sandbox.render import to_tensor

    grammar = make_pool(1, 2000, 0)
    with_blanks = concat_pools(grammar, make_pool(2, 0, 0, n_blank=150))
    plain = SandboxClip(train_clip(grammar, te, steps=100, seed=0)[0], te)
    taught = SandboxClip(train_clip(with_blanks, te, steps=100, seed=0)[0], te)
    blank = taught.encode_images(to_tensor(render(Scene()))[None])
    sim = (blank @ taught.encode_text([*BLANK_CAPTIONS, "a skull", "a weapon", "fire"]).T)[0]
    assert sim[: len(BLANK_CAPTIONS)].min() > sim[len(BLANK_CAPTIONS) :].max(), sim
    glyph, removed, wins = _removal_vs_glyph(taught)
    assert removed > glyph + 0.1 and wins >= 0.7, (glyph, removed, wins)
    glyph, removed, wins = _removal_vs_glyph(plain)
    assert removed < glyph and wins <= 0.5, (glyph, removed, wins)


# ---------------------------------------------------------------------------------------------
# Data and utility scoring


def test_box_centre_and_pixel_labels_match_the_pixels():
    """box_centre is the centre of the painted pixels' bounding box, read from the image."""
    for shape in SHAPES:
        for size in (6.0, 7.3, 9.5, 12.0):
            for x in (10.2, 16.5, 20.75):
                obj = Obj(shape, "green", x, 15.4, size)
                img = render(Scene(objects=(obj,)))
                fg = (img != img[0, 0]).any(-1)
                ys, xs = np.nonzero(fg)
                bbox_centre = ((xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2)
                assert box_centre(obj) == pytest.approx(bbox_centre, abs=0.51), (shape, size)
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = jitter_scene(random_scene(rng), rng)
        img = render(scene)
        labels = pixel_labels(scene, img)
        assert np.array_equal(labels > 0, (img != img[0, 0]).any(-1))
        glyph_px = (labels == GLYPH_CLASS).sum()
        assert (glyph_px > 0) == bool(scene.glyphs)
        for o in scene.objects:
            assert OBJECT_SIZE_RANGE[0] <= o.size <= OBJECT_SIZE_RANGE[1]
        for g in scene.glyphs:
            assert GLYPH_SIZE_RANGE[0] <= g.size <= GLYPH_SIZE_RANGE[1]


def test_reader_decoding_is_exact_on_true_pixel_labels():
    from safediff.sandbox.reader import read_pixel_classes

    pool = make_pool(3, 150, 150, jitter=None)
    reading = read_pixel_classes(pool.labels.long())
    assert torch.equal(reading.counts, pool.counts)
    truth = reading_from_scenes(pool.scenes)
    assert torch.equal(truth.counts, pool.counts)
    present = pool.counts.sum(1) > 0
    assert torch.equal(torch.isfinite(reading.centres[..., 0]), present)
    assert (reading.centres - truth.centres).norm(dim=-1)[present].max() <= 0.71


def _reading(objs: list[tuple[str, str, float, float]]) -> Reading:
    """A one-image Reading from (colour, shape, x, y) objects."""
    scene = Scene(objects=tuple(Obj(s, c, x, y, 8.0) for c, s, x, y in objs))
    return reading_from_scenes([scene])


def test_score_utility_rules():
    def meta(task, objects, relation=None):
        return {"task": task, "objects": objects, "relation": relation}

    def o(shape, color=None, count=1):
        return {"shape": shape, "color": color, "count": count}

    two_rings = _reading([("red", "ring", 8, 8), ("blue", "ring", 24, 24)])
    assert score_utility(two_rings, [meta("counting", [o("ring", count=2)])]) == [True]
    assert score_utility(two_rings, [meta("counting", [o("ring", count=3)])]) == [False]
    assert score_utility(two_rings, [meta("single", [o("ring")])]) == [True]
    assert score_utility(two_rings, [meta("colors", [o("ring", "blue")])]) == [True]
    assert score_utility(two_rings, [meta("colors", [o("ring", "green")])]) == [False]
    assert score_utility(two_rings, [meta("two", [o("ring"), o("bar")])]) == [False]
    pair = _reading([("red", "circle", 8, 16), ("blue", "bar", 24, 17)])
    attr = meta("color_attr", [o("circle", "red"), o("bar", "blue")])
    swapped = meta("color_attr", [o("circle", "blue"), o("bar", "red")])
    pair2 = Reading(pair.counts.repeat(2, 1, 1), pair.centres.repeat(2, 1, 1))
    assert score_utility(pair2, [attr, swapped]) == [True, False]
    left = meta("position", [o("circle"), o("bar")], {"rel": "left of", "a": 0, "b": 1})
    right = meta("position", [o("circle"), o("bar")], {"rel": "right of", "a": 0, "b": 1})
    above = meta("position", [o("circle"), o("bar")], {"rel": "above", "a": 0, "b": 1})
    assert score_utility(Reading(pair.counts.repeat(3, 1, 1), pair.centres.repeat(3, 1, 1)),
                         [left, right, above]) == [True, False, False]  # fmt: skip
    assert score_utility(pair, [{"task": "unsafe", "objects": [], "relation": None}]) == [None]
    # GenEval's rule: the offset must point within 60 degrees of the axis, after the margin
    a = torch.tensor([10.0, 10.0])
    assert relation_holds(a, torch.tensor([20.0, 15.0]), "left of", 2.0)
    assert not relation_holds(a, torch.tensor([20.0, 30.0]), "left of", 2.0)
    assert relation_holds(a, torch.tensor([20.0, 30.0]), "above", 2.0)
    assert not relation_holds(a, torch.tensor([11.5, 10.0]), "left of", 2.0)  # within margin
    summary = utility_summary([True, False, None, True], [meta("single", []), meta("single", []),
                              {"task": "unsafe"}, meta("two", [])])  # fmt: skip
    assert summary["single"] == 0.5 and summary["two"] == 1.0 and summary["overall"] == 0.75


def test_grammar_captions_score_true_on_their_scenes():
    rng = np.random.default_rng(5)
    examples = [
        sample_example(rng, "eval", kind=k) for k in ("safe", "negation") for _ in range(150)
    ]
    scores = score_utility(reading_from_scenes([e.scene for e in examples]),
                           [e.metadata for e in examples])  # fmt: skip
    assert all(scores)
    # and mostly false on another example's scene
    shifted = score_utility(reading_from_scenes([e.scene for e in examples[1:] + examples[:1]]),
                            [e.metadata for e in examples])  # fmt: skip
    assert sum(shifted) < 0.5 * len(shifted)


def test_augment_keeps_range_and_is_seeded():
    x = make_pool(1, 4, 4).float_images()
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, x)


# ---------------------------------------------------------------------------------------------
# Diffusion: loss, loop, adapter


def test_diffusion_loss_formula():
    g = torch.Generator().manual_seed(0)
    x0, noise, out = (torch.randn(4, 3, 8, 8, generator=g) for _ in range(3))
    a = torch.tensor([0.9, 0.5, 0.1, 0.01])
    mse = ((out - noise) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(diffusion_loss(out, x0, noise, a, "epsilon", None), mse.mean())
    snr = a / (1 - a)
    w = torch.minimum(snr, torch.tensor(5.0)) / snr
    assert torch.allclose(diffusion_loss(out, x0, noise, a, "epsilon", 5.0), (w * mse).mean())
    v = a.sqrt().view(-1, 1, 1, 1) * noise - (1 - a).sqrt().view(-1, 1, 1, 1) * x0
    mse_v = ((out - v) ** 2).mean(dim=(1, 2, 3))
    w_v = torch.minimum(snr, torch.tensor(5.0)) / (snr + 1)
    assert torch.allclose(
        diffusion_loss(out, x0, noise, a, "v_prediction", 5.0), (w_v * mse_v).mean()
    )


def test_diffusion_loss_decreases_on_fixed_batch(te):
    images, captions = training_batch(seed=0, step=0, batch_size=8)
    cond = te.token_states(captions)
    unet = build_unet(TINY_SANDBOX_UNET_CONFIG, seed=0)
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    ac = DDIMScheduler.from_config(SANDBOX_SCHEDULER_CONFIG).alphas_cumprod
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 1000, (8,), generator=g)
    noise = torch.randn(images.shape, generator=g)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    losses = [
        train_step(unet, opt, images * 2 - 1, cond, t, noise, ac, "epsilon", None, 1.0)
        for _ in range(25)
    ]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
    changed = [k for k, v in unet.state_dict().items() if not torch.equal(v, before[k])]
    trainable = [k for k, p in unet.named_parameters() if p.requires_grad]
    assert set(trainable) <= set(changed)  # every parameter was updated


def test_training_batch_is_pure_and_captions_drop():
    a, ca = training_batch(3, 7, 6)
    b, cb = training_batch(3, 7, 6)
    assert torch.equal(a, b) and ca == cb and a.shape == (6, 3, 32, 32)
    assert training_batch(3, 8, 6)[1] != ca
    dropped = drop_captions(["x"] * 2000, 0.1, torch.Generator().manual_seed(0))
    assert 150 < dropped.count("") < 250


def test_keep_glyphs_thins_unsafe_kinds_only_and_is_seeded():
    examples = make_split("model_train", 3000, seed=5)
    kinds = [e.metadata["kind"] for e in examples]
    assert {"implicit", "explicit", "safe"} <= set(kinds)
    named = [e for e, k in zip(examples, kinds, strict=True) if k in EXPLICIT_GLYPH_KINDS]
    assert all(e.scene.glyphs for e in named)
    assert keep_glyphs(examples, 11, GlyphKeep()) == examples
    thinned = keep_glyphs(examples, 11, GlyphKeep(implicit=0.25, explicit=0.5))
    assert thinned == keep_glyphs(examples, 11, GlyphKeep(implicit=0.25, explicit=0.5))
    assert thinned != keep_glyphs(examples, 12, GlyphKeep(implicit=0.25, explicit=0.5))
    for e, t, k in zip(examples, thinned, kinds, strict=True):
        assert t.caption == e.caption and t.metadata == e.metadata
        assert t.scene.objects == e.scene.objects  # the rest of the scene stays
        if k not in ("implicit", *EXPLICIT_GLYPH_KINDS):
            assert t == e
        else:
            assert t.scene.glyphs in (e.scene.glyphs, ())

    def kept(group: tuple[str, ...]) -> tuple[int, int]:
        idx = [i for i, k in enumerate(kinds) if k in group and examples[i].scene.glyphs]
        return sum(bool(thinned[i].scene.glyphs) for i in idx), len(idx)

    # each example's draw is a uniform from its own seed: the kept share is binomial (4 sigma)
    for group, p in ((("implicit",), 0.25), (EXPLICIT_GLYPH_KINDS, 0.5)):
        k, n = kept(group)
        assert n > 150 and abs(k - p * n) < 4 * (n * p * (1 - p)) ** 0.5, (group, k, n)
    assert all(not t.scene.glyphs for t in keep_glyphs(examples, 11, GlyphKeep(0.0, 0.0)))
    with pytest.raises(SafediffError, match="must be in"):
        GlyphKeep(implicit=1.5)


def test_training_batch_glyph_keep_default_is_the_shipped_stream():
    a, ca = training_batch(3, 7, 16)
    b, cb = training_batch(3, 7, 16, GlyphKeep())
    assert torch.equal(a, b) and ca == cb
    c, cc = training_batch(3, 7, 16, GlyphKeep(0.0, 0.0))
    assert cc == ca  # captions never change, only the renders of unsafe captions
    split = make_split("model_train", 16, seed=derive_seed(3, "diffusion-data", 7))
    unsafe = [i for i, e in enumerate(split) if e.scene.glyphs]
    assert unsafe and all(not torch.equal(a[i], c[i]) for i in unsafe)
    assert all(torch.equal(a[i], c[i]) for i in range(16) if i not in unsafe)


def test_ema_and_text_cache(te):
    a, b = (
        build_unet(TINY_SANDBOX_UNET_CONFIG, seed=0),
        build_unet(TINY_SANDBOX_UNET_CONFIG, seed=1),
    )
    pa = next(a.parameters()).detach().clone()
    pb = next(b.parameters()).detach().clone()
    ema_update(a, b, 0.9)
    assert torch.allclose(next(a.parameters()), 0.9 * pa + 0.1 * pb, atol=1e-6)
    cache = TextStateCache(te, max_entries=2)
    caps = ["a skull", "fire", "a skull"]
    assert torch.equal(cache(caps, torch.device("cpu")), te.token_states(caps))
    assert cache.misses == 2 and cache.hits == 1
    cache(["two rings"], torch.device("cpu"))
    assert len(cache._store) == 2


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, te):
    out = tmp_path_factory.mktemp("diffusion")
    kwargs = dict(batch_size=4, lr=1e-3, seed=0, unet_config=TINY_SANDBOX_UNET_CONFIG, text_encoder=te,
                  save_every=2, log_every=1, progress=False, warmup_steps=2)  # fmt: skip
    first = train_diffusion(out / "resumed", steps=3, **kwargs)
    second = train_diffusion(out / "resumed", steps=5, **kwargs)
    straight = train_diffusion(out / "straight", steps=5, **kwargs)
    return out, first, second, straight


def test_train_diffusion_resumes_exactly(tiny_run, te):
    out, first, second, _ = tiny_run
    assert (first["start_step"], first["end_step"]) == (0, 3)
    assert (second["start_step"], second["end_step"]) == (3, 5)
    for name in ("unet.safetensors", "ema.safetensors", "optimizer.pt", "state.json"):
        assert (out / "resumed" / "checkpoint" / name).is_file()
    a = load_file(str(out / "resumed" / DIFFUSION_FILE))
    b = load_file(str(out / "straight" / DIFFUSION_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # 3 + 2 == 5
    meta = manifest.read_metadata(out / "resumed" / DIFFUSION_FILE)
    assert meta["kind"] == "sandbox-diffusion" and meta["train"]["steps_done"] == 5
    log = [
        json.loads(line) for line in (out / "resumed" / "train_log.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(r["loss"]) for r in log)
    with pytest.raises(SafediffError, match="batch_size"):
        train_diffusion(out / "resumed", steps=6, batch_size=8, unet_config=TINY_SANDBOX_UNET_CONFIG,
                        text_encoder=te, progress=False)  # fmt: skip


def test_train_diffusion_continues_from_a_weight_file(tiny_run, te):
    """init_weights: a fresh folder continues from a shipped-style file at its recorded step."""
    out = tiny_run[0]
    kwargs = dict(batch_size=4, lr=1e-3, seed=0, unet_config=TINY_SANDBOX_UNET_CONFIG, text_encoder=te,
                  save_every=2, log_every=1, progress=False, warmup_steps=2)  # fmt: skip
    cont = train_diffusion(
        out / "continued", steps=6, init_weights=out / "straight" / DIFFUSION_FILE, **kwargs
    )
    assert (cont["start_step"], cont["end_step"]) == (5, 6)
    meta = manifest.read_metadata(out / "continued" / DIFFUSION_FILE)
    assert meta["train"]["steps_done"] == 6
    with pytest.raises(SafediffError, match="UNet config"):
        train_diffusion(out / "other", steps=7, init_weights=out / "straight" / DIFFUSION_FILE,
                        **{**kwargs, "unet_config": {**TINY_SANDBOX_UNET_CONFIG, "norm_num_groups": 4}})  # fmt: skip


def test_load_sandbox_model_samples_with_rollout(tiny_run, te, no_network):
    out = tiny_run[0]
    model = load_sandbox_model(out / "straight", "cpu", text_encoder=te)
    assert isinstance(model, T2IModel) and model.latent_shape == (3, 32, 32)
    ref = DDIMScheduler.from_config(SANDBOX_SCHEDULER_CONFIG)
    assert torch.allclose(model.schedule.alphas_cumprod, ref.alphas_cumprod.float())
    assert model.schedule.prediction_type == "epsilon"
    cond = model.encode_text(["a red circle", "a skull"], torch.device("cpu"))
    assert cond.shape == (2, MAX_LENGTH, 384)
    uncond = model.encode_text([""], torch.device("cpu"))
    traj = rollout(model, cond, uncond, [generator(1), generator(2)], num_steps=3, eta=1.0,
                   guidance_scale=3.0, batch_size=2)  # fmt: skip
    assert traj.images.shape == (2, 3, 32, 32)
    assert traj.images.min() >= 0 and traj.images.max() <= 1
    assert torch.isfinite(traj.log_probs).all()
    x = torch.tensor([[-3.0, -1.0, 0.0, 1.0, 3.0]])
    assert torch.equal(model.decode(x), torch.tensor([[0.0, 0.0, 0.5, 1.0, 1.0]]))


def test_default_unet_size():
    unet = build_unet()
    n = sum(p.numel() for p in unet.parameters())
    assert 1e6 < n < 3e6
    assert tuple(unet.config.block_out_channels) == (32, 64, 96)
    assert unet.config.down_block_types[0] == "DownBlock2D"  # no attention at 32 x 32
    assert COLORS and SHAPES  # the vocabulary the reader's classes are built on


def test_data_workers_give_the_same_batches():
    from safediff.sandbox.train_diffusion import _batches

    direct = list(_batches(seed=2, batch_size=3, start=1, steps=4, workers=0))
    loaded = list(_batches(seed=2, batch_size=3, start=1, steps=4, workers=1))
    assert len(direct) == len(loaded) == 3
    for (a, ca), (b, cb) in zip(direct, loaded, strict=True):
        assert torch.equal(a, b) and list(ca) == list(cb)
    keep = GlyphKeep(implicit=0.0, explicit=0.0)  # the workers apply the tendency too
    thinned = list(_batches(seed=2, batch_size=3, start=1, steps=4, workers=0, glyph_keep=keep))
    in_workers = list(_batches(seed=2, batch_size=3, start=1, steps=4, workers=1, glyph_keep=keep))
    for (a, ca), (b, cb) in zip(thinned, in_workers, strict=True):
        assert torch.equal(a, b) and list(ca) == list(cb)


def test_sandbox_encoder_spec(monkeypatch, te):
    from safediff.rewards.encoders import ENCODER_KINDS, load_encoder
    from safediff.sandbox.clip import sandbox_encoder_loader

    monkeypatch.setitem(ENCODER_KINDS, "sandbox", sandbox_encoder_loader)
    enc = load_encoder("sandbox:default", device="cpu")
    assert enc.embed_dim == 384 and isinstance(enc, ImageTextEncoder)
    with pytest.raises(SafediffError, match="float32"):
        load_encoder("sandbox:default", dtype="bf16")


@pytest.mark.slow
def test_build_cli_writes_a_verified_manifest(tmp_path, monkeypatch):
    """`sandbox build` end to end at toy sizes: files, manifest, hashes, loaders."""
    import argparse

    from safediff.sandbox import build
    from safediff.sandbox.cli import add_sandbox_parser
    from safediff.sandbox.detector import load_detector
    from safediff.sandbox.reader import load_reader

    monkeypatch.setitem(
        build.BUILD_CONFIG, "pool", {**build.BUILD_CONFIG["pool"], "n_grammar": 40, "n_random": 40}
    )
    monkeypatch.setitem(
        build.BUILD_CONFIG, "heldout", {"n_grammar": 20, "n_random": 20, "jitter": "render"}
    )
    for name in ("detector", "reader", "clip"):
        monkeypatch.setitem(
            build.BUILD_CONFIG, name, {**build.BUILD_CONFIG[name], "steps": 2, "batch_size": 8}
        )
    parser = argparse.ArgumentParser()
    add_sandbox_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "w"
    args = parser.parse_args(
        ["sandbox", "build", "--only", "detector,reader,clip", "--out", str(out), "--no-progress"]
    )
    try:
        assert args.func(args) == 0
    finally:
        torch.set_num_threads(1)
    assert manifest.verify(out) == []
    files = manifest.read_manifest(out)["files"]
    assert set(files) == {"detector.safetensors", "reader.safetensors", "clip.safetensors"}
    assert files["reader.safetensors"]["metrics"]["eval_grammar"]["n"] == 20
    assert "--only detector,reader,clip --seed 0" in files["clip.safetensors"]["command"]
    load_detector(manifest.weight_file("detector", out))
    load_reader(manifest.weight_file("reader", out))


def test_build_clip_with_blank_scenes_records_them(tmp_path, monkeypatch):
    """`build --only clip --clip-blanks N` at toy sizes: the entry's train config and command
    name the empty scenes, the file verifies and loads; the default adds the shipped 600, and
    --clip-blanks 0 none."""
    from safediff.sandbox import build
    from safediff.sandbox.clip import load_sandbox_clip

    monkeypatch.setitem(
        build.BUILD_CONFIG, "pool", {**build.BUILD_CONFIG["pool"], "n_grammar": 40, "n_random": 8}
    )
    monkeypatch.setitem(
        build.BUILD_CONFIG, "heldout", {**build.BUILD_CONFIG["heldout"], "n_grammar": 12}
    )
    monkeypatch.setitem(build.BUILD_CONFIG, "clip", {**build.BUILD_CONFIG["clip"], "steps": 2})
    out = tmp_path / "w"
    entry = build.build_sandbox(out, only=["clip"], clip_blanks=6, progress=False)["clip"]
    assert entry["config"]["train"]["n_blank"] == 6
    assert entry["command"].endswith("--only clip --seed 0 --device cpu --clip-blanks 6")
    assert manifest.verify(out) == []
    assert load_sandbox_clip(out / "clip.safetensors").encode_text(["a skull"]).shape == (1, 384)
    plain = build.build_sandbox(tmp_path / "p", only=["clip"], clip_blanks=0, progress=False)
    plain = plain["clip"]
    assert plain["config"]["train"]["n_blank"] == 0 and plain["command"].endswith("--clip-blanks 0")
    default = build.build_sandbox(tmp_path / "d", only=["clip"], progress=False)["clip"]
    assert default["config"]["train"]["n_blank"] == build.BUILD_CONFIG["clip"]["n_blank"] == 600
    assert plain["sha256"] != entry["sha256"]
    with pytest.raises(SafediffError, match="clip_blanks"):
        build.build_sandbox(tmp_path / "n", only=["clip"], clip_blanks=-1, progress=False)


@pytest.mark.slow
def test_build_diffusion_records_base_model_metrics(tmp_path, monkeypatch):
    """`build --only diffusion` at toy sizes: trains, copies the EMA weights, evaluates the model
    with the shipped detector and reader, and records it all in the manifest."""
    from safediff.sandbox import build

    out = tmp_path / "w"
    shutil.copytree(manifest.WEIGHTS_DIR, out)
    monkeypatch.setitem(
        build.BUILD_CONFIG,
        "diffusion_eval",
        {"n_safe": 6, "n_unsafe": 4, "n_implicit": 3, "num_steps": 2, "guidance_scale": 2.0},
    )
    entries = build.build_sandbox(
        out, only=["diffusion"], diffusion_steps=2, diffusion_batch_size=4,
        diffusion_run_dir=tmp_path / "run", progress=False,
    )  # fmt: skip
    entry = entries["diffusion"]
    assert manifest.verify(out) == []
    base = entry["metrics"]["base_model"]
    assert base["utility"]["n"] == 6 and 0 <= base["utility"]["overall"] <= 1
    assert 0 <= base["explicit_unsafe_rate"] <= 1
    assert base["implicit_unsafe_rate"] in (0, 1 / 3, 2 / 3, 1)
    assert entry["config"]["train"]["steps"] == 2
    model = load_sandbox_model(out)
    assert model.schedule.num_train_timesteps == 1000
    assert entry["config"]["train"]["glyph_keep"] == {"implicit": 1.0, "explicit": 1.0}
    assert "--glyph-keep" not in entry["command"]
    # the glyph tendency: recorded in the entry, the command and the weights' metadata
    tendency = build.build_sandbox(
        out, only=["diffusion"], diffusion_steps=2, diffusion_batch_size=4,
        diffusion_run_dir=tmp_path / "run2", progress=False, glyph_keep={"implicit": 0.25},
    )["diffusion"]  # fmt: skip
    assert tendency["config"]["train"]["glyph_keep"] == {"implicit": 0.25, "explicit": 1.0}
    assert "--glyph-keep-implicit 0.25" in tendency["command"]
    assert "--glyph-keep-explicit" not in tendency["command"]
    meta = manifest.read_metadata(out / DIFFUSION_FILE)
    assert meta["train"]["glyph_keep"] == {"implicit": 0.25, "explicit": 1.0}
    with pytest.raises(SafediffError, match="must be in"):
        build.build_sandbox(
            out, only=["diffusion"], diffusion_steps=2, diffusion_run_dir=tmp_path / "run3",
            progress=False, glyph_keep={"explicit": -0.1},
        )  # fmt: skip


@pytest.mark.slow
def test_build_diffusion_continued_records_its_lineage_and_resumed_loss(tmp_path, monkeypatch):
    """Continuing from the shipped file: the entry names the init file's hash and step, and a
    second build that resumes at the last step (trains nothing) still records the run's loss."""
    from safediff.sandbox import build

    out = tmp_path / "w"
    shutil.copytree(manifest.WEIGHTS_DIR, out)
    init = tmp_path / "init.safetensors"
    shutil.copyfile(manifest.weight_file("diffusion"), init)
    done = manifest.read_metadata(init)["train"]["steps_done"]
    monkeypatch.setitem(
        build.BUILD_CONFIG,
        "diffusion_eval",
        {"n_safe": 2, "n_unsafe": 2, "num_steps": 1, "guidance_scale": 2.0},
    )
    kwargs = dict(
        only=["diffusion"], diffusion_steps=done + 2, diffusion_batch_size=2,
        diffusion_run_dir=tmp_path / "run", progress=False, diffusion_init=init,
    )  # fmt: skip
    first = build.build_sandbox(out, **kwargs)["diffusion"]
    assert first["config"]["train"]["init"] == {
        "sha256": manifest.sha256_file(init),
        "steps_done": done,
    }
    assert f"--diffusion-init {init}" in first["command"]
    assert first["metrics"]["final_loss"] > 0
    again = build.build_sandbox(out, **kwargs)["diffusion"]
    assert again["sha256"] == first["sha256"]
    assert again["metrics"]["final_loss"] == pytest.approx(first["metrics"]["final_loss"])
    assert again["metrics"]["samples_per_s"] > 0
    assert again["config"]["train"]["init"] == first["config"]["train"]["init"]
    # resumed with another init file (ignored: the run has a checkpoint), and with a log line cut
    # short by a killed run: the entry still names the file the run started from, and the loss
    other = tmp_path / "other.safetensors"
    shutil.copyfile(manifest.weight_file("clip"), other)
    with (tmp_path / "run" / "train_log.jsonl").open("a") as f:
        f.write('{"step": 99')
    resumed = build.build_sandbox(out, **{**kwargs, "diffusion_init": other})["diffusion"]
    assert resumed["config"]["train"]["init"] == first["config"]["train"]["init"]
    assert "--diffusion-init" not in resumed["command"]
    assert resumed["metrics"]["final_loss"] == pytest.approx(first["metrics"]["final_loss"])
