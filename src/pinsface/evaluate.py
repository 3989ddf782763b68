"""Judge a trained run on its test split or on any labelled folder."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from pinsface.dataset import Split, identity_key, scan_dataset
from pinsface.prepare import Prepared, prepare
from pinsface.settings import Settings

log = logging.getLogger(__name__)


def load_run(run_dir: str | Path, model=None):
    """(settings, labels, model) of a run folder."""
    import keras

    import pinsface.layers  # noqa: F401  (registers the custom layers for safe loading)

    run_dir = Path(run_dir)
    settings = Settings.load(run_dir / "config.json")
    labels = json.loads((run_dir / "labels.json").read_text(encoding="utf-8"))
    if model is None:
        model = keras.saving.load_model(run_dir / "model.keras", safe_mode=True, compile=False)
    return settings, labels, model


def score_images(model, settings: Settings, prepared: Prepared, items: np.ndarray,
                 progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities for dataset positions ``items`` and a mask of those that had a face to score.

    For the embedding model this runs the saved head on cached backbone embeddings (computing any that are
    missing), which is what the whole saved network computes from the aligned crop, at a fraction of the cost.
    """
    from pinsface.train import usable_status

    ok = usable_status(settings)
    usable = np.array([prepared.status[i] in ok for i in items], dtype=bool)
    n_classes = model.output_shape[-1]
    probs = np.zeros((len(items), n_classes), dtype=np.float32)
    hashes = [prepared.hashes[i] for i in items[usable]]
    if not hashes:
        return probs, usable
    if settings.model == "embedding":
        from pinsface.backbones import get_backbone
        from pinsface.cache import EmbeddingCache
        from pinsface.embeddings import Embedder, ensure_embeddings

        emb_cache = EmbeddingCache(prepared.cache.root, settings.faces.version(), settings.backbone)
        index, _, _ = emb_cache.load(hashes)
        faces = None
        embedder = None
        if any(h not in index for h in hashes):
            faces = prepared.cache.load(hashes, crops=("aligned",))
            embedder = Embedder(get_backbone(settings.backbone), settings.embed_batch_size)
        emb, emb_flip = ensure_embeddings(hashes, faces, emb_cache, embedder, progress)
        head = model.get_layer("head")
        p = head.predict(emb, batch_size=1024, verbose=0)
        if settings.test_time_flip:
            p = (p + head.predict(emb_flip, batch_size=1024, verbose=0)) / 2
    else:
        faces = prepared.cache.load(hashes, crops=("box",))
        p = model.predict(faces.columns["box"][faces.rows(hashes)][..., None], batch_size=512, verbose=0)
    probs[usable] = p
    return probs, usable


