"""One self-contained HTML page per evaluation: summary, figures, a sortable table and written insights."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>'
        f"{html.escape(alt)}</figcaption></figure>"
    )


def _stat(value) -> str:
    """A dataset figure as a person reads it: counts by reason for a mapping, "none" when empty."""
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "none"
    return str(value)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def insights(
    metrics: dict, confusions: list[tuple[str, str, int]], train_counts: dict[str, int], compare: dict | None
) -> list[str]:
    """Plain-language findings computed from the numbers (HTML fragments)."""
    out = []
    if metrics.get("saved_model"):
        out.append(f"These figures describe {html.escape(metrics['saved_model'])}.")
    scored = [(name, v) for name, v in metrics["per_identity"].items() if v["support"] > 0]
    out.append(_hardest_identities(scored, confusions))
    if confusions:
        pairs = "; ".join(f"{html.escape(t)} &rarr; {html.escape(p)} ({c})" for t, p, c in confusions[:5])
        out.append(f"Most frequent confusions (true &rarr; predicted): {pairs}.")
    out.append(_error_sources(metrics))
    if train_counts:
        names = [n for n, _ in scored if n in train_counts]
        if len(names) >= 8:
            out.append(_class_size_effect(names, metrics["per_identity"], train_counts))
    if compare:
        diff = metrics["top1"] - compare["top1"]
        out.append(
            f"Compared with <b>{html.escape(compare['name'])}</b> ({html.escape(compare['model'])}): top-1 "
            f"{_pct(metrics['top1'])} vs {_pct(compare['top1'])} ({100 * diff:+.2f} points), macro-F1 "
            f"{metrics['macro_f1']:.4f} vs {compare['macro_f1']:.4f}."
        )
    return out


def _hardest_identities(scored: list[tuple[str, dict]], confusions: list[tuple[str, str, int]]) -> str:
    """The five identities with the lowest F1, each with whom it is most often taken for."""
    hardest = sorted(scored, key=lambda kv: (kv[1]["f1"], kv[0]))[:5]
    worst_with = {}
    for true, pred, count in confusions:
        worst_with.setdefault(true, (pred, count))
    items = []
    for name, v in hardest:
        extra = ""
        if name in worst_with:
            extra = f", most often taken for <b>{html.escape(worst_with[name][0])}</b> ({worst_with[name][1]}x)"
        items.append(f"<b>{html.escape(name)}</b> (F1 {v['f1']:.3f}, recall {v['recall']:.3f}{extra})")
    return "Hardest identities: " + "; ".join(items) + "."


def _error_sources(metrics: dict) -> str:
    """How many errors come from detection (no face scored) and how many from recognition."""
    errors = metrics["n_images"] - round(metrics["top1"] * metrics["n_images"])
    if not errors:
        return "No errors on this set."
    unscored = metrics["n_images"] - metrics["n_scored"]
    recognition = errors - unscored
    return (
        f"Of {errors} errors, {unscored} come from detection (no face could be scored, "
        f"{metrics['n_no_face']} images had no face found by MTCNN, "
        f"{metrics.get('n_no_face_scored_by_fallback', 0)} of those were aligned by the mean-landmark fallback "
        f"and scored) and {recognition} from recognition (a face was scored but named wrongly). "
        f"Accuracy over scored faces alone is {_pct(metrics['top1_over_faces'])}."
    )


def _class_size_effect(names: list[str], per_identity: dict, train_counts: dict[str, int]) -> str:
    """Whether identities with more training images are recognised better: recall of the smallest and largest
    quarters, and the correlation of training-set size with recall."""
    counts = np.array([train_counts[n] for n in names], dtype=float)
    recall = np.array([per_identity[n]["recall"] for n in names])
    q1, q3 = np.quantile(counts, [0.25, 0.75])
    small, large = recall[counts <= q1].mean(), recall[counts >= q3].mean()
    corr = float(np.corrcoef(counts, recall)[0, 1]) if counts.std() > 0 and recall.std() > 0 else 0.0
    if corr > 0.2:
        verdict = "Larger classes do somewhat better."
    elif abs(corr) <= 0.2:
        verdict = "Class size has little effect on recall."
    else:
        verdict = "Smaller classes do better here."
    return (
        f"Class size: identities with at most {q1:.0f} training images have mean recall {_pct(small)}, "
        f"those with at least {q3:.0f} have {_pct(large)} (correlation of training-set size with recall: "
        f"{corr:+.2f}). " + verdict
    )


TABLE_SCRIPT = """
function sortTable(col, numeric) {
  const table = document.getElementById('report-table');
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  const dir = table.dataset.sortCol == col && table.dataset.sortDir == 'asc' ? 'desc' : 'asc';
  rows.sort((a, b) => {
    let x = a.cells[col].dataset.v ?? a.cells[col].textContent, y = b.cells[col].dataset.v ?? b.cells[col].textContent;
    if (numeric) { x = parseFloat(x); y = parseFloat(y); }
    return (x < y ? -1 : x > y ? 1 : 0) * (dir == 'asc' ? 1 : -1);
  });
  rows.forEach(r => body.appendChild(r));
  table.dataset.sortCol = col; table.dataset.sortDir = dir;
}
function filterTable() {
  const q = document.getElementById('search').value.toLowerCase();
  for (const row of document.getElementById('report-table').tBodies[0].rows)
    row.style.display = row.cells[0].textContent.toLowerCase().includes(q) ? '' : 'none';
}
"""

STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 2rem auto; max-width: 1500px;
       padding: 0 1rem; color: #222; }
h1 { margin-bottom: .2rem; } .headline { font-size: 1.4rem; margin: .5rem 0 1.2rem; }
.cards { display: flex; flex-wrap: wrap; gap: .8rem; margin-bottom: 1rem; }
.card { background: #f4f6f8; border-radius: 8px; padding: .6rem 1rem; min-width: 9rem; }
.card b { display: block; font-size: 1.3rem; }
figure { margin: 1rem 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: .9rem; }
table { border-collapse: collapse; font-size: .9rem; } th, td { padding: .25rem .6rem; border-bottom: 1px solid #eee; }
th { cursor: pointer; background: #f4f6f8; position: sticky; top: 0; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
#search { padding: .4rem; width: 20rem; margin: .5rem 0; }
.tablewrap { max-height: 32rem; overflow-y: auto; border: 1px solid #ddd; display: inline-block; }
details pre { background: #f7f7f7; padding: .8rem; overflow-x: auto; }
li { margin: .35rem 0; }
"""


