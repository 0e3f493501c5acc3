"""The sandbox demo's report: one self-contained HTML file.

Contents, top to bottom: the run's facts (`extra`), the metrics table (base | post-trained |
paired delta, 95% intervals, as `demo_eval.format_table`), the training curves (every
`reward_mean/*` key of the per-epoch history against the epoch, a matplotlib PNG), before / after
image grids per prompt group (explicit unsafe per family, the other unsafe kinds, negations,
benign prompts per utility task; same prompt and seed in each column), and the run's config.

Self-contained: inline CSS, every image a base64 PNG in a data: URI, no script and no external
URL. 32 px images are upscaled with nearest-neighbour (and CSS `image-rendering: pixelated`) so
their pixels stay crisp. All prompt and config text is escaped with html.escape.
"""

import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from safediff.errors import SafediffError
from safediff.eval.html import (
    e,
    facts_table,
    figure_png,
    html_table,
    new_figure,
    page,
    png_data_uri,
    tensor_png,
)
from safediff.sandbox.captions import HELD_OUT_FAMILY, TASKS, Example
from safediff.sandbox.demo_eval import (
    OTHER_UNSAFE_KINDS,
    TABLE_HEADER,
    example_group,
    table_rows,
)
from safediff.sandbox.scene import FAMILIES

GRID_GROUPS: tuple[tuple[str, str], ...] = (
    *((f"explicit/{f}", f"explicit: {f}" + (" (never trained on)" if f == HELD_OUT_FAMILY else ""))
      for f in FAMILIES),
    *((k, k.replace("_", "-")) for k in OTHER_UNSAFE_KINDS),
    ("negation", "negation (benign)"),
    *((f"safe/{t}", f"benign: {t}") for t in TASKS),
)  # fmt: skip
"""(group key of `demo_eval.example_group`, heading) in report order."""

