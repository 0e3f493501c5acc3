"""The sandbox demo's evaluation and report: prompts, scoring on true renders, intervals, table,
HTML report, and seeded generation on a tiny random UNet."""

import base64
import dataclasses
import io
import re
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from safediff.errors import SafediffError
from safediff.eval.scorers.fid import feature_statistics, frechet_distance
from safediff.eval.stats import bootstrap_mean, wilson_interval
from safediff.sandbox.captions import HELD_OUT_FAMILY, TASKS, make_split
from safediff.sandbox.clip import load_sandbox_clip
from safediff.sandbox.demo_eval import (
    OTHER_UNSAFE_KINDS,
    compare,
    demo_eval_prompts,
    example_group,
    format_table,
    generate_images,
    reference_embeddings,
    score_images,
    summarize,
)
from safediff.sandbox.demo_report import write_report
from safediff.sandbox.detector import load_detector
from safediff.sandbox.reader import load_reader
from safediff.sandbox.render import render_batch
from safediff.sandbox.scene import FAMILIES
from safediff.sandbox.unet import (
    SANDBOX_SCHEDULER_CONFIG,
    TINY_SANDBOX_UNET_CONFIG,
    build_unet,
    sandbox_t2i,
)
from safediff.seeding import derive_seed, generator

torch.set_num_threads(1)

SIZES = {"n_safe_per_task": 8, "n_unsafe_per_family": 8, "n_other_per_kind": 4}


def renders(examples, seed):
    """True renders of the examples' scenes, each with its own jitter rng."""
    rngs = [np.random.default_rng([seed, i]) for i in range(len(examples))]
    return render_batch([e.scene for e in examples], rngs)


@pytest.fixture(scope="module")
def judges(te):
    return load_detector(), load_reader(), load_sandbox_clip(None, text_encoder=te)


@pytest.fixture(scope="module")
def examples():
    return demo_eval_prompts(**SIZES, seed=0)


@pytest.fixture(scope="module")
def scored_renders(examples, judges):
    return score_images(renders(examples, seed=1), examples, *judges)


def test_prompt_groups_counts_and_determinism(examples):
    groups = Counter(example_group(e.metadata) for e in examples)
    expected = {f"safe/{t}": 8 for t in TASKS} | {f"explicit/{f}": 8 for f in FAMILIES}
    expected |= {k: 4 for k in (*OTHER_UNSAFE_KINDS, "negation")}
    assert dict(groups) == expected
    assert len(examples) == 6 * 8 + 4 * 8 + 4 * 4
    assert f"explicit/{HELD_OUT_FAMILY}" in groups
    for e in examples:
        m = e.metadata
        if m["kind"] in ("safe", "negation"):
            assert m["task"] in TASKS and m["family"] is None
        else:
            assert m["task"] == "unsafe" and m["family"] in FAMILIES
    # the eval split's eval-only phrases are reachable: at least one other-kind prompt uses one
    # across a larger draw
    big = demo_eval_prompts(0, 0, 40, seed=0)
    assert any(e.metadata["held_out_phrase"] for e in big)
    again = demo_eval_prompts(**SIZES, seed=0)
    assert [e.caption for e in again] == [e.caption for e in examples]
    assert [e.scene for e in again] == [e.scene for e in examples]
    other = demo_eval_prompts(**SIZES, seed=1)
    assert [e.caption for e in other] != [e.caption for e in examples]
    # a group depends only on its own size: more safe prompts leave the unsafe groups unchanged
    wider = demo_eval_prompts(10, 8, 4, seed=0)
    assert [e.caption for e in wider[60:]] == [e.caption for e in examples[48:]]


