"""``pinsface people --html``: one self-contained page, a row of face thumbnails per person and per cluster."""

from __future__ import annotations

import base64
import html
import io
from collections import defaultdict
from pathlib import Path

import numpy as np

THUMB = 96
# Photos decoded at most this long on the short side for thumbnails: enough for a 96-px face.
THUMB_DECODE_SIDE = 1000
THUMB_MAX_PIXELS = 50_000_000  # a photo over this (read from its header) gets no thumbnail


def face_crop(source: str, box: list[float], margin: float = 0.25) -> np.ndarray | None:
    """The face in ``box`` (x1, y1, x2, y2, full-resolution pixels) with ``margin`` of its size on each side,
    as RGB pixels, or None when the photo can no longer be read."""
    from pinsface.images import BadImage, load_scaled

    try:
        view = load_scaled(source, THUMB_MAX_PIXELS, THUMB_DECODE_SIDE)
    except BadImage:
        return None
    (x1, y1), (x2, y2) = view.from_full(np.asarray(box, float).reshape(2, 2))
    pad = margin * max(x2 - x1, y2 - y1)
    h, w = view.pixels.shape[:2]
    crop = view.pixels[int(max(0, y1 - pad)) : int(min(h, y2 + pad)), int(max(0, x1 - pad)) : int(min(w, x2 + pad))]
    return crop if crop.size else None


def thumbnail_jpeg(source: str, box: list[float], size: int = THUMB) -> bytes | None:
    """The face in ``box`` with a margin (``face_crop``) as a ``size``-px square JPEG, or None when the photo
    cannot be read."""
    from PIL import Image

    crop = face_crop(source, box)
    if crop is None:
        return None
    buffer = io.BytesIO()
    Image.fromarray(crop).resize((size, size)).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def thumbnail(source: str, box: list[float], size: int = THUMB) -> str | None:
    """A data URI of ``thumbnail_jpeg``, or None when the photo cannot be read."""
    data = thumbnail_jpeg(source, box, size)
    return None if data is None else "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


def groups(faces: list[dict]) -> list[tuple[str, list[dict]]]:
    """(title, faces) per person (by name) and per unnamed cluster, largest first; unclustered faces last."""
    named, clusters, loose = defaultdict(list), defaultdict(list), []
    for f in faces:
        if f["person"]:
            named[f["person"]].append(f)
        elif f["cluster"] is not None:
            clusters[f["cluster"]].append(f)
        else:
            loose.append(f)
    out = [(name, fs) for name, fs in sorted(named.items(), key=lambda kv: (-len(kv[1]), kv[0]))]
    out += [(f"cluster {c}", fs) for c, fs in sorted(clusters.items(), key=lambda kv: (-len(kv[1]), kv[0]))]
    if loose:
        out.append(("not clustered", loose))
    return out


def write_sheet(faces: list[dict], path, per_row: int = 12) -> Path:
    """Write the contact sheet of ``faces`` (``LibraryDB.face_list``) to ``path``, atomically."""
    import os
    import tempfile

    rows = []
    for title, fs in groups(faces):
        cells = []
        for f in fs[:per_row]:
            uri = thumbnail(f["source"], f["box"])
            label = html.escape(f"face {f['id']}: {f['source']}")
            cells.append(f'<img src="{uri}" title="{label}" alt="{label}">' if uri else '<span class="gone">?</span>')
        more = f'<span class="more">+{len(fs) - per_row}</span>' if len(fs) > per_row else ""
        rows.append(
            f"<tr><th>{html.escape(title)}<br><small>{len(fs)} face(s)</small></th><td>{''.join(cells)}{more}</td></tr>"
        )
    page = (
        '<!doctype html><html><head><meta charset="utf-8"><title>pinsface people</title><style>'
        "body{font-family:sans-serif;margin:1em}th{text-align:left;padding-right:1em;vertical-align:top;width:12em}"
        "img{width:96px;height:96px;margin:2px;border-radius:4px}td{padding:4px 0}.more{color:#666;margin-left:6px}"
        "tr{border-bottom:1px solid #ddd}table{border-collapse:collapse}</style></head><body>"
        f"<h1>People and clusters</h1><p>{len(faces)} faces</p><table>{''.join(rows)}</table></body></html>"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".people-", suffix=".html")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(page)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path
