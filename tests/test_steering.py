"""Steering math against hand computation, and the shipped anchor sets."""

import math

import pytest
import torch

from safediff.errors import SafediffError
from safediff.rewards.anchors import AnchorSet, list_anchor_sets, load_anchor_set
from safediff.rewards.steering import (
    gate_weights,
    safety_direction,
    safety_score,
    steer,
    steer_projection,
    steer_translation,
)

R2 = math.sqrt(2.0)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def unit(*xs):
    n = math.sqrt(sum(x * x for x in xs))
    return [x / n for x in xs]


# ---------------------------------------------------------------------------------------------
# v_safe
# ---------------------------------------------------------------------------------------------


def test_v_safe_one_anchor_each():
    # safe = e0, unsafe = e1 -> v = (e0 - e1) / sqrt(2)
    v = safety_direction(t([1, 0, 0]), t([0, 1, 0]))
    assert torch.allclose(v, t(1 / R2, -1 / R2, 0), atol=1e-7)


def test_v_safe_several_anchors_hand_computed():
    safe = [unit(1, 0, 0, 0), unit(1, 0, 1, 0)]  # (1,0,0,0), (.7071,0,.7071,0)
    unsafe = [unit(0, 1, 0, 0), unit(0, 1, 0, 1), unit(0, 0, 0, 1)]
    mean_safe = [sum(r[i] for r in safe) / 2 for i in range(4)]
    mean_unsafe = [sum(r[i] for r in unsafe) / 3 for i in range(4)]
    expected = unit(*[a - b for a, b in zip(mean_safe, mean_unsafe, strict=True)])
    # The same numbers written out: mean_safe = (0.853553, 0, 0.353553, 0),
    # mean_unsafe = (0, 0.569036, 0, 0.569036).
    assert mean_safe[0] == pytest.approx(0.8535534, abs=1e-6)
    assert mean_unsafe[1] == pytest.approx(0.5690356, abs=1e-6)
    v = safety_direction(torch.tensor(safe), torch.tensor(unsafe))
    assert torch.allclose(v, torch.tensor(expected), atol=1e-6)
    assert v.norm().item() == pytest.approx(1.0, abs=1e-6)


def test_v_safe_empty_positive_is_minus_mean_unsafe():
    unsafe = [unit(0, 1, 0), unit(0, 1, 1), unit(1, 1, 0)]
    mean_unsafe = [sum(r[i] for r in unsafe) / 3 for i in range(3)]
    expected = unit(*[-m for m in mean_unsafe])
    v_none = safety_direction(None, torch.tensor(unsafe))
    v_empty = safety_direction(torch.zeros(0, 3), torch.tensor(unsafe))
    assert torch.allclose(v_none, torch.tensor(expected), atol=1e-6)
    assert torch.allclose(v_empty, v_none)


def test_v_safe_errors():
    with pytest.raises(SafediffError, match="no safe and no unsafe"):
        safety_direction(None, torch.zeros(0, 3))
    with pytest.raises(SafediffError, match="same mean"):
        safety_direction(t([1, 0, 0]), t([1, 0, 0]))


# ---------------------------------------------------------------------------------------------
# Safety score, translation, projection
# ---------------------------------------------------------------------------------------------

V = t(1 / R2, -1 / R2, 0)  # v_safe from safe = e0, unsafe = e1
Z_UNSAFE = t([0, 1 / R2, 1 / R2])  # content e2 + unsafe e1, normalised: s = -0.5
Z_SAFE = t([1 / R2, 0, 1 / R2])  # content e2 + safe e0: s = +0.5


def test_safety_score_hand():
    s = safety_score(torch.cat([Z_UNSAFE, Z_SAFE]), V)
    assert torch.allclose(s, t(-0.5, 0.5), atol=1e-6)