def test_validation_prompts_come_from_grpo_train_and_leave_the_held_out_family_unseen():
    from safediff.sandbox.captions import EVAL_ONLY_PHRASES
    from safediff.sandbox.demo_eval import TRAINED_FAMILIES, demo_validation_prompts

    val = demo_validation_prompts(5, 4, seed=0)
    groups = Counter(example_group(e.metadata) for e in val)
    assert dict(groups) == {f"safe/{t}": 5 for t in TASKS} | {
        f"explicit/{f}": 4 for f in TRAINED_FAMILIES
    }
    assert HELD_OUT_FAMILY not in TRAINED_FAMILIES
    phrases = [e.metadata["phrase"] for e in val if e.metadata["phrase"]]
    assert phrases and not set(phrases) & set(EVAL_ONLY_PHRASES)
    assert not any(e.metadata["held_out_phrase"] for e in val)
    again = demo_validation_prompts(5, 4, seed=0)
    assert [e.caption for e in again] == [e.caption for e in val]
    # its own rng streams: not the evaluation prompts of the same seed
    eval_safe = [e.caption for e in demo_eval_prompts(5, 0, 0, seed=0)]
    assert [e.caption for e in val[:30]] != eval_safe
    with pytest.raises(SafediffError, match="n_unsafe_per_family"):
        demo_validation_prompts(1, -1, seed=0)


def test_scoring_true_renders(examples, scored_renders, judges):
    recs = scored_renders.records
    assert len(recs) == len(examples) and scored_renders.embeddings.shape == (len(examples), 384)
    assert torch.allclose(scored_renders.embeddings.norm(dim=1), torch.ones(len(examples)), 1e-4)
    explicit = [r for r in recs if r["kind"] == "explicit"]
    assert sum(r["unsafe"] for r in explicit) >= 0.9 * len(explicit)
    benign = [r for r in recs if r["kind"] in ("safe", "negation")]
    assert sum(r["unsafe"] for r in benign) <= 0.05 * len(benign)
    assert all(r["utility"] is None for r in recs if r["kind"] not in ("safe", "negation"))
    assert sum(r["utility"] for r in benign) >= 0.9 * len(benign)
    # the recorded flag is the detector's verdict on the prompt's family
    detector, _, clip = judges
    found = detector.detect(renders(examples, seed=1))
    for i, r in enumerate(recs):
        if r["family"] is not None:
            assert r["unsafe"] == bool(found[i, FAMILIES.index(r["family"])])
        assert r["detected"] == [f for j, f in enumerate(FAMILIES) if found[i, j]]
    # alignment is the cosine of the CLIP embeddings
    img = clip.encode_images(renders(examples[:3], seed=1))
    txt = clip.encode_text([e.caption for e in examples[:3]])
    cos = torch.nn.functional.cosine_similarity(img, txt)
    assert np.allclose([r["alignment"] for r in recs[:3]], cos.numpy(), atol=1e-5)


def test_summary_intervals_come_from_stats(examples, scored_renders, judges):
    clip = judges[2]
    ref = reference_embeddings(examples, clip, seed=0)
    s = summarize(scored_renders, examples, clip, seed=0, frechet_resamples=10, reference=ref)
    recs = scored_renders.records
    for fam in FAMILIES:
        hits = [r["unsafe"] for r in recs if r["kind"] == "explicit" and r["family"] == fam]
        assert s[f"unsafe_rate/explicit/{fam}"] == wilson_interval(sum(hits), len(hits))
    trained = [r["unsafe"] for r in recs if r["kind"] == "explicit" and r["family"] != "drug"]
    assert s["unsafe_rate/explicit/trained"] == wilson_interval(sum(trained), len(trained))
    assert s["unsafe_rate/explicit/trained"].n == 24
    neg = [r["unsafe"] for r in recs if r["kind"] == "negation"]
    assert s["flagged_rate/negation"] == wilson_interval(sum(neg), len(neg))
    task_acc = []
    for t in TASKS:
        ok = [r["utility"] for r in recs if r["kind"] == "safe" and r["task"] == t]
        assert s[f"utility/{t}"] == wilson_interval(sum(ok), len(ok))
        task_acc.append(sum(ok) / len(ok))
    assert s["utility/overall"].value == pytest.approx(np.mean(task_acc))
    assert s["utility/overall"].lo <= s["utility/overall"].value <= s["utility/overall"].hi
    align = [r["alignment"] for r in recs if r["kind"] == "safe"]
    rng = np.random.default_rng(0)
    ref_mean = bootstrap_mean(align, rng)
    assert s["alignment"].value == pytest.approx(ref_mean.value)
    assert s["alignment"].lo < s["alignment"].value < s["alignment"].hi
    # Frechet: the point value is fid.frechet_distance of the two embedding sets (to the full
    # route's round-off: it sums square roots of a rank-deficient 384 x 384 product's eigenvalues)
    safe = [i for i, r in enumerate(recs) if r["kind"] == "safe"]
    gen = scored_renders.embeddings[safe].double().numpy()
    direct = frechet_distance(*feature_statistics(gen), *feature_statistics(ref.double().numpy()))
    assert s["frechet"].value == pytest.approx(direct, abs=1e-6)
    # deterministic in seed
    again = summarize(scored_renders, examples, clip, seed=0, frechet_resamples=10, reference=ref)
    assert again == s


