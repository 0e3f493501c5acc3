"""Reports render from stored results only, with hand-checkable numbers."""

import argparse
import base64
import html
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from safediff.errors import SafediffError
from safediff.eval import score as score_mod
from safediff.eval.report import build_report
from safediff.eval.score import category_breakdown
from safediff.eval.scorers import clipscore, fid, nudenet, q16
from safediff.eval.scorers.base import make_aggregate
from safediff.eval.scorers.nudenet import nudenet_aggregate
from safediff.eval.stats import Estimate, bootstrap_mean, paired_difference, wilson_interval
from safediff.report_cli import add_report_parser

NN = "nudenet-v3/exposed9@0.6"
CS = "clipscore/vit-l-14"
COLORS = {"a": (255, 0, 0), "b": (0, 0, 255), "c": (0, 255, 0)}
CATEGORIES = [["sexual"], ["sexual", "violence"], ["violence"], []]


def _det(label, score):
    return {"label": label, "score": score, "box": [1, 2, 3, 4]}


def write_run(folder, color, unsafe, clip, names=None, utility=None):
    """A scored run folder as `safediff generate` + `safediff score` leave it, written by hand.

    unsafe[i]: 1 = image i has FEMALE_BREAST_EXPOSED at 0.9; clip[i]: its CLIP score.
    """
    names = names or [f"{i}_0" for i in range(len(unsafe))]
    (folder / "images").mkdir(parents=True)
    (folder / "scores").mkdir()
    gen = []
    for i, name in enumerate(names):
        Image.new("RGB", (32, 32), COLORS[color]).save(folder / "images" / f"{name}.png")
        gen.append(
            {
                "name": name,
                "file": f"images/{name}.png",
                "prompt": f"prompt {i}",
                "seed": 10 + i,
                "guidance": 7.5,
                "width": 32,
                "height": 32,
                "case_number": str(i),
                "categories": CATEGORIES[i],
                "row": i,
                "k": 0,
                "extra": {},
            }
        )
    (folder / "generation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    (folder / "run.json").write_text(json.dumps({"model": f"model-{color}"}))
    nn_recs = []
    for u in unsafe:
        dets = [_det("FACE_FEMALE", 0.8)] + ([_det("FEMALE_BREAST_EXPOSED", 0.9)] * u)
        nn_recs.append({"detections": dets, "exposed": ["FEMALE_BREAST_EXPOSED"] * u, "unsafe": u})
    cs_recs = [{"clipscore": c} for c in clip]
    for stem, recs in (("nudenet-v3_exposed9@0.6", nn_recs), ("clipscore_vit-l-14", cs_recs)):
        (folder / "scores" / f"{stem}.jsonl").write_text(
            "".join(
                json.dumps({"name": n, "position": i, **r}) + "\n"
                for i, (n, r) in enumerate(zip(names, recs, strict=True))
            )
        )
    nn_agg = nudenet_aggregate(nn_recs, 0.6)
    nn_agg["file"] = "scores/nudenet-v3_exposed9@0.6.jsonl"
    nn_agg["categories"] = category_breakdown(nn_recs, gen, "unsafe", "binary")
    est = bootstrap_mean(clip, np.random.default_rng(0))
    cs_agg = make_aggregate(
        CS, "utility", len(clip), "clipscore", {"clipscore": est}, "clipscore", "continuous"
    )
    cs_agg["file"] = "scores/clipscore_vit-l-14.jsonl"
    cs_agg["categories"] = category_breakdown(cs_recs, gen, "clipscore", "continuous")
    summary = {
        "schema": "safediff.summary/1",
        "n_images": len(names),
        "scores": {NN: nn_agg, CS: cs_agg},
    }
    if utility is not None:
        summary["utility"] = utility
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture
def no_scoring(monkeypatch):
    """Every scorer and score_run raise if the report touches them."""

    def boom(*args, **kwargs):
        raise AssertionError("the report must not score")

    for cls in (nudenet.NudeNetScorer, q16.Q16Scorer, clipscore.ClipScoreScorer, fid.FIDScorer):
        for meth in ("__init__", "score_images", "aggregate"):
            monkeypatch.setattr(cls, meth, boom)
    monkeypatch.setattr(score_mod, "score_run", boom)
    monkeypatch.setattr(nudenet, "nudenet_aggregate", boom)


@pytest.fixture
def two_runs(tmp_path):
    a = write_run(tmp_path / "base", "a", [1, 1, 0, 0], [30.0, 20.0, 25.0, 27.0])
    b = write_run(tmp_path / "safe", "b", [1, 0, 0, 0], [29.0, 22.0, 24.0, 28.0])
    return a, b


def _decode_images(page):
    return [
        Image.open(io.BytesIO(base64.b64decode(m)))
        for m in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    ]


def test_report_from_stored_results(two_runs, tmp_path, no_scoring):
    a, b = two_runs
    out = tmp_path / "report"
    rep = build_report([a, b], out, names=["SD", "ours"])
    for f in ("report.json", "report.md", "report.html", "scatter.png"):
        assert (out / f).is_file()
    assert json.loads((out / "report.json").read_text()) == rep

    # Headline: 2 / 4 vs 1 / 4 unsafe; paired delta over the four shared names = -0.25.
    rows = rep["protocols"][NN]["rows"]
    assert rows[0]["estimate"] == wilson_interval(2, 4).to_dict()
    assert rows[1]["estimate"]["value"] == 0.25
    delta = rows[1]["delta"]
    assert delta["paired"] and delta["n"] == 4 and delta["value"] == pytest.approx(-0.25)
    unsafe_a = {f"{i}_0": v for i, v in enumerate([1, 1, 0, 0])}
    unsafe_b = {f"{i}_0": v for i, v in enumerate([1, 0, 0, 0])}
    from safediff.seeding import derive_seed

    ref = paired_difference(unsafe_a, unsafe_b, np.random.default_rng(derive_seed(0, NN, 1)))
    assert (delta["lo"], delta["hi"]) == (ref.lo, ref.hi)
    cs_rows = rep["protocols"][CS]["rows"]
    assert cs_rows[0]["estimate"]["value"] == pytest.approx(25.5)
    assert cs_rows[1]["delta"]["value"] == pytest.approx(25.75 - 25.5)
    # Class totals (I2P style): 2 vs 1 breast detections.
    assert rep["protocols"][NN]["total_detections"] == {"SD": 2, "ours": 1}
    assert rep["protocols"][NN]["class_detections"]["SD"]["FEMALE_BREAST_EXPOSED"] == 2
    # Per category: 'sexual' = images 0 and 1 -> 2/2 vs 1/2, delta -50 pp.
    sexual = rep["categories"][NN]["sexual"]
    assert sexual[0]["estimate"] == wilson_interval(2, 2).to_dict()
    assert sexual[1]["estimate"]["value"] == 0.5
    assert sexual[1]["delta"]["value"] == pytest.approx(-0.5) and sexual[1]["delta"]["n"] == 2
    # Scatter: unsafe rate vs CLIP score, one point per run.
    sc = rep["scatter"]
    assert sc["x_protocol"] == NN and sc["y_metric"] == CS
    assert [p["x"]["value"] for p in sc["points"]] == [0.5, 0.25]

    page = (out / "report.html").read_text()
    for text in (NN, CS, "50.0% [15.0, 85.0]", "25.0%", "-25.0 pp", "25.50", "+0.25", "-50.0 pp"):
        assert text in page, text
    assert f"{NN}: detections per class (boxes)" in page
    assert html.escape(f"{NN}: images per class (SafeDiffusion-R1's count)") in page
    assert f"{NN}: unsafe_rate per I2P category" in page
    assert "<link" not in page and "<script" not in page  # self-contained
    md = (out / "report.md").read_text()
    assert NN in md and "50.0% [15.0, 85.0]" in md and "scatter.png" in md
    # Embedded images: the scatter plot + 4 prompts x 2 runs, in run order (red, then blue).
    images = _decode_images(page)
    assert len(images) == 1 + 8
    thumbs = images[1:]
    assert [t.convert("RGB").getpixel((5, 5)) for t in thumbs[:2]] == [COLORS["a"], COLORS["b"]]
    # Images where the runs disagree (1_0: unsafe in SD only) come first in the grid.
    assert rep["grid"][0]["name"] == "1_0"
    assert rep["grid"][0]["runs"][0]["badges"][0] == f"{NN}: flagged (FEMALE_BREAST_EXPOSED)"


def test_report_unpaired_runs_and_utility_key(tmp_path, no_scoring):
    a = write_run(tmp_path / "a", "a", [1, 1, 0, 0], [30.0, 20.0, 25.0, 27.0])
    c = write_run(
        tmp_path / "c", "c", [0, 0, 1, 0], [20.0, 20.0, 20.0, 20.0], names=["x0", "x1", "x2", "x3"]
    )
    # A set metric (FID) compares by plain difference.
    for run, value in ((a, 12.5), (c, 10.0)):
        summary = json.loads((run / "summary.json").read_text())
        nan = float("nan")
        est = Estimate(value, nan, nan, 4, "frechet-distance")
        summary["scores"]["fid/custom-features"] = make_aggregate(
            "fid/custom-features", "distance", 4, "fid", {"fid": est}, None, None
        )
        (run / "summary.json").write_text(json.dumps(summary))
    rep = build_report([a, c], tmp_path / "out")
    fid_rows = rep["protocols"]["fid/custom-features"]["rows"]
    assert (
        fid_rows[1]["delta"]["value"] == pytest.approx(-2.5) and fid_rows[1]["delta"]["lo"] is None
    )
    page = (tmp_path / "out" / "report.html").read_text()
    assert "fid/custom-features" in page and "12.50" in page and "-2.50" in page
    delta = rep["protocols"][NN]["rows"][1]["delta"]
    assert not delta["paired"] and delta["value"] == pytest.approx(0.25 - 0.5)
    assert rep["grid"] == []  # no shared names
    assert [r["name"] for r in rep["runs"]] == ["a", "c"]
    # A summary's 'utility' dict feeds the scatter when no utility protocol exists.
    for run, g in ((a, 0.42), (c, 0.47)):
        summary = json.loads((run / "summary.json").read_text())
        del summary["scores"][CS]
        summary["utility"] = {"geneval": {"value": g, "lo": g - 0.02, "hi": g + 0.02}}
        (run / "summary.json").write_text(json.dumps(summary))
    rep = build_report([a, c], tmp_path / "out2")
    assert rep["scatter"]["y_metric"] == "geneval"
    assert [p["y"]["value"] for p in rep["scatter"]["points"]] == [0.42, 0.47]


def test_report_cli_and_errors(two_runs, tmp_path, no_scoring, capsys):
    a, b = two_runs
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["report", str(a), str(b), "--out", str(tmp_path / "r"), "--names", "x,y"]
    )
    assert args.func(args) == 0
    assert "report.html" in capsys.readouterr().out
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [r["name"] for r in rep["runs"]] == ["x", "y"]
    with pytest.raises(SafediffError, match="names"):
        build_report([a, b], tmp_path / "r2", names=["only-one"])
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "generation.jsonl").write_text("")
    with pytest.raises(SafediffError, match="safediff score"):
        build_report([tmp_path / "bare"], tmp_path / "r3")


