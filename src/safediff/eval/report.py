"""Reports of scored runs: `build_report()` and `safediff report`.

Reads only what `safediff generate` and `safediff score` stored (generation.jsonl, run.json,
summary.json, scores/*.jsonl, the images); no model is loaded and no score is recomputed. Writes:

    OUT/report.json   every number of the report, machine-readable
    OUT/report.md     the tables (Markdown), with the scatter plot as OUT/scatter.png
    OUT/report.html   one self-contained page: inline CSS, images embedded as base64 PNG

Contents, each table captioned with its protocol name:
- per protocol, runs side by side: the headline (a rate for safety protocols, a mean for scores,
  a distance for FID) with its 95% interval as stored, and the delta against the first run. The
  delta is *paired* when the two runs share image names (same prompts and seeds): the mean of
  per-image differences over the shared names, with a bootstrap interval over pairs; otherwise an
  unpaired bootstrap difference of means. Set metrics (FID) get the plain difference;
- NudeNet per-class counts, both named: detections per class (boxes; the I2P table style) and
  images per class (SafeDiffusion-R1's count), each with its sum;
- a combined protocol's rule (the I2P rule: Q16 OR NudeNet), or why a run lacks it;
- per I2P category: each run's stored estimate and the delta against the first run;
- the safety-utility scatter plot: x = the first safety protocol's rate, y = the first utility
  protocol's mean (CLIP score), else the first key of a run summary's 'utility' dict;
- image grids: the same image names (prompt + seed) across runs, images where the runs' safety
  flags disagree first, with each image's flags and scores.
- attack runs (folders of `safediff attack`, given among the others or alone): per run its
  attack, victim, protocol, judge, ASR with its interval and budget, and a grid of targets:
  target prompt, adversarial prompt, images with their judge flags, success.

Bootstrap draws use numpy generators seeded with derive_seed(seed, protocol, run, category), so
the report is a deterministic function of the stored results and `seed`.
"""

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from safediff.errors import SafediffError
from safediff.eval.html import (
    e,
    figure_png,
    file_thumbnail_png,
    html_table,
    json_default,
    md_table,
    new_figure,
    page,
    png_data_uri,
)
from safediff.eval.score import (
    I2P_RULE_KEY,
    SUMMARY_FILE,
    check_inside_run,
    read_generation,
    read_jsonl,
)
from safediff.eval.scorers.nudenet import CLASS_COUNT_TOTALS, CLASS_COUNTS
from safediff.eval.stats import Estimate, difference_of_means, paired_difference
from safediff.seeding import derive_seed

REPORT_SCHEMA = "safediff.report/1"
RUN_FILE = "run.json"


@dataclass
class RunData:
    """One run folder's stored results.

    gen: generation.jsonl records in order. summary: summary.json. scores: protocol -> image name
    -> per-image score record. info: run.json (empty when absent).
    """

    name: str
    path: Path
    gen: list[dict[str, Any]]
    summary: dict[str, Any]
    scores: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def aggregates(self) -> dict[str, dict[str, Any]]:
        return self.summary.get("scores", {})


def load_run(run_dir: str | Path, name: str) -> RunData:
    """Read a scored run folder (generation.jsonl, summary.json, scores files, run.json)."""
    run_dir = Path(run_dir)
    gen = read_generation(run_dir)
    summary_path = run_dir / SUMMARY_FILE
    if not summary_path.is_file():
        raise SafediffError(
            f"{run_dir} has no {SUMMARY_FILE}; run `safediff score {run_dir}` first"
        )
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SafediffError(f"{summary_path} is not valid JSON ({err.msg})") from err
    scores: dict[str, dict[str, dict[str, Any]]] = {}
    for protocol, agg in summary.get("scores", {}).items():
        for entry in ("file", "features_file"):  # a crafted summary must not read elsewhere
            if agg.get(entry) is not None:
                check_inside_run(agg[entry], f"{summary_path}: scores[{protocol!r}][{entry!r}]")
        file = agg.get("file")
        if file and (run_dir / file).is_file():
            scores[protocol] = {r["name"]: r for r in read_jsonl(run_dir / file) if "name" in r}
    info: dict[str, Any] = {}
    if (run_dir / RUN_FILE).is_file():
        try:
            info = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            info = {}
    return RunData(name, run_dir, gen, summary, scores, info)


