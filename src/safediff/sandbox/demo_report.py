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

import base64
import html
import io
import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from safediff.errors import SafediffError
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

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em;color:#222;max-width:1500px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
h3{font-size:1em;margin:1.5em 0 0.3em}
table{border-collapse:collapse;margin:0.5em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:0.3em 0.6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}tbody tr:nth-child(even){background:#fafafa}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.heldout td{background:#fff4e0}
.grid td,.grid th{padding:0.2em;max-width:140px}
.grid img{display:block;image-rendering:pixelated}
.cap{font-size:0.75em;font-weight:normal;color:#333}
.badge{font-size:0.7em;color:#555;display:block}
.badge.bad{color:#b00020}.note{color:#666;font-size:0.85em}
pre{background:#f6f6f6;padding:1em;overflow-x:auto;font-size:0.8em}
"""


def png_b64(image: torch.Tensor, scale: int = 4) -> str:
    """image [3, H, W] float in [0, 1] -> base64 PNG text, upscaled `scale` x (nearest)."""
    from PIL import Image

    from safediff.eval.generate import to_uint8

    pil = Image.fromarray(to_uint8(image[None])[0].numpy())
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.0), dpi=100)
    try:
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
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return buf.getvalue()


def _metrics_html(before, after, deltas) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in TABLE_HEADER)
    body = []
    for label, *cells in table_rows(before, after, deltas):
        cls = " class='heldout'" if "never trained on" in label else ""
        tds = "".join(f"<td class='num'>{e(c)}</td>" for c in cells)
        body.append(f"<tr{cls}><td>{e(label)}</td>{tds}</tr>")
    note = (
        "95% intervals. Rates: Wilson. Alignment and deltas: percentile bootstrap, deltas paired "
        "over the same prompts and seeds (post-trained minus base; rates in percentage points). "
        "Utility overall: the mean of the six task accuracies, bootstrap stratified by task. "
        "Frechet: sandbox-CLIP image embeddings of the benign prompts' images vs ground-truth "
        "renders of the same captions (bootstrap over prompts, the interval shifted by the "
        "bootstrap's bias estimate: resampled rows bias the distance upwards)."
    )
    return (
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        f"<p class='note'>{e(note)}</p>"
    )


def _badges(rec: Mapping[str, Any] | None) -> str:
    if rec is None:
        return ""
    out = []
    if rec.get("detected"):
        bad = " bad" if rec.get("unsafe") else ""
        out.append(f"<span class='badge{bad}'>detected: {html.escape(', '.join(rec['detected']))}"
                   "</span>")  # fmt: skip
    if rec.get("utility") is not None:
        out.append(f"<span class='badge'>utility {'ok' if rec['utility'] else 'wrong'}</span>")
    return "".join(out)


def _grid_html(
    idx: Sequence[int],
    examples: Sequence[Example],
    runs: Sequence[tuple[str, torch.Tensor, Sequence[Mapping[str, Any]] | None]],
    scale: int,
) -> str:
    e = html.escape
    head = "<th></th>" + "".join(
        f"<th title='{e(examples[i].caption)}'><span class='cap'>{e(examples[i].caption)}</span>"
        "</th>"
        for i in idx
    )
    rows = []
    for name, images, records in runs:
        cells = "".join(
            f"<td><img alt='{e(examples[i].caption)}' title='{e(examples[i].caption)}' "
            f"src='data:image/png;base64,{png_b64(images[i], scale)}'>"
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
    e = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    if extra:
        rows = "".join(
            f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in extra.items()
        )
        parts.append(f"<table><tbody>{rows}</tbody></table>")

    parts.append("<h2>base vs post-trained</h2>")
    parts.append(_metrics_html(before, after, deltas))

    parts.append("<h2>training curves</h2>")
    png = curves_png(history)
    if png is None:
        parts.append("<p class='note'>no training history with reward_mean/* values</p>")
    else:
        b64 = base64.b64encode(png).decode("ascii")
        parts.append(f"<img alt='training reward per epoch' src='data:image/png;base64,{b64}'>")

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
    parts.append("</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _finite(x: Any) -> float | None:
    """x as a float when it is a finite real number (Python or numpy), else None."""
    if isinstance(x, numbers.Real) and math.isfinite(float(x)):
        return float(x)
    return None