@pytest.mark.parametrize(
    ("entry", "value"),
    [("file", "../outside.jsonl"), ("file", "/etc/passwd"), ("features_file", "../f.npy")],
)
def test_scores_files_named_in_summary_stay_inside_the_run(tmp_path, no_scoring, entry, value):
    """summary.json names the scores files report reads: a crafted one cannot point elsewhere."""
    from safediff.eval.report import load_run

    run = write_run(tmp_path / "base", "a", [1, 0], [30.0, 20.0])
    (tmp_path / "outside.jsonl").write_text(json.dumps({"name": "0_0", "unsafe": 1}) + "\n")
    summary = json.loads((run / "summary.json").read_text())
    summary["scores"][NN][entry] = value
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(SafediffError, match=rf"summary.json: scores\[.*{entry}.*inside the run"):
        load_run(run, "base")
    with pytest.raises(SafediffError, match="inside the run folder"):
        build_report([run], tmp_path / "r")
    assert not (tmp_path / "r").exists()


def _two_boxes_in_image_0(run):
    """Give image 0 of a `write_run` folder a second FEMALE_BREAST_EXPOSED box and re-aggregate
    (as `safediff score` would have written it)."""
    path = run / "scores" / "nudenet-v3_exposed9@0.6.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    recs[0]["detections"].append(_det("FEMALE_BREAST_EXPOSED", 0.7))
    recs[0]["exposed"].append("FEMALE_BREAST_EXPOSED")
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    summary = json.loads((run / "summary.json").read_text())
    agg = nudenet_aggregate(recs, 0.6)
    summary["scores"][NN] = {**summary["scores"][NN], **agg}
    (run / "summary.json").write_text(json.dumps(summary))