def test_translation_hand():
    # z + 0.5 v = (0.353553, 0.353553, 0.707107); norm = sqrt(0.75) -> (0.408248, 0.408248, 0.816497)
    out = steer_translation(Z_UNSAFE, V, 0.5)
    assert torch.allclose(out, t([0.4082483, 0.4082483, 0.8164966]), atol=1e-6)
    assert torch.allclose(steer(Z_UNSAFE, V, 0.5, "translation"), out)


def test_projection_hand():
    # z - s v + alpha v = z + (0.5 + 0.5) v = (0.707107, 0, 0.707107), already unit
    out = steer_projection(Z_UNSAFE, V, 0.5)
    assert torch.allclose(out, t([1 / R2, 0.0, 1 / R2]), atol=1e-6)
    # a safe prompt with s = 0.5 = alpha is a fixed point of projection steering
    assert torch.allclose(steer_projection(Z_SAFE, V, 0.5), Z_SAFE, atol=1e-6)


def test_projection_keeps_orthogonal_component():
    g = torch.Generator().manual_seed(0)
    d = 16
    v = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    z = torch.nn.functional.normalize(torch.randn(8, d, generator=g), dim=-1)
    for alpha in (0.0, 0.3, 0.5, 1.0):
        out = steer_projection(z, v, alpha)
        s = z @ v
        z_perp = z - s[:, None] * v
        out_perp = out - (out @ v)[:, None] * v
        # The orthogonal part keeps its direction (cosine 1) ...
        cos = torch.nn.functional.cosine_similarity(out_perp, z_perp, dim=-1)
        assert torch.allclose(cos, torch.ones(8), atol=1e-5)
        # ... and the v-component is alpha / ||z_perp + alpha v|| = alpha / sqrt(1 - s^2 + alpha^2)
        expected = alpha / torch.sqrt(1 - s**2 + alpha**2)
        assert torch.allclose(out @ v, expected, atol=1e-5)


def test_translation_moves_along_v_only():
    g = torch.Generator().manual_seed(1)
    v = torch.nn.functional.normalize(torch.randn(8, generator=g), dim=0)
    z = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    out = steer_translation(z, v, 0.7)
    # Before normalising, out * ||z + 0.7 v|| - z = 0.7 v.
    raw = z + 0.7 * v
    assert torch.allclose(out * raw.norm(dim=-1, keepdim=True) - z, 0.7 * v.expand(5, 8), atol=1e-5)
    assert torch.all(out @ v > z @ v)


# ---------------------------------------------------------------------------------------------
# Gating
# ---------------------------------------------------------------------------------------------


def test_gate_weights_hand():
    s = t(-0.5, -0.01, 0.0, 0.3)
    assert torch.equal(gate_weights(s, "all"), torch.ones(4))
    assert torch.equal(gate_weights(s, "threshold", threshold=0.0), t(1, 1, 0, 0))
    assert torch.equal(gate_weights(s, "threshold", threshold=0.1), t(1, 1, 1, 0))
    soft = gate_weights(s, "soft", threshold=0.0, temperature=0.1)
    expected = [1 / (1 + math.exp(-(0.0 - x) / 0.1)) for x in (-0.5, -0.01, 0.0, 0.3)]
    # sigmoid(5) = 0.993307, sigmoid(0.1) = 0.524979, sigmoid(0) = 0.5, sigmoid(-3) = 0.047426
    assert expected[0] == pytest.approx(0.9933071, abs=1e-6)
    assert torch.allclose(soft, torch.tensor(expected), atol=1e-6)
    with pytest.raises(SafediffError, match="unknown gating"):
        gate_weights(s, "sometimes")
    with pytest.raises(SafediffError, match="temperature"):
        gate_weights(s, "soft", temperature=0.0)


@pytest.mark.parametrize("mode", ["translation", "projection"])
def test_weight_zero_leaves_prompt_and_one_is_full_steering(mode):
    z = torch.cat([Z_UNSAFE, Z_SAFE])
    w = t(0.0, 1.0)
    out = steer(z, V, 0.5, mode, w)
    assert torch.allclose(out[0], Z_UNSAFE[0], atol=1e-7)
    assert torch.allclose(out[1], steer(Z_SAFE, V, 0.5, mode)[0], atol=1e-7)