def _run_names(run_dirs: Sequence[Path], names: Sequence[str] | None) -> list[str]:
    if names is not None:
        if len(names) != len(run_dirs):
            raise SafediffError(f"--names gives {len(names)} names for {len(run_dirs)} runs")
        if len(set(names)) != len(names):
            raise SafediffError(f"run names must be distinct, got {list(names)}")
        return list(names)
    out: list[str] = []
    for d in run_dirs:
        base = Path(d).resolve().name or str(d)
        name, k = base, 2
        while name in out:
            name, k = f"{base}-{k}", k + 1
        out.append(name)
    return out


# ---------------------------------------------------------------------------------------------
# Numbers


def _values(
    run: RunData, protocol: str, key: str, subset: set[str] | None = None
) -> dict[str, float]:
    recs = run.scores.get(protocol, {})
    return {
        n: float(r[key]) for n, r in recs.items() if key in r and (subset is None or n in subset)
    }


def _delta(
    base: RunData,
    other: RunData,
    protocol: str,
    agg0: Mapping[str, Any],
    agg: Mapping[str, Any],
    rng_seed: int,
    names: set[str] | None = None,
) -> dict[str, Any] | None:
    """Delta of `other` against `base` for one protocol (optionally on a subset of names)."""
    key = agg.get("value_key")
    if not key:
        v0 = agg0["metrics"][agg0["headline"]]["value"]
        v1 = agg["metrics"][agg["headline"]]["value"]
        if v0 is None or v1 is None:
            return None
        nan = float("nan")
        return {**Estimate(v1 - v0, nan, nan, 0, "difference").to_dict(), "paired": False}
    a = _values(base, protocol, key, names)
    b = _values(other, protocol, key, names)
    if not a or not b:
        return None
    rng = np.random.default_rng(rng_seed)
    if any(n in b for n in a):
        est = paired_difference(a, b, rng)
        return {**est.to_dict(), "paired": True}
    est = difference_of_means(list(a.values()), list(b.values()), rng)
    return {**est.to_dict(), "paired": False}


def _category_names(run: RunData) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for rec in run.gen:
        cats = rec.get("categories") or []
        if isinstance(cats, str):
            cats = [c.strip() for c in cats.split(",")]
        for c in cats:
            if c:
                out.setdefault(str(c), set()).add(rec["name"])
    return out


def _protocol_order(runs: Sequence[RunData]) -> list[str]:
    order: list[str] = []
    for run in runs:
        for p in run.aggregates:
            if p not in order:
                order.append(p)
    return order


def protocol_tables(runs: Sequence[RunData], seed: int) -> dict[str, dict[str, Any]]:
    """Per protocol: kind, headline, value_type and one row per run (estimate, delta vs first)."""
    tables: dict[str, dict[str, Any]] = {}
    for protocol in _protocol_order(runs):
        base = runs[0]
        agg0 = base.aggregates.get(protocol)
        first = next(r.aggregates[protocol] for r in runs if protocol in r.aggregates)
        rows = []
        for i, run in enumerate(runs):
            agg = run.aggregates.get(protocol)
            if agg is None:
                rows.append({"run": run.name, "estimate": None, "delta": None, "n": None})
                continue
            delta = None
            if i > 0 and agg0 is not None:
                delta = _delta(base, run, protocol, agg0, agg, derive_seed(seed, protocol, i))
            rows.append(
                {
                    "run": run.name,
                    "estimate": agg["metrics"][agg["headline"]],
                    "delta": delta,
                    "n": agg.get("n"),
                }
            )
        table: dict[str, Any] = {
            "protocol": protocol,
            "kind": first.get("kind"),
            "headline": first.get("headline"),
            "value_type": first.get("value_type"),
            "rows": rows,
        }
        if "class_detections" in first or "class_images" in first:
            table.update(class_count_tables(runs, protocol))
        if first.get("rule"):  # a combined protocol (the I2P rule) says how it combines
            table["rule"] = first["rule"]
            table["source"] = first.get("source")
        notes = _rule_notes(runs, protocol)
        if notes:
            table["notes"] = notes
        tables[protocol] = table
    return tables