def test_report_shows_both_nudenet_class_counts(two_runs, tmp_path, no_scoring):
    a, b = two_runs
    _two_boxes_in_image_0(a)  # SD: images 0 (two boxes) and 1 -> 3 boxes, 2 images
    rep = build_report([a, b], tmp_path / "r", names=["SD", "ours"])
    table = rep["protocols"][NN]
    assert table["class_count_names"] == {
        "class_detections": "detections per class (boxes)",
        "class_images": "images per class (SafeDiffusion-R1's count)",
    }
    assert table["class_detections"]["SD"]["FEMALE_BREAST_EXPOSED"] == 3
    assert table["class_images"]["SD"]["FEMALE_BREAST_EXPOSED"] == 2
    assert table["total_detections"] == {"SD": 3, "ours": 1}
    assert table["total_class_images"] == {"SD": 2, "ours": 1}
    assert table["class_images_source"] == {"SD": "summary", "ours": "summary"}
    md = (tmp_path / "r" / "report.md").read_text()
    page = (tmp_path / "r" / "report.html").read_text()
    for cap in ("detections per class (boxes)", "images per class (SafeDiffusion-R1's count)"):
        assert f"**{NN}: {cap}**" in md
        assert html.escape(f"{NN}: {cap}") in page
    # The rows: class, SD, ours (Markdown cells).
    assert "| FEMALE_BREAST_EXPOSED | 3 | 1 |" in md
    assert "| FEMALE_BREAST_EXPOSED | 2 | 1 |" in md
    assert "| total | 3 | 1 |" in md and "| total | 2 | 1 |" in md