def _identity_rows(per_identity: dict) -> str:
    """The classification table's rows, one per identity by name, each number with its sort value."""
    rows = []
    for name, v in sorted(per_identity.items()):
        rows.append(
            f"<tr><td>{html.escape(name)}</td>"
            + "".join(f'<td class="n" data-v="{v[k]}">{v[k]:.4f}</td>' for k in ("precision", "recall", "f1"))
            + f'<td class="n" data-v="{v["support"]}">{v["support"]}</td></tr>'
        )
    return "".join(rows)


def _cards(metrics: dict) -> str:
    """The headline figures, one card each."""
    cards = [
        ("top-1", _pct(metrics["top1"])),
        ("top-5", _pct(metrics["top5"])),
        ("macro-F1", f"{metrics['macro_f1']:.4f}"),
        ("images", str(metrics["n_images"])),
        ("no face found", str(metrics["n_no_face"])),
        ("unreadable", str(metrics["n_unreadable"])),
        ("top-1 over scored faces", _pct(metrics["top1_over_faces"])),
    ]
    return "".join(f'<div class="card">{html.escape(k)}<b>{html.escape(v)}</b></div>' for k, v in cards)


def _unknown_identities(metrics: dict) -> str:
    """A paragraph naming the folders of identities the run does not know, or nothing."""
    unknown = metrics.get("unknown_identities") or {}
    if not unknown:
        return ""
    return (
        "<p><b>Identities this run does not know</b> (reported, not scored): "
        + ", ".join(f"{html.escape(k)} ({v} images)" for k, v in unknown.items())
        + "</p>"
    )


def write_html(
    path: Path,
    metrics: dict,
    settings: dict,
    *,
    dataset_stats: dict,
    timings: dict,
    figures: list[tuple[Path, str]],
    insight_lines: list[str],
) -> Path:
    """Write the evaluation page to ``path``: headline figures, insights, dataset, timings, ``figures`` (embedded),
    the sortable classification table and the run's settings."""
    stats_rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(_stat(v))}</td></tr>" for k, v in dataset_stats.items()
    )
    timing_rows = "".join(f"<tr><td>{html.escape(k)}</td><td class='n'>{v:.1f} s</td></tr>" for k, v in timings.items())
    config_text = html.escape(json.dumps(settings, indent=1, ensure_ascii=False))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pinsface evaluation</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>
<body>
<h1>pinsface evaluation</h1>
<div class="headline">Top-1 accuracy <b>{_pct(metrics["top1"])}</b> on {metrics["n_images"]} images of
{html.escape(str(metrics.get("data", "the test split")))} &mdash; model <b>{html.escape(settings.get("model", "?"))}</b>
</div>
<div class="cards">{_cards(metrics)}</div>
<p>Accuracy counts every image: one where no face was found or that could not be read is an error.</p>
{_unknown_identities(metrics)}
<h2>Insights</h2>
<ul>{"".join(f"<li>{line}</li>" for line in insight_lines)}</ul>
<h2>Dataset</h2><table>{stats_rows}</table>
<h2>Timings</h2><table>{timing_rows}</table>
<h2>Figures</h2>
{"".join(_img(p, alt) for p, alt in figures)}
<h2>Classification report</h2>
<input id="search" placeholder="Filter identities..." oninput="filterTable()">
<div class="tablewrap"><table id="report-table"><thead><tr>
<th onclick="sortTable(0,false)">identity &#x2195;</th><th onclick="sortTable(1,true)">precision &#x2195;</th>
<th onclick="sortTable(2,true)">recall &#x2195;</th><th onclick="sortTable(3,true)">F1 &#x2195;</th>
<th onclick="sortTable(4,true)">support &#x2195;</th></tr></thead>
<tbody>{_identity_rows(metrics["per_identity"])}</tbody></table></div>
<p>Macro average: precision {metrics["macro_precision"]:.4f}, recall {metrics["macro_recall"]:.4f},
F1 {metrics["macro_f1"]:.4f}.</p>
<h2>Run settings</h2>
<details><summary>config.json</summary><pre>{config_text}</pre></details>
<script>{TABLE_SCRIPT}</script>
</body></html>
"""
    Path(path).write_text(page, encoding="utf-8")
    return Path(path)