def _images_per_class(
    run: RunData, protocol: str, agg: Mapping[str, Any]
) -> tuple[dict[str, int] | None, str | None]:
    """(images per class, where it came from) for one run's NudeNet aggregate.

    A summary written before the count existed has no 'class_images': it is tallied from the
    stored per-image records ('exposed': the labels at the scorer's threshold and classes, one
    per box), exactly as `nudenet_aggregate` counts it; without those records it is None.
    """
    if isinstance(agg.get("class_images"), Mapping):
        return dict(agg["class_images"]), "summary"
    recs = run.scores.get(protocol) or {}
    if not recs or len(recs) != agg.get("n") or any("exposed" not in r for r in recs.values()):
        return None, None
    counts = dict.fromkeys(agg.get("classes") or agg.get("class_detections") or {}, 0)
    for rec in recs.values():
        for label in set(rec["exposed"]):  # an image once per class
            counts[label] = counts.get(label, 0) + 1
    return counts, "per-image records (the summary predates this count)"


def class_count_tables(runs: Sequence[RunData], protocol: str) -> dict[str, Any]:
    """Both NudeNet per-class counts of one protocol, one entry per run that has it.

    class_count_names: {count key: its name} (`CLASS_COUNTS`); class_detections / class_images:
    {run: {class: count} or None}; total_detections / total_class_images: {run: sum or None};
    class_images_source: {run: 'summary', 'per-image records (...)' or None (not available)}.
    """
    out: dict[str, Any] = {"class_count_names": dict(CLASS_COUNTS)}
    for key in (*CLASS_COUNTS, *CLASS_COUNT_TOTALS.values(), "class_images_source"):
        out[key] = {}
    for run in runs:
        agg = run.aggregates.get(protocol)
        if agg is None:
            continue
        out["class_detections"][run.name] = agg.get("class_detections", {})
        out["total_detections"][run.name] = agg.get("total_detections")
        images, source = _images_per_class(run, protocol, agg)
        total = agg.get("total_class_images")
        if total is None and images is not None:
            total = int(sum(images.values()))
        out["class_images"][run.name] = images
        out["total_class_images"][run.name] = total
        out["class_images_source"][run.name] = source
    return out


def _rule_notes(runs: Sequence[RunData], protocol: str) -> list[str]:
    """Why a run has no I2P rule although `protocol` (one of the rule's parts) ran."""
    notes = []
    for run in runs:
        status = run.summary.get(I2P_RULE_KEY)
        if not isinstance(status, Mapping) or status.get("computed") is not False:
            continue
        if protocol in (status.get("from") or []):
            notes.append(f"{run.name}: {status.get('note')}")
    return notes


def category_tables(runs: Sequence[RunData], seed: int) -> dict[str, dict[str, list[dict]]]:
    """protocol -> category -> one row per run (stored estimate, delta vs first on that category)."""
    out: dict[str, dict[str, list[dict]]] = {}
    cat_names = [_category_names(r) for r in runs]
    for protocol in _protocol_order(runs):
        cats: list[str] = []
        for run in runs:
            for c in run.aggregates.get(protocol, {}).get("categories", {}) or {}:
                if c not in cats:
                    cats.append(c)
        if not cats:
            continue
        base, agg0 = runs[0], runs[0].aggregates.get(protocol)
        table: dict[str, list[dict]] = {}
        for cat in sorted(cats):
            rows = []
            for i, run in enumerate(runs):
                agg = run.aggregates.get(protocol)
                est = (agg or {}).get("categories", {}).get(cat)
                delta = None
                if i > 0 and agg is not None and agg0 is not None and est is not None:
                    names = cat_names[0].get(cat, set()) | cat_names[i].get(cat, set())
                    delta = _delta(
                        base, run, protocol, agg0, agg, derive_seed(seed, protocol, i, cat), names
                    )
                rows.append({"run": run.name, "estimate": est, "delta": delta})
            table[cat] = rows
        out[protocol] = table
    return out


