"""``capcli evaluate --report DIR``: one self-contained ``index.html`` of the evaluated images.

Each row holds the image as the model saw it (embedded as a PNG data URI, so the page needs
no network and no files beside it), the generated caption, the baseline's caption when there
is one, the references, and the per-image CIDEr-D and CLIP score. On ``synthetic`` the
grounding errors (objects, attributes, counts, relations the caption gets wrong) are listed
in red under the caption. Clicking a column header sorts by it; the page opens sorted by
CIDEr-D, worst first.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image


@dataclass
class GalleryRow:
    pixels: torch.Tensor  # (3, H, W) uint8
    caption: str
    references: list[str]
    cider: float
    clip: float
    errors: list[str] = field(default_factory=list)
    baseline: str | None = None
    baseline_clip: float | None = None


THUMBNAIL = 128  # pixels: what the page shows; larger inputs (224 px) are shrunk to keep the page small


def _data_uri(pixels: torch.Tensor) -> str:
    buf = io.BytesIO()
    image = Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())
    if max(image.size) > THUMBNAIL:
        image.thumbnail((THUMBNAIL, THUMBNAIL), Image.Resampling.LANCZOS)
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _number(value: object) -> str:
    return "" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: 6px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; cursor: pointer; position: sticky; top: 0; }
th.sorted::after { content: attr(data-arrow); }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { width: 128px; height: 128px; }
ul { margin: 0; padding-left: 1.2em; color: #555; }
.errors { color: #b00020; font-size: 0.9em; }
.meta { color: #555; }
"""

# Sorting and a self-check the browser test reads: the row count, and any script error.
_SCRIPT = """
window.addEventListener("error", e => { document.body.dataset.errors = (document.body.dataset.errors || "") + e.message + ";"; });
function sortBy(column, descending) {
  const body = document.querySelector("tbody");
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    const x = a.cells[column].dataset.value, y = b.cells[column].dataset.value;
    const numeric = a.cells[column].classList.contains("num");  // text columns sort as text, "10 ..." after "2 ..."
    const order = numeric ? (parseFloat(x) || 0) - (parseFloat(y) || 0) : x.localeCompare(y);
    return descending ? -order : order;
  });
  rows.forEach(r => body.appendChild(r));
  document.querySelectorAll("th").forEach((th, i) => {
    th.classList.toggle("sorted", i === column);
    th.dataset.arrow = descending ? " \\u25BC" : " \\u25B2";
  });
}
document.querySelectorAll("th").forEach((th, i) => {
  th.addEventListener("click", () => {
    const descending = th.dataset.desc !== "1";
    th.dataset.desc = descending ? "1" : "0";
    sortBy(i, descending);
  });
});
sortBy(SORT_COLUMN, false);
document.body.dataset.rows = String(document.querySelectorAll("tbody tr").length);
"""


def write_gallery(directory: Path, rows: list[GalleryRow], title: str, summary: dict[str, object]) -> Path:
    """Write ``directory/index.html`` and return its path."""
    has_baseline = any(row.baseline is not None for row in rows)
    headers = ["#", "image", "caption", *(["baseline caption", "baseline CLIP"] if has_baseline else []),
               "references", "CIDEr-D", "CLIP score", "errors"]
    sort_column = headers.index("CIDEr-D")
    body = []
    for i, row in enumerate(rows):
        errors = "".join(f"<li>{html.escape(e)}</li>" for e in row.errors)
        cells = [
            f'<td class="num" data-value="{i}">{i}</td>',
            f'<td data-value="{i}"><img alt="image {i}" src="{_data_uri(row.pixels)}"></td>',
            f'<td data-value="{html.escape(row.caption)}">{html.escape(row.caption)}'
            + (f'<ul class="errors">{errors}</ul>' if errors else "") + "</td>",
        ]
        if has_baseline:
            cells += [f'<td data-value="{html.escape(row.baseline or "")}">{html.escape(row.baseline or "")}</td>',
                      f'<td class="num" data-value="{_number(row.baseline_clip)}">{_number(row.baseline_clip)}</td>']
        refs = "".join(f"<li>{html.escape(r)}</li>" for r in row.references)
        cells += [f'<td data-value="{html.escape(row.references[0] if row.references else "")}"><ul>{refs}</ul></td>',
                  f'<td class="num" data-value="{row.cider:.6f}">{row.cider:.3f}</td>',
                  f'<td class="num" data-value="{row.clip:.6f}">{row.clip:.3f}</td>',
                  f'<td class="num" data-value="{len(row.errors)}">{len(row.errors)}</td>']
        body.append("<tr>" + "".join(cells) + "</tr>")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="meta">{html.escape(" · ".join(f"{k} {_number(v)}" for k, v in summary.items()))}</p>
<p class="meta">Click a column to sort by it; the page opens with the lowest CIDEr-D first.</p>
<table><thead><tr>{"".join(f"<th>{html.escape(h)}</th>" for h in headers)}</tr></thead>
<tbody>
{chr(10).join(body)}
</tbody></table>
<script>{_SCRIPT.replace("SORT_COLUMN", str(sort_column))}</script>
</body></html>
"""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