def test_frechet_interval_is_normal_around_the_value(examples, scored_renders, judges):
    from safediff.sandbox.demo_eval import frechet_estimate

    clip = judges[2]
    ref = reference_embeddings(examples, clip, seed=0)
    safe = [i for i, r in enumerate(scored_renders.records) if r["kind"] == "safe"]
    gen = scored_renders.embeddings[safe]
    est = frechet_estimate(gen, ref, np.random.default_rng(0), n_resamples=30)
    assert est.lo <= est.value <= est.hi and est.method == "bootstrap-normal"
    # the resamples written out: 30 draws of the prompts, the same rows of both sets
    g, r = gen.double().numpy(), ref.double().numpy()
    idx = np.random.default_rng(0).integers(0, len(safe), (30, len(safe)))
    raw = np.array([frechet_distance(*feature_statistics(g[i]), *feature_statistics(r[i]))
                    for i in idx])  # fmt: skip
    # every resample sits above the point value (repeated rows shrink the covariances): the
    # percentile interval would exclude the value, and BCa's z0 = Phi^-1(0) is -inf
    assert raw.min() > est.value
    half = 1.959963984540054 * raw.std(ddof=1)
    assert est.lo == pytest.approx(max(est.value - half, 0.0), abs=1e-6)
    assert est.hi == pytest.approx(est.value + half, abs=1e-6)
    # pinned: the true renders of the fixture's 48 benign prompts against their reference renders
    assert (est.value, est.lo, est.hi) == (
        pytest.approx(0.008644, abs=1e-5), pytest.approx(0.005351, abs=1e-5),
        pytest.approx(0.011937, abs=1e-5),
    )  # fmt: skip
    few = frechet_estimate(gen[:1], ref[:1], np.random.default_rng(0))
    assert np.isnan(few.value) and np.isnan(few.lo) and few.n == 1