def _utility_value(run: RunData, key: str) -> dict[str, Any] | None:
    util = run.summary.get("utility") or {}
    v = util.get(key)
    if isinstance(v, int | float) and not isinstance(v, bool):
        return {"value": float(v), "lo": None, "hi": None}
    if isinstance(v, Mapping) and isinstance(v.get("value"), int | float):
        return {"value": float(v["value"]), "lo": v.get("lo"), "hi": v.get("hi")}
    return None


def scatter_data(runs: Sequence[RunData], tables: Mapping[str, Mapping[str, Any]]) -> dict | None:
    """Points (one per run) of safety rate vs utility, or None when either axis is missing."""
    safety = [p for p, t in tables.items() if t["kind"] == "safety"]
    utility = [p for p, t in tables.items() if t["kind"] == "utility"]
    if not safety:
        return None
    x_protocol = safety[0]
    points = []
    y_name = utility[0] if utility else None
    if y_name is None:
        keys = [k for run in runs for k in (run.summary.get("utility") or {})]
        y_name = keys[0] if keys else None
    if y_name is None:
        return None
    for run in runs:
        xa = run.aggregates.get(x_protocol)
        if y_name in run.aggregates:
            ya = run.aggregates[y_name]
            y = ya["metrics"][ya["headline"]]
        else:
            y = _utility_value(run, y_name)
        if xa is None or y is None or y.get("value") is None:
            continue
        points.append({"run": run.name, "x": xa["metrics"][xa["headline"]], "y": y})
    if not points:
        return None
    return {"x_protocol": x_protocol, "y_metric": y_name, "points": points}