def curve_keys(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """The `reward_mean/*` keys of a per-epoch history, in first-seen order."""
    keys = dict.fromkeys(k for h in history for k in h if str(k).startswith("reward_mean/"))
    return list(keys)


def curves_png(history: Sequence[Mapping[str, Any]]) -> bytes | None:
    """PNG of every `reward_mean/*` key against the epoch (None when there is nothing to plot).

    Epoch: the record's "epoch", else its position in `history`. Missing or non-finite values
    are skipped."""
    keys = curve_keys(history)
    if not keys:
        return None
    fig, ax = new_figure(7.0, 4.0)
    for key in keys:
        pts = [
            (float(h.get("epoch", i)), _finite(h.get(key)))
            for i, h in enumerate(history)
            if _finite(h.get(key)) is not None
        ]
        if pts:
            x, y = zip(*pts, strict=True)
            ax.plot(x, y, marker="o", markersize=3, label=key.removeprefix("reward_mean/"))
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean reward")
    ax.set_title("training reward per epoch")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return figure_png(fig)


def _metrics_html(before, after, deltas) -> str:
    rows = table_rows(before, after, deltas)
    classes = ["heldout" if "never trained on" in row[0] else None for row in rows]
    note = (
        "95% intervals. Rates: Wilson. Alignment and deltas: percentile bootstrap, deltas paired "
        "over the same prompts and seeds (post-trained minus base; rates in percentage points). "
        "Utility overall: the mean of the six task accuracies, bootstrap stratified by task. "
        "Frechet: sandbox-CLIP image embeddings of the benign prompts' images vs ground-truth "
        "renders of the same captions (normal bootstrap interval over prompts: resampled rows "
        "bias the distance upwards, so the resamples' spread is kept, not their position)."
    )
    table = html_table(TABLE_HEADER, rows, numeric=True, row_classes=classes)
    return f"{table}<p class='note'>{e(note)}</p>"


def _badges(rec: Mapping[str, Any] | None) -> str:
    if rec is None:
        return ""
    out = []
    if rec.get("detected"):
        bad = " bad" if rec.get("unsafe") else ""
        out.append(f"<span class='badge{bad}'>detected: {e(', '.join(rec['detected']))}</span>")
    if rec.get("utility") is not None:
        out.append(f"<span class='badge'>utility {'ok' if rec['utility'] else 'wrong'}</span>")
    return "".join(out)


def _grid_html(
    idx: Sequence[int],
    examples: Sequence[Example],
    runs: Sequence[tuple[str, torch.Tensor, Sequence[Mapping[str, Any]] | None]],
    scale: int,
) -> str:
    head = "<th></th>" + "".join(
        f"<th title='{e(examples[i].caption)}'><span class='cap'>{e(examples[i].caption)}</span>"
        "</th>"
        for i in idx
    )
    rows = []
    for name, images, records in runs:
        cells = "".join(
            f"<td><img class='pixels' alt='{e(examples[i].caption)}' "
            f"title='{e(examples[i].caption)}' src='{png_data_uri(tensor_png(images[i], scale))}'>"
            f"{_badges(records[i] if records is not None else None)}</td>"
            for i in idx
        )
        rows.append(f"<tr><th>{e(name)}</th>{cells}</tr>")
    return (
        f"<table class='grid'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def write_report(
    path: str | Path,
    *,
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    deltas: Mapping[str, Any],
    images_before: torch.Tensor,
    images_after: torch.Tensor,
    examples: Sequence[Example],
    history: Sequence[Mapping[str, Any]],
    config_text: str,
    title: str,
    extra: Mapping[str, Any] | None = None,
    records_before: Sequence[Mapping[str, Any]] | None = None,
    records_after: Sequence[Mapping[str, Any]] | None = None,
    max_per_group: int = 8,
    scale: int = 4,
) -> Path:
    """Write the demo's report to `path` (one HTML file; parent folders are created).

    before / after / deltas: metric key -> Estimate (or its to_dict()), from demo_eval.summarize /
        compare. images_before / images_after: [N, 3, H, W] in [0, 1], image i for examples[i].
    history: per-epoch dicts; every "reward_mean/*" key is plotted against "epoch".
    config_text: shown verbatim in a <pre>. extra: more facts for the header table.
    records_before / records_after: optional `Scored.records` of each run; each image then shows
        what the detector found and whether its utility task was met.
    max_per_group: images shown per prompt group (the group's first ones). scale: upscaling.
    Returns the path written.
    """
    n = len(examples)
    for name, imgs in (("images_before", images_before), ("images_after", images_after)):
        if imgs.ndim != 4 or imgs.shape[0] != n:
            raise SafediffError(
                f"{name} has shape {tuple(imgs.shape)}; expected [{n}, 3, H, W], one per example"
            )
    for name, recs in (("records_before", records_before), ("records_after", records_after)):
        if recs is not None and len(recs) != n:
            raise SafediffError(f"{name} has {len(recs)} records for {n} examples")
    parts = [facts_table(extra)] if extra else []
    parts.append("<h2>base vs post-trained</h2>")
    parts.append(_metrics_html(before, after, deltas))

    parts.append("<h2>training curves</h2>")
    png = curves_png(history)
    if png is None:
        parts.append("<p class='note'>no training history with reward_mean/* values</p>")
    else:
        parts.append(f"<img alt='training reward per epoch' src='{png_data_uri(png)}'>")

    parts.append("<h2>images: same prompt and seed, base (top) vs post-trained (bottom)</h2>")
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(example_group(ex.metadata), []).append(i)
    runs = [("base", images_before, records_before), ("post-trained", images_after, records_after)]
    for key, heading in GRID_GROUPS:
        idx = groups.get(key, [])[: max(0, max_per_group)]
        if idx:
            shown = f" ({len(idx)} of {len(groups[key])})"
            parts.append(f"<h3>{e(heading + shown)}</h3>")
            parts.append(_grid_html(idx, examples, runs, scale))

    parts.append("<h2>config</h2>")
    parts.append(f"<pre>{e(config_text)}</pre>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page(title, parts), encoding="utf-8")
    return path


def _finite(x: Any) -> float | None:
    """x as a float when it is a finite real number (Python or numpy), else None."""
    if isinstance(x, numbers.Real) and math.isfinite(float(x)):
        return float(x)
    return None
