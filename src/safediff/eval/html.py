"""Report building blocks, shared by every report safediff writes (`safediff report`, the sandbox
demo's report.html, the defenses table): one page shell and style, tables in HTML and Markdown,
images and figures as inline base64 PNGs, and JSON for numbers that may be NaN.

Pages are self-contained: inline CSS, every image a data: URI, no script and no external URL.
Every text that reaches HTML goes through html.escape here, so callers pass plain text.
"""

import base64
import html
import io
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em;color:#222;max-width:1500px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
h3{font-size:1em;margin:1.5em 0 0.3em}
table{border-collapse:collapse;margin:0.5em 0;font-size:0.9em}
caption{text-align:left;font-weight:600;padding:0.3em 0}
th,td{border:1px solid #ccc;padding:0.3em 0.6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}tbody tr:nth-child(even){background:#fafafa}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.heldout td{background:#fff4e0}
.grid td,.grid th{padding:0.2em;max-width:180px}
.grid img{display:block;max-width:160px}.grid img.pixels{image-rendering:pixelated;max-width:none}
.cap{font-size:0.75em;font-weight:normal;color:#333}.prompt{font-size:0.85em}
.badge{font-size:0.7em;color:#555;display:block}
.badge.bad{color:#b00020}.note{color:#666;font-size:0.85em}
pre{background:#f6f6f6;padding:1em;overflow-x:auto;font-size:0.8em}
"""

e = html.escape


def page(title: str, body: Iterable[str]) -> str:
    """A whole HTML document: `title` (plain text) as <title> and <h1>, then the body parts
    (HTML) in order."""
    return "\n".join(
        [
            "<!DOCTYPE html><html><head><meta charset='utf-8'>",
            f"<title>{e(title)}</title><style>{CSS}</style></head><body>",
            f"<h1>{e(title)}</h1>",
            *body,
            "</body></html>",
        ]
    )


def html_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    caption: str | None = None,
    numeric: bool = False,
    row_classes: Sequence[str | None] | None = None,
) -> str:
    """An HTML table of plain-text cells; `numeric` right-aligns every cell but the first."""
    head = "".join(f"<th>{e(str(h))}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = row_classes[i] if row_classes else None
        tds = "".join(
            f"<td class='num'>{e(str(c))}</td>" if numeric and j else f"<td>{e(str(c))}</td>"
            for j, c in enumerate(row)
        )
        body.append(f"<tr class='{cls}'>{tds}</tr>" if cls else f"<tr>{tds}</tr>")
    cap = f"<caption>{e(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def facts_table(facts: Mapping[str, Any]) -> str:
    """A two-column table of name -> value (both shown as text)."""
    rows = "".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in facts.items())
    return f"<table><tbody>{rows}</tbody></table>"


def md_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], caption: str | None = None
) -> str:
    """A Markdown table ('|' in cells escaped), with an optional bold caption line above."""

    def esc(s: Any) -> str:
        return str(s).replace("|", "\\|")

    lines = [f"**{esc(caption)}**", ""] if caption else []
    lines.append("| " + " | ".join(esc(h) for h in header) + " |")
    lines.append("|" + "---|" * len(header))
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] float in [0, 1] -> [B, H, W, 3] uint8 on the CPU (x * 255, rounded): how
    every image safediff saves or shows is quantised."""
    return (
        (images.detach().float().clamp(0, 1) * 255)
        .round()
        .to(torch.uint8)
        .permute(0, 2, 3, 1)
        .cpu()
    )


def tensor_png(image: torch.Tensor, scale: int = 1) -> bytes:
    """image [3, H, W] float in [0, 1] -> PNG bytes, upscaled `scale` x (nearest neighbour, so
    small images keep crisp pixels)."""
    from PIL import Image

    pil = Image.fromarray(to_uint8(image[None])[0].numpy())
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def file_thumbnail_png(path: Path, size: int) -> bytes | None:
    """A PNG thumbnail (longest side `size`) of an image file, None when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
    except (FileNotFoundError, UnidentifiedImageError, OSError):
        return None
    return buf.getvalue()


def figure_png(fig: Any) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return buf.getvalue()


def new_figure(width: float, height: float, dpi: int = 100) -> tuple[Any, Any]:
    """(fig, ax) on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=dpi)


def json_default(obj: Any) -> Any:
    """`json.dumps(default=...)` for reports: an Estimate (anything with to_dict) as its dict
    (NaN as null), a Path as text, a tensor or array as a list, a numpy / torch scalar as a
    number."""
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor | np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic) or hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