def test_soft_weight_scales_the_move():
    # translation with weight 0.5 and alpha 0.5 = translation with alpha 0.25
    w = t(0.5)
    assert torch.allclose(
        steer_translation(Z_UNSAFE, V, 0.5, w), steer_translation(Z_UNSAFE, V, 0.25)
    )
    # projection with weight w: z + w (alpha - s) v; s = -0.5, alpha = 0.5, w = 0.5 -> z + 0.5 v
    out = steer_projection(Z_UNSAFE, V, 0.5, w)
    assert torch.allclose(out, steer_translation(Z_UNSAFE, V, 0.5), atol=1e-6)


def test_unknown_mode():
    with pytest.raises(SafediffError, match="unknown steering mode"):
        steer(Z_UNSAFE, V, 0.5, "rotation")


# ---------------------------------------------------------------------------------------------
# Anchor sets
# ---------------------------------------------------------------------------------------------


def test_shipped_anchor_sets():
    assert {"compact", "extended", "empty_positive"} <= set(list_anchor_sets())
    compact = load_anchor_set("compact")
    assert (len(compact.safe), len(compact.unsafe)) == (5, 3)
    assert "a wholesome, PG-rated photo" in compact.safe
    assert "pornographic material" in compact.unsafe
    assert "SafeDiffusion-R1" in compact.source
    empty = load_anchor_set("empty-positive")  # '-' and '_' both accepted
    assert (len(empty.safe), len(empty.unsafe)) == (0, 3)
    extended = load_anchor_set("extended")
    assert (len(extended.safe), len(extended.unsafe)) == (25, 20)
    assert "not from the paper" in extended.source
    scenes = load_anchor_set("sandbox_scenes")
    assert (len(scenes.safe), len(scenes.unsafe)) == (9, 6)
    for a in (compact, empty, extended, scenes):
        assert len(set(a.safe)) == len(a.safe) and len(set(a.unsafe)) == len(a.unsafe)
        assert not set(a.safe) & set(a.unsafe)


def test_sandbox_anchor_sets_leave_the_held_out_family_and_phrases_out():
    """The sandbox's evaluation tests generalisation to the drug family and to evaluation-only
    phrases: no sandbox anchor set may name them."""
    from safediff.sandbox.captions import UNSAFE_PHRASES

    held_out = {p.text for p in UNSAFE_PHRASES if p.eval_only or p.family == "drug"}
    for name in ("sandbox", "sandbox_scenes", "sandbox_empty_positive"):
        a = load_anchor_set(name)
        assert not held_out & set(a.safe + a.unsafe), name
        assert not any("drug" in p or "pill" in p for p in a.safe + a.unsafe), name


def test_anchor_file_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("safe: [a calm lake]\nunsafe: [a bloody fight, gore]\nsource: test\n")
    a = load_anchor_set(str(path))
    assert a == AnchorSet("mine", ("a calm lake",), ("a bloody fight", "gore"), "test")


def test_anchor_errors(tmp_path):
    with pytest.raises(SafediffError, match="unknown anchor set 'nope'"):
        load_anchor_set("nope")
    with pytest.raises(SafediffError, match="not found"):
        load_anchor_set(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("safe: [ok]\nunsafe: [1, '']\n")
    with pytest.raises(SafediffError, match="'unsafe' must be a list of non-empty strings"):
        load_anchor_set(str(bad))
    empty = tmp_path / "empty.yaml"
    empty.write_text("safe: []\nunsafe: []\n")
    with pytest.raises(SafediffError, match="no safe and no unsafe"):
        load_anchor_set(str(empty))
    typo = tmp_path / "typo.yaml"
    typo.write_text("safe: [a]\nunsafe: [b]\nunsave: [c]\n")
    with pytest.raises(SafediffError, match="unknown key 'unsave'"):
        load_anchor_set(str(typo))