def topk_correct(probs: np.ndarray, usable: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    top = np.argsort(-probs, axis=1)[:, :k]
    return usable & (top == y[:, None]).any(axis=1)


def compute_metrics(probs: np.ndarray, usable: np.ndarray, y: np.ndarray, labels: list[str],
                    status: list[str]) -> dict:
    """Accuracy over all images (no face / unreadable count as errors) plus per-identity figures."""
    from sklearn.metrics import precision_recall_fscore_support

    pred = np.where(usable, np.argmax(probs, axis=1), -1)
    known = y >= 0
    n_classes = len(labels)
    p, r, f, s = precision_recall_fscore_support(y[known], pred[known], labels=list(range(n_classes)),
                                                 zero_division=0)
    per_identity = {labels[i]: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                                "support": int(s[i])} for i in range(n_classes)}
    present = s > 0
    n_unreadable = sum(1 for st in status if st not in ("ok", "no_face"))
    return {
        "top1": float(np.mean(pred[known] == y[known])) if known.any() else 0.0,
        "top5": float(np.mean(topk_correct(probs, usable, y, 5)[known])) if known.any() else 0.0,
        "top1_over_faces": float(np.mean(pred[known & usable] == y[known & usable])) if (known & usable).any()
        else 0.0,
        "macro_precision": float(p[present].mean()) if present.any() else 0.0,
        "macro_recall": float(r[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f[present].mean()) if present.any() else 0.0,
        "n_images": int(known.sum()),
        "n_scored": int((known & usable).sum()),
        "n_no_face": sum(1 for st, k in zip(status, known) if k and st == "no_face"),
        "n_no_face_scored_by_fallback": int(sum(1 for st, k, u in zip(status, known, usable)
                                                if k and u and st == "no_face")),
        "n_unreadable": n_unreadable,
        "per_identity": per_identity,
    }


def evaluate(run_dir: str | Path, data: str | Path | None = None, out: str | Path | None = None,
             prepared: Prepared | None = None, progress: bool = True, model=None) -> dict:
    """Score a run on its own test split (default) or on every image of a labelled folder ``data``."""
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    settings, labels, model = load_run(run_dir, model)
    out = Path(out) if out else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    label_of = {identity_key(name): i for i, name in enumerate(labels)}

    if data is None:
        if prepared is None:
            prepared = prepare(settings.data_dir, settings.cache_dir, settings.faces,
                               batch_size=settings.detect_batch_size, progress=progress)
        split = Split.load(run_dir / "split.json")
        test = set(split.files("test"))
        items = np.array([i for i, it in enumerate(prepared.dataset.items) if it.rel in test], dtype=np.int64)
        unknown_folders: dict[str, int] = {}
    else:
        dataset = scan_dataset(data)
        prepared = prepare(dataset.root, settings.cache_dir, settings.faces, batch_size=settings.detect_batch_size,
                           progress=progress, dataset=dataset)
        counts = dataset.counts()
        unknown_folders = {name: counts[name] for name in dataset.identities if identity_key(name) not in label_of}
        for name, count in unknown_folders.items():
            log.warning("identity %r (%d images) is not known to this run: reported, not scored", name, count)
        items = np.array([i for i, it in enumerate(prepared.dataset.items)
                          if identity_key(it.identity) in label_of], dtype=np.int64)
    y = np.array([label_of[identity_key(prepared.dataset.items[i].identity)] for i in items], dtype=np.int64)
    t1 = time.perf_counter()
    probs, usable = score_images(model, settings, prepared, items, progress)
    t2 = time.perf_counter()
    metrics = compute_metrics(probs, usable, y, labels, [prepared.status[i] for i in items])
    metrics["unknown_identities"] = unknown_folders
    metrics["data"] = str(prepared.dataset.root) if data is not None else "test split"
    metrics["seconds"] = {"prepare": round(t1 - t0, 2), "score": round(t2 - t1, 2)}
    write_reports(out, metrics, labels)
    metrics["seconds"]["total"] = round(time.perf_counter() - t0, 2)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return metrics


def write_reports(out: Path, metrics: dict, labels: list[str]) -> None:
    """classification_report.txt and .csv: per identity, then macro and weighted averages."""
    import csv

    rows = [(name, v["precision"], v["recall"], v["f1"], v["support"]) for name, v in metrics["per_identity"].items()]
    support = np.array([r[4] for r in rows], dtype=np.float64)
    present = support > 0
    cols = np.array([[r[1], r[2], r[3]] for r in rows])
    macro = cols[present].mean(0) if present.any() else np.zeros(3)
    weighted = (cols * support[:, None]).sum(0) / max(support.sum(), 1)
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{'identity':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    lines += [f"{r[0]:<{width}}{r[1]:>10.4f}{r[2]:>10.4f}{r[3]:>10.4f}{r[4]:>10d}" for r in rows]
    lines.append("")
    lines.append(f"{'accuracy':<{width}}{'':>10}{'':>10}{metrics['top1']:>10.4f}{metrics['n_images']:>10d}")
    lines.append(f"{'macro avg':<{width}}{macro[0]:>10.4f}{macro[1]:>10.4f}{macro[2]:>10.4f}{int(support.sum()):>10d}")
    lines.append(f"{'weighted avg':<{width}}{weighted[0]:>10.4f}{weighted[1]:>10.4f}{weighted[2]:>10.4f}"
                 f"{int(support.sum()):>10d}")
    (out / "classification_report.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(out / "classification_report.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["identity", "precision", "recall", "f1", "support"])
        for r in rows:
            writer.writerow([r[0], f"{r[1]:.6f}", f"{r[2]:.6f}", f"{r[3]:.6f}", r[4]])
        writer.writerow(["macro avg", *(f"{v:.6f}" for v in macro), int(support.sum())])
        writer.writerow(["weighted avg", *(f"{v:.6f}" for v in weighted), int(support.sum())])