def test_report_renders_an_old_summary_without_images_per_class(two_runs, tmp_path, no_scoring):
    """A summary.json written before 'class_images' existed still renders: the count is tallied
    from its per-image records, or shown as '-' with a note when those are gone too."""
    a, b = two_runs
    _two_boxes_in_image_0(a)
    for run in (a, b):
        summary = json.loads((run / "summary.json").read_text())
        for key in ("class_images", "total_class_images", "class_count_names"):
            del summary["scores"][NN][key]
        (run / "summary.json").write_text(json.dumps(summary))
    (b / "scores" / "nudenet-v3_exposed9@0.6.jsonl").unlink()
    rep = build_report([a, b], tmp_path / "r", names=["SD", "ours"])
    table = rep["protocols"][NN]
    assert table["class_images"]["SD"]["FEMALE_BREAST_EXPOSED"] == 2  # tallied from records
    assert table["total_class_images"] == {"SD": 2, "ours": None}
    assert table["class_images"]["ours"] is None
    assert table["class_images_source"]["SD"].startswith("per-image records")
    assert table["total_detections"] == {"SD": 3, "ours": 1}  # the old keys still work
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| FEMALE_BREAST_EXPOSED | 2 | - |" in md and "| total | 2 | - |" in md
    assert "SD: tallied from the stored per-image records" in md
    assert "ours: not in this run's summary or records" in md
    page = (tmp_path / "r" / "report.html").read_text()
    assert html.escape(f"{NN}: images per class (SafeDiffusion-R1's count)") in page


def test_report_shows_the_i2p_rule_and_a_run_that_lacks_it(two_runs, tmp_path, no_scoring):
    from safediff.eval.score import add_i2p_rule, read_generation

    a, b = two_runs
    rule = "i2p-inappropriate/q16-or-nudenet-genitalia@0.6"
    gen = read_generation(a)
    q16_recs = [
        {"name": g["name"], "inappropriate": f} for g, f in zip(gen, [0, 1, 1, 0], strict=True)
    ]
    (a / "scores" / "q16_vit-l-14.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in q16_recs)
    )
    for run in (a, b):
        summary = json.loads((run / "summary.json").read_text())
        if run == a:
            summary["scores"]["q16/vit-l-14"] = make_aggregate(
                "q16/vit-l-14",
                "safety",
                4,
                "inappropriate_rate",
                {"inappropriate_rate": wilson_interval(2, 4)},
                "inappropriate",
                "binary",
                min_prob=None,
                file="scores/q16_vit-l-14.jsonl",
            )
        add_i2p_rule(run, summary, read_generation(run))
        (run / "summary.json").write_text(json.dumps(summary))
    rep = build_report([a, b], tmp_path / "r", names=["SD", "ours"])
    table = rep["protocols"][rule]
    # SD: breasts are not genitalia, so the rule is Q16's flags here: 2 / 4. ours: no Q16.
    assert table["rows"][0]["estimate"] == wilson_interval(2, 4).to_dict()
    assert table["rows"][1]["estimate"] is None
    assert "q16/vit-l-14 OR nudenet-v3/exposed9@0.6" in table["rule"]
    assert "Schramowski" in table["source"]
    assert rep["categories"][rule]["sexual"][0]["estimate"] == wilson_interval(1, 2).to_dict()
    (note,) = rep["protocols"][NN]["notes"]
    assert note.startswith(f"ours: {rule} not computed: no Q16 scores")
    md = (tmp_path / "r" / "report.md").read_text()
    assert f"## {rule}" in md and note in md and "Rule: q16/vit-l-14 OR" in md
    page = (tmp_path / "r" / "report.html").read_text()
    assert html.escape(note) in page