def _scatter_png(data: Mapping[str, Any]) -> bytes:
    fig, ax = new_figure(5.5, 4.0, dpi=110)
    for p in data["points"]:
        x, y = p["x"], p["y"]
        xv, yv = 100 * x["value"], y["value"]
        xerr = None
        if x.get("lo") is not None:
            xerr = [[xv - 100 * x["lo"]], [100 * x["hi"] - xv]]
        yerr = None
        if y.get("lo") is not None and y.get("hi") is not None:
            yerr = [[yv - y["lo"]], [y["hi"] - yv]]
        ax.errorbar(xv, yv, xerr=xerr, yerr=yerr, fmt="o", capsize=3)
        ax.annotate(p["run"], (xv, yv), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel(f"unsafe rate, % ({data['x_protocol']})")
    ax.set_ylabel(str(data["y_metric"]))
    ax.set_title("safety vs utility (95% intervals)")
    ax.grid(True, alpha=0.3)
    return figure_png(fig)


def _badges(run: RunData, name: str, tables: Mapping[str, Mapping[str, Any]]) -> list[str]:
    out = []
    for protocol, table in tables.items():
        agg = run.aggregates.get(protocol) or {}
        key = agg.get("value_key")
        rec = run.scores.get(protocol, {}).get(name)
        if not key or rec is None or key not in rec:
            continue
        if table["value_type"] == "binary":
            flag = "flagged" if rec[key] else "ok"
            extra = rec.get("exposed") or []
            text = f"{protocol}: {flag}" + (f" ({', '.join(sorted(set(extra)))})" if extra else "")
        else:
            text = f"{protocol}: {float(rec[key]):.2f}"
        out.append(text)
    return out


def grid_data(
    runs: Sequence[RunData], tables: Mapping[str, Mapping[str, Any]], max_rows: int
) -> list[dict[str, Any]]:
    """Image names present in every run, disagreeing safety flags first, at most `max_rows`."""
    by_name = [{r["name"]: r for r in run.gen} for run in runs]
    common = [r["name"] for r in runs[0].gen if all(r["name"] in m for m in by_name)]
    binary = [p for p, t in tables.items() if t["value_type"] == "binary"]

    def disagree(name: str) -> bool:
        for p in binary:
            key = runs[0].aggregates.get(p, {}).get("value_key")
            flags = {run.scores.get(p, {}).get(name, {}).get(key) for run in runs}
            if len(flags) > 1:
                return True
        return False

    ordered = [n for n in common if disagree(n)] + [n for n in common if not disagree(n)]
    rows = []
    for name in ordered[:max_rows]:
        g = by_name[0][name]
        rows.append(
            {
                "name": name,
                "prompt": g.get("prompt"),
                "seed": g.get("seed"),
                "categories": g.get("categories") or [],
                "runs": [
                    {
                        "run": run.name,
                        "file": str(run.path / by_name[i][name]["file"]),
                        "badges": _badges(run, name, tables),
                    }
                    for i, run in enumerate(runs)
                ],
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Formatting


def _fmt(est: Mapping[str, Any] | None, value_type: str | None, delta: bool = False) -> str:
    """'50.0% [15.0, 85.0]' for rates, '31.25 [30.10, 32.40]' for scores; deltas in pp."""
    if not est or est.get("value") is None:
        return "-"
    scale, unit = (100.0, "%") if value_type == "binary" else (1.0, "")
    if delta and value_type == "binary":
        unit = " pp"
    digits = 1 if value_type == "binary" else 2
    sign = "+" if delta else ""
    text = f"{scale * est['value']:{sign}.{digits}f}{unit}"
    if est.get("lo") is not None and est.get("hi") is not None:
        text += f" [{scale * est['lo']:.{digits}f}, {scale * est['hi']:.{digits}f}]"
    if delta and est.get("paired"):
        text += f" paired n={est.get('n')}"
    return text


def _headline_rows(table: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    vt = table["value_type"]
    header = ["run", f"{table['headline']} (95% CI)", "delta vs first run (95% CI)", "n"]
    rows = [
        [r["run"], _fmt(r["estimate"], vt), _fmt(r["delta"], vt, delta=True), str(r["n"] or "-")]
        for r in table["rows"]
    ]
    return header, rows


def _class_rows(
    table: Mapping[str, Any], key: str = "class_detections"
) -> tuple[list[str], list[list[str]]]:
    """One per-class count (`key`: class_detections or class_images) as rows: class x run, then
    the total; '-' where a run does not have the count."""
    counts, totals = table[key], table[CLASS_COUNT_TOTALS[key]]
    runs = list(counts)
    classes: list[str] = []
    for per_class in counts.values():
        classes += [c for c in per_class or {} if c not in classes]

    def cell(value: Any) -> str:
        return "-" if value is None else str(value)

    rows = [
        [c] + [cell(None if counts[r] is None else counts[r].get(c, 0)) for r in runs]
        for c in classes
    ]
    rows.append(["total"] + [cell(totals.get(r)) for r in runs])
    return ["class", *runs], rows


def _protocol_extras(protocol: str, table: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(markdown, html) of what a protocol table carries beside its headline: the rule of a
    combined protocol, notes on a rule not computed, both NudeNet per-class counts."""
    md: list[str] = []
    h: list[str] = []
    texts = []
    if table.get("rule"):
        texts.append(f"Rule: {table['rule']}. Source: {table.get('source') or '-'}.")
    texts += table.get("notes") or []
    for text in texts:
        md += [text, ""]
        h.append(f"<p class='note'>{e(text)}</p>")
    for key, name in (table.get("class_count_names") or {}).items():
        if key not in table:
            continue
        header, rows = _class_rows(table, key)
        cap = f"{protocol}: {name}"
        md.append(_md_table(cap, header, rows))
        h.append(_html_table(cap, header, rows))
        sources = (table.get("class_images_source") or {}) if key == "class_images" else {}
        tallied = [run for run, src in sources.items() if src not in (None, "summary")]
        missing = [run for run, c in table[key].items() if c is None]
        for runs, why in (
            (tallied, "tallied from the stored per-image records (an older summary.json)"),
            (missing, "not in this run's summary or records; re-run `safediff score`"),
        ):
            if runs:
                text = f"{name}, {', '.join(runs)}: {why}"
                md += [text, ""]
                h.append(f"<p class='note'>{e(text)}</p>")
    return md, h


def _category_rows(
    cat_table: Mapping[str, list[dict]], value_type: str | None
) -> tuple[list[str], list[list[str]]]:
    cats = list(cat_table)
    runs = [r["run"] for r in cat_table[cats[0]]]
    header = ["category"]
    for i, run in enumerate(runs):
        header.append(f"{run} (n)")
        if i > 0:
            header.append(f"{run} delta")
    rows = []
    for cat in cats:
        row = [cat]
        for i, r in enumerate(cat_table[cat]):
            est = r["estimate"]
            n = f" (n={est['n']})" if est else ""
            row.append(_fmt(est, value_type) + n)
            if i > 0:
                row.append(_fmt(r["delta"], value_type, delta=True))
        rows.append(row)
    return header, rows


def _md_table(caption: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    return md_table(header, rows, caption)


def _html_table(caption: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    return html_table(header, rows, caption)


def _render(report: Mapping[str, Any], runs: Sequence[RunData], thumb: int) -> tuple[str, str]:
    """(markdown, html) of a report dict."""
    md = ["# safediff evaluation report", ""]
    h: list[str] = []
    run_header = ["run", "folder", "model", "sampler", "images"]
    run_rows = [
        [
            r["name"],
            r["path"],
            str(r.get("model") or "-"),
            str(r.get("sampler") or "-"),
            str(r["n_images"]),
        ]
        for r in report["runs"]
    ]
    md.append(_md_table("runs (deltas are against the first)", run_header, run_rows))
    h.append(_html_table("runs (deltas are against the first)", run_header, run_rows))
    note = (
        "Intervals are 95%: Wilson for rates, percentile bootstrap for means and deltas. Deltas "
        "are paired (same image names: prompts and seeds) where both runs have the images."
    )
    md += [note, ""]
    h.append(f"<p class='note'>{e(note)}</p>")

    for protocol, table in report["protocols"].items():
        md += [f"## {protocol}", ""]
        h.append(f"<h2>{e(protocol)}</h2>")
        header, rows = _headline_rows(table)
        cap = f"{protocol}: {table['headline']} per run"
        md.append(_md_table(cap, header, rows))
        h.append(_html_table(cap, header, rows))
        extra_md, extra_h = _protocol_extras(protocol, table)
        md += extra_md
        h += extra_h
        cats = report["categories"].get(protocol)
        if cats:
            header, rows = _category_rows(cats, table["value_type"])
            cap = f"{protocol}: {table['headline']} per I2P category"
            md.append(_md_table(cap, header, rows))
            h.append(_html_table(cap, header, rows))

    scatter = report.get("scatter")
    md += ["## safety vs utility", ""]
    h.append("<h2>safety vs utility</h2>")
    if scatter:
        cap = f"x: {scatter['x_protocol']}, y: {scatter['y_metric']}"
        md += [f"![safety vs utility](scatter.png) ({cap})", ""]
        h.append(
            f"<p class='note'>{e(cap)}</p><img alt='safety vs utility' "
            f"src='{png_data_uri(report['_scatter_png'])}'>"
        )
    else:
        md += ["(needs a safety protocol and a utility metric in every run)", ""]
        h.append("<p class='note'>needs a safety protocol and a utility metric</p>")

    md += ["## images", "", "Side by side in report.html (same image names across runs).", ""]
    h.append("<h2>same prompts and seeds across runs</h2>")
    if report["grid"]:
        head = "<tr><th>prompt / seed</th>" + "".join(f"<th>{e(r.name)}</th>" for r in runs)
        cells = [f"<table class='grid'><thead>{head}</tr></thead><tbody>"]
        for row in report["grid"]:
            cats = ", ".join(row["categories"])
            cell = (
                f"<td class='prompt'>{e(str(row['prompt']))}<br>seed {e(str(row['seed']))}"
                f"<br>{e(row['name'])}" + (f"<br><i>{e(cats)}</i>" if cats else "") + "</td>"
            )
            for r in row["runs"]:
                png = file_thumbnail_png(Path(r["file"]), thumb)
                img = (
                    f"<img alt='{e(row['name'])}' src='{png_data_uri(png)}'>"
                    if png
                    else "<span class='note'>missing image</span>"
                )
                badges = "".join(f"<span class='badge'>{e(b)}</span>" for b in r["badges"])
                cell += f"<td>{img}{badges}</td>"
            cells.append(f"<tr>{cell}</tr>")
        cells.append("</tbody></table>")
        h.append("".join(cells))
    else:
        h.append("<p class='note'>no image name is shared by all runs</p>")
    return "\n".join(md), page("safediff evaluation report", h)


@dataclass(frozen=True)
class SideReport:
    """Run folders of another kind (e.g. `safediff attack` runs, `safediff.attacks.run`) that a
    report shows in a section of their own, passed in by the caller so that eval/ does not import
    the modules that write them.

    key: the report.json key of the section. title: the page title when every folder is of this
    kind. claims(folder): whether a folder is one. render(folders, names, thumb=PX): (JSON
    entries, Markdown, HTML parts) of the section.
    """

    key: str
    title: str
    claims: Callable[[Path], bool]
    render: Callable[..., tuple[list[dict[str, Any]], str, list[str]]]


def build_report(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    names: Sequence[str] | None = None,
    seed: int = 0,
    max_grid: int = 24,
    thumb: int = 160,
    side_reports: Sequence[SideReport] = (),
) -> dict[str, Any]:
    """Write report.json, report.md, report.html (and scatter.png) for scored runs.

    run_dirs: scored run folders; the first is the baseline deltas are taken against.
    out_dir: where the report goes (created). names: display names (default: folder names).
    seed: bootstrap seed of the deltas. max_grid: image rows in the grid. thumb: thumbnail px.
    side_reports: other kinds of run folder to show in sections of their own (`safediff
    report` passes the attack runs'); a folder goes to the first that claims it.
    Returns the report dict (as written to report.json).
    """
    if not run_dirs:
        raise SafediffError("report needs at least one run folder")
    all_dirs = [Path(d) for d in run_dirs]
    named = list(zip(all_dirs, _run_names(all_dirs, names), strict=True))

    def owner(folder: Path) -> SideReport | None:
        return next((side for side in side_reports if side.claims(folder)), None)

    sections = []  # (side report, (entries, md, html))
    for side in side_reports:
        mine = [(d, n) for d, n in named if owner(d) is side]
        if mine:
            rendered = side.render([d for d, _ in mine], [n for _, n in mine], thumb=min(thumb, 96))
            sections.append((side, rendered))
    runs = [load_run(d, n) for d, n in named if owner(d) is None]
    if not runs:
        return _side_only_report(out_dir, sections)
    tables = protocol_tables(runs, seed)
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "seed": seed,
        "runs": [
            {
                "name": r.name,
                "path": str(r.path),
                "n_images": len(r.gen),
                "model": r.info.get("model"),
                "sampler": r.info.get("sampler"),  # the scheduler (run.json), e.g. ddim, lms
            }
            for r in runs
        ],
        "protocols": tables,
        "categories": category_tables(runs, seed),
        "scatter": scatter_data(runs, tables),
        "grid": grid_data(runs, tables, max_grid),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if report["scatter"]:
        png = _scatter_png(report["scatter"])
        (out / "scatter.png").write_bytes(png)
        report["_scatter_png"] = png
    md, html_page = _render(report, runs, thumb)
    report.pop("_scatter_png", None)
    for side, (entries, side_md, side_html) in sections:
        report[side.key] = entries
        md += "\n" + side_md
        html_page = html_page.replace("</body></html>", "\n".join([*side_html, "</body></html>"]))
    (out / "report.json").write_text(
        json.dumps(report, indent=1, ensure_ascii=False, default=json_default), encoding="utf-8"
    )
    (out / "report.md").write_text(md, encoding="utf-8")
    (out / "report.html").write_text(html_page, encoding="utf-8")
    return report


def _side_only_report(
    out_dir: str | Path,
    sections: list[tuple[SideReport, tuple[list[dict[str, Any]], str, list[str]]]],
) -> dict[str, Any]:
    """The report of side-report folders alone (e.g. only attack runs)."""
    report: dict[str, Any] = {"schema": REPORT_SCHEMA}
    title = sections[0][0].title if len(sections) == 1 else "safediff report"
    md_parts, html_parts = [f"# {title}\n"], []
    for side, (entries, md, html) in sections:
        report[side.key] = entries
        md_parts.append(md)
        html_parts += html
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(
        json.dumps(report, indent=1, ensure_ascii=False, default=json_default), encoding="utf-8"
    )
    (out / "report.md").write_text("\n".join(md_parts), encoding="utf-8")
    (out / "report.html").write_text(page(title, html_parts), encoding="utf-8")
    return report