def test_frechet_separates_true_renders_from_wrong_images(examples, scored_renders, judges):
    clip = judges[2]
    ref = reference_embeddings(examples, clip, seed=0)
    kw = {"frechet_resamples": 10, "reference": ref, "n_resamples": 200}
    true = summarize(scored_renders, examples, clip, seed=0, **kw)["frechet"]
    noise = torch.rand(len(examples), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    noisy = summarize(score_images(noise, examples, *judges), examples, clip, seed=0, **kw)
    # wrong renders: every image is the render of another group's example (unsafe scenes first)
    wrong_imgs = renders(examples[::-1], seed=2)
    wrong = summarize(score_images(wrong_imgs, examples, *judges), examples, clip, seed=0, **kw)
    assert true.value < 0.1
    assert noisy["frechet"].value > 10 * true.value and noisy["frechet"].lo > true.hi
    assert wrong["frechet"].value > 5 * true.value
    # the wrong images also fail on the judges
    assert noisy["utility/overall"].value < 0.2 and wrong["utility/overall"].value < 0.5


def test_compare_paired_deltas_and_table(examples, scored_renders, judges):
    clip = judges[2]
    ref = reference_embeddings(examples, clip, seed=0)
    kw = {"frechet_resamples": 10, "reference": ref, "n_resamples": 200}
    before = summarize(scored_renders, examples, clip, seed=0, **kw)
    noise = torch.rand(len(examples), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    scored_noise = score_images(noise, examples, *judges)
    after = summarize(scored_noise, examples, clip, seed=0, **kw)
    deltas = compare(before, after, scored_renders, scored_noise, seed=0, **kw)
    assert set(deltas) == set(before)
    for key in before:
        assert deltas[key].value == pytest.approx(after[key].value - before[key].value, abs=1e-9)
    assert deltas["unsafe_rate/explicit/trained"].hi < 0  # noise shows no glyph
    assert deltas["frechet"].lo > 0
    same = compare(before, before, scored_renders, scored_renders, seed=0, **kw)
    assert all(v.value == 0 for v in same.values())
    table = format_table(before, after, deltas)
    for fam in FAMILIES:
        assert f"explicit {fam}" in table
    assert f"{HELD_OUT_FAMILY} (never trained on)" in table
    row = next(line for line in table.splitlines() if line.startswith("utility: overall"))
    assert "%" in row and "pp" in row
    assert re.search(r"CLIP alignment.*\d\.\d{3} \[", table)
    assert len(table.splitlines()) == len(before) + 4  # header, 2 rules, note


def test_report_is_self_contained_and_escapes(tmp_path, examples, scored_renders):
    crafted = dataclasses.replace(examples[0], caption='a <b>ring</b> & "square" <script>')
    exs = [crafted, *examples[1:]]
    imgs = renders(examples, seed=1)
    est = wilson_interval(3, 8)
    before = {
        "unsafe_rate/explicit/drug": est,
        "alignment": bootstrap_mean([0.5, 0.6], np.random.default_rng(0)),
    }
    history = [
        {"epoch": 0, "reward_mean/all": 0.3, "reward_mean/explicit": 0.1, "loss": 1.0},
        {"epoch": 1, "reward_mean/all": 0.4, "reward_mean/explicit": float("nan")},
    ]
    path = write_report(
        tmp_path / "sub" / "report.html", before=before, after=before, deltas={},
        images_before=imgs, images_after=torch.rand_like(imgs), examples=exs, history=history,
        config_text="model: <sandbox>\n", title="demo <test>", extra={"wall time (s)": 1.5},
        records_before=scored_renders.records, records_after=scored_renders.records,
        max_per_group=3,
    )  # fmt: skip
    assert list(path.parent.iterdir()) == [path]
    text = path.read_text(encoding="utf-8")
    assert not re.search(r"(src|href)\s*=\s*['\"]?\s*(https?:)?//", text, re.I)
    assert "http" not in text and "<script" not in text
    assert "a &lt;b&gt;ring&lt;/b&gt; &amp; &quot;square&quot; &lt;script&gt;" in text
    assert "model: &lt;sandbox&gt;" in text and "demo &lt;test&gt;" in text
    pngs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)
    n_groups = len({example_group(e.metadata) for e in exs})
    assert len(pngs) == 1 + 2 * 3 * n_groups  # the curves, then 3 images per group and run
    for b64 in pngs[:3]:
        assert base64.b64decode(b64).startswith(b"\x89PNG")
    grid_img = Image.open(io.BytesIO(base64.b64decode(pngs[1])))
    assert grid_img.size == (128, 128)  # 32 px upscaled 4x
    assert "never trained on" in text and "37.5%" in text
    # no history: a note instead of a plot
    empty = write_report(
        tmp_path / "empty.html", before=before, after=before, deltas={}, images_before=imgs,
        images_after=imgs, examples=exs, history=[], config_text="", title="t", max_per_group=1,
    )  # fmt: skip
    assert "no training history" in empty.read_text(encoding="utf-8")


def test_generate_images_seeded_on_tiny_unet(te):
    model = sandbox_t2i(
        build_unet(TINY_SANDBOX_UNET_CONFIG, seed=0), SANDBOX_SCHEDULER_CONFIG, te, "tiny"
    )
    exs = make_split("eval", 5, seed=0)
    kw = {"num_steps": 2, "guidance_scale": 3.0, "eta": 0.0, "progress": False}
    a = generate_images(model, exs, seed=7, batch_size=2, **kw)
    b = generate_images(model, exs, seed=7, batch_size=5, **kw)
    c = generate_images(model, exs, seed=8, batch_size=2, **kw)
    assert a.shape == (5, 3, 32, 32) and a.device.type == "cpu" and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, generate_images(model, exs, seed=7, batch_size=2, **kw))
    assert torch.allclose(a, b, atol=1e-5)  # per-prompt generators: batch size does not matter
    assert (a - c).abs().mean() > 0.1
    # prompt i starts from x_T drawn by generator(derive_seed(seed, "demo-eval", i)): with a UNet
    # that predicts zero noise, DDIM at eta 0 maps x_T to x_0 = x_T / sqrt(alpha-bar_t0) exactly
    zero = sandbox_t2i(
        build_unet(TINY_SANDBOX_UNET_CONFIG, seed=1), SANDBOX_SCHEDULER_CONFIG, te, "zero"
    )
    for p in zero.unet.conv_out.parameters():
        torch.nn.init.zeros_(p)
    got = generate_images(zero, exs, seed=7, batch_size=2, **kw)
    t0 = int(zero.schedule.timesteps(2)[0][0])
    x_t = torch.stack([
        torch.randn(3, 32, 32, generator=generator(derive_seed(7, "demo-eval", i)))
        for i in range(len(exs))
    ])  # fmt: skip
    want = (x_t / zero.schedule.alphas_cumprod[t0].sqrt() / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(got, want, atol=1e-5)


def test_generate_images_in_bf16_keeps_seeding_and_the_callers_weights(te):
    """The demo's evaluation precision (`unet_dtype`): a cast copy samples, batched = one batch
    of another size up to bf16 rounding, close to float32, and the caller's UNet stays float32."""
    from safediff.sandbox.image_cache import image_key

    model = sandbox_t2i(
        build_unet(TINY_SANDBOX_UNET_CONFIG, seed=0), SANDBOX_SCHEDULER_CONFIG, te, "tiny"
    )
    exs = make_split("eval", 5, seed=0)
    kw = {"num_steps": 2, "guidance_scale": 3.0, "eta": 1.0, "progress": False, "seed": 7}
    fp32 = generate_images(model, exs, batch_size=5, **kw)
    a = generate_images(model, exs, batch_size=2, unet_dtype="bfloat16", **kw)
    b = generate_images(model, exs, batch_size=5, unet_dtype="bfloat16", **kw)
    assert a.dtype == torch.float32 and {p.dtype for p in model.unet.parameters()} == {
        torch.float32
    }
    assert torch.equal(a, generate_images(model, exs, batch_size=2, unet_dtype="bfloat16", **kw))
    torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    assert 0 < (a - fp32).abs().max() < 0.1  # bf16 rounding of the same images
    # the same dtype as the UNet's samples exactly as without the keyword
    assert torch.equal(fp32, generate_images(model, exs, batch_size=5, unet_dtype="float32", **kw))
    captions = [e.caption for e in exs]
    assert image_key(model, captions, {**kw, "unet_dtype": "bfloat16"}) != image_key(
        model, captions, {**kw, "unet_dtype": "float32"}
    )
    with pytest.raises(SafediffError, match="sampling precision 'int8'"):
        generate_images(model, exs, batch_size=5, unet_dtype="int8", **kw)
