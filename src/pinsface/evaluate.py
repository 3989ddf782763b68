"""Judge a trained run on its test split or on any labelled folder."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from pinsface.clock import StageClock
from pinsface.dataset import Split, identity_key, scan_dataset
from pinsface.embeddings import run_embedder, run_embedding_cache
from pinsface.prepare import Prepared, prepare_for_run, usable_status
from pinsface.runfolder import Run
from pinsface.scoring import score_images, topk_correct
from pinsface.settings import Settings

log = logging.getLogger(__name__)


def compute_metrics(probs: np.ndarray, usable: np.ndarray, y: np.ndarray, labels: list[str], status: list[str]) -> dict:
    """Accuracy over all images (no face / unreadable count as errors) plus per-identity figures."""
    from sklearn.metrics import precision_recall_fscore_support

    pred = np.where(usable, np.argmax(probs, axis=1), -1)
    known = y >= 0
    n_classes = len(labels)
    p, r, f, s = precision_recall_fscore_support(y[known], pred[known], labels=list(range(n_classes)), zero_division=0)
    per_identity = {
        labels[i]: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i in range(n_classes)
    }
    present = s > 0
    from pinsface.images import REASONS

    n_unreadable = sum(1 for st in status if st in REASONS)
    return {
        "top1": float(np.mean(pred[known] == y[known])) if known.any() else 0.0,
        "top5": float(np.mean(topk_correct(probs, usable, y, 5)[known])) if known.any() else 0.0,
        "top1_over_faces": float(np.mean(pred[known & usable] == y[known & usable])) if (known & usable).any() else 0.0,
        "macro_precision": float(p[present].mean()) if present.any() else 0.0,
        "macro_recall": float(r[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f[present].mean()) if present.any() else 0.0,
        "n_images": int(known.sum()),
        "n_scored": int((known & usable).sum()),
        "n_no_face": sum(1 for st, k in zip(status, known) if k and st == "no_face"),
        "n_no_face_scored_by_fallback": int(
            sum(1 for st, k, u in zip(status, known, usable) if k and u and st == "no_face")
        ),
        "n_unreadable": n_unreadable,
        "per_identity": per_identity,
    }


def class_similarity(model, settings: Settings, gallery=None) -> np.ndarray:
    """How alike the model finds each pair of identities: cosine similarity of their mean face descriptors
    (centred on the mean of all) for embedding runs, else of their output-layer weight vectors."""
    if gallery is not None:
        from pinsface.face_index import unit

        centroids = gallery.centroids
        c = unit(centroids - centroids.mean(0))
        return c @ c.T
    if settings.model == "embedding":
        head = model.get_layer("head")
        layer = head.get_layer("cosine_logits") if settings.cosine_scale else head.get_layer("logits")
    else:
        layer = model.get_layer("probabilities")
    w = np.asarray(layer.get_weights()[0], dtype=np.float64)
    w = w / np.maximum(np.linalg.norm(w, axis=0, keepdims=True), 1e-12)
    return w.T @ w


@dataclass
class Evaluation:
    """What one evaluation scored, as the figures and the report need it."""

    run: Run
    settings: Settings
    model: object
    gallery: object  # the run's gallery (embedding runs), else None
    labels: list[str]
    split: Split
    prepared: Prepared  # holds the images scored...
    items: np.ndarray  # ...at these positions
    y: np.ndarray  # each image's true identity, an index into labels
    probs: np.ndarray  # each image's scores, one column per identity
    usable: np.ndarray  # whether the image had a face to score
    training: Prepared | None  # the run's training images, where at hand


def _label_index(labels: list[str]) -> dict[str, int]:
    """Each identity's key (``dataset.identity_key``) to its index in ``labels``."""
    return {identity_key(name): i for i, name in enumerate(labels)}


def _test_items(prepared: Prepared, split: Split) -> np.ndarray:
    """The positions in ``prepared`` of the run's test images."""
    test = set(split.files("test"))
    return np.array([i for i, it in enumerate(prepared.dataset.items) if it.rel in test], dtype=np.int64)


def _images_to_score(
    settings: Settings, split: Split, labels: list[str], *, data, prepared: Prepared | None, where: dict
) -> tuple[Prepared, np.ndarray, dict[str, int], Prepared | None]:
    """The images to score: the run's test split, or those of folder ``data`` whose identity the run knows.
    Returns them (prepared, positions), the folders of ``data`` the run does not know (with their image counts),
    and the training images where at hand. ``where``: how prepare runs (progress, engine, address)."""
    if data is None:
        if prepared is None:
            prepared = prepare_for_run(settings, **where)
        return prepared, _test_items(prepared, split), {}, prepared
    label_of = _label_index(labels)
    dataset = scan_dataset(data)
    prepared = prepare_for_run(settings, dataset.root, dataset=dataset, **where)
    counts = dataset.counts()
    unknown_folders = {name: counts[name] for name in dataset.identities if identity_key(name) not in label_of}
    for name, count in unknown_folders.items():
        log.warning("identity %r (%d images) is not known to this run: reported, not scored", name, count)
    items = np.array(
        [i for i, it in enumerate(prepared.dataset.items) if identity_key(it.identity) in label_of], dtype=np.int64
    )
    return prepared, items, unknown_folders, None


def _what_was_scored(settings: Settings, data, prepared: Prepared, unknown_folders: dict, mode: str) -> dict:
    """The metrics' description of what was scored and by which model."""
    about = {
        "unknown_identities": unknown_folders,
        "data": str(prepared.dataset.root) if data is not None else "the run's test split",
        "model": settings.model,
    }
    if settings.model == "embedding":
        about["saved_model"] = (
            "the saved head, refitted on the training and validation faces after early stopping "
            "chose its epochs; the test images were held out of both"
            if settings.final_fit == "train+val"
            else "the saved head, trained on the training faces; the test images were held out"
        )
    about["mode"] = mode
    return about


def evaluate(  # noqa: PLR0913  (a public entry point: its options mirror pinsface evaluate's flags)
    run_dir: str | Path,
    data: str | Path | None = None,
    out: str | Path | None = None,
    *,
    prepared: Prepared | None = None,
    progress: bool = True,
    model=None,
    compare: str | Path | None = None,
    figures: bool = True,
    mode: str | None = None,
    engine: str = "local",
    address: str | None = None,
) -> dict:
    """Score a run on its own test split (default) or on every image of a labelled folder ``data``,
    and write metrics, reports, figures and ``report.html`` into ``out`` (default ``RUN_DIR/report``).
    ``mode`` (head, gallery, auto) overrides the run's ``Settings.mode``."""
    from pinsface.scoring import resolve_mode

    clock = StageClock()
    started = clock.mark()
    run = Run(run_dir)
    settings = run.settings()
    state = run.load_state(settings, model=model is None)
    labels, model = state.labels, model if model is not None else state.model
    out = Path(out) if out else run.report_dir
    out.mkdir(parents=True, exist_ok=True)
    split = run.split()
    where = {"progress": progress, "engine": engine, "address": address}
    prepared, items, unknown_folders, training = _images_to_score(
        settings, split, labels, data=data, prepared=prepared, where=where
    )
    label_of = _label_index(labels)
    y = np.array([label_of[identity_key(prepared.dataset.items[i].identity)] for i in items], dtype=np.int64)
    scoring = clock.mark()
    clock.record("prepare", started)
    mode = resolve_mode(mode or settings.mode, len(labels)) if settings.model == "embedding" else "head"
    head = state.head if model is state.model else None  # a model given by the caller brings its own head
    probs, usable = score_images(
        model, settings, prepared, items, progress=progress, gallery=state.gallery, mode=mode, head=head
    )
    clock.record("score", scoring)
    metrics = compute_metrics(probs, usable, y, labels, [prepared.status[i] for i in items])
    metrics.update(_what_was_scored(settings, data, prepared, unknown_folders, mode))
    metrics["seconds"], metrics["cpu_share"] = clock.seconds, clock.cpu_share  # filled in as the stages end
    write_reports(out, metrics, labels)
    confusions = write_top_confusions(out / "top_confusions.csv", y, np.where(usable, np.argmax(probs, 1), -1), labels)
    if figures:
        drawing = clock.mark()
        if training is None and settings.data_dir and Path(settings.data_dir).is_dir():
            training = prepare_for_run(settings, progress=progress)
        scored = Evaluation(
            run, settings, model, state.gallery, labels, split, prepared, items, y, probs, usable, training
        )
        write_figures(out, scored, confusions, metrics, compare)
        clock.record("figures", drawing)
    clock.record("total", started)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return metrics


def write_top_confusions(
    path: Path, y: np.ndarray, pred: np.ndarray, labels: list[str], limit: int = 50
) -> list[tuple[str, str, int]]:
    """The most frequent (true, predicted) mistakes; an image with no face to score is '(no face)'."""
    import csv
    from collections import Counter

    from pinsface.dataset import spreadsheet_safe

    support = Counter(y.tolist())
    pairs = Counter((int(t), int(p)) for t, p in zip(y, pred) if t != p)
    rows = [(labels[t], labels[p] if p >= 0 else "(no face)", c, c / support[t]) for (t, p), c in pairs.most_common()]
    rows.sort(key=lambda r: (-r[2], r[0], r[1]))
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["true", "predicted", "count", "share_of_true"])
        for t, p, c, share in rows[:limit]:
            writer.writerow([spreadsheet_safe(t), spreadsheet_safe(p), c, f"{share:.4f}"])
    return [(t, p, c) for t, p, c, _ in rows if p != "(no face)"]


def write_figures(out: Path, scored: Evaluation, confusions, metrics: dict, compare) -> None:
    """Draw the figures of ``scored`` into ``out`` and write ``report.html`` with them; adds the written
    insights to ``metrics``. ``compare``: a second run to set beside this one, or None."""
    from pinsface import plots, report

    history = scored.run.history()
    figures = []
    if history.get("stages"):
        figures.append((plots.plot_curves(history, out / "curves.png"), "Training curves"))
    figures.append(
        (
            _confusion_figure(out / "confusion_matrix.png", scored),
            "Confusion matrix (row-normalised, clustered), with the most-confused block enlarged",
        )
    )
    figures += _sample_figures(out, scored, mode=metrics.get("mode", "head"))
    compare_info = _compare_info(compare) if compare else None
    dataset_stats = _dataset_stats(scored.run, scored.training)
    timings = {f"train: {k}": v for k, v in history.get("timings_seconds", {}).items()}
    timings.update({f"evaluate: {k}": v for k, v in metrics["seconds"].items()})
    lines = report.insights(metrics, confusions, _training_counts(scored), compare_info)
    metrics["insights"] = lines
    report.write_html(
        out / "report.html",
        metrics,
        scored.settings.to_dict(),
        dataset_stats=dataset_stats,
        timings=timings,
        figures=figures,
        insight_lines=lines,
    )


def _confusion_figure(path: Path, scored: Evaluation) -> Path:
    """The confusion matrix of the faces scored, its identities ordered so that alike ones sit together."""
    from sklearn.metrics import confusion_matrix

    from pinsface import plots

    pred = np.argmax(scored.probs, 1)
    usable = scored.usable
    cm = confusion_matrix(scored.y[usable], pred[usable], labels=list(range(len(scored.labels))))
    confused = ((cm + cm.T) > 0) & ~np.eye(len(cm), dtype=bool)
    # Any confused pair is pulled together too, so the errors cluster near the diagonal.
    similarity = np.clip(class_similarity(scored.model, scored.settings, scored.gallery) + 0.8 * confused, -1, 1)
    order = plots.cluster_order(similarity)
    plots.plot_confusion(cm, scored.labels, order, path)
    return path


def _sample_figures(out: Path, scored: Evaluation, mode: str) -> list[tuple[Path, str]]:
    """Two sheets of sample faces, hits and misses, with their captions."""
    from pinsface import plots

    correct, incorrect = sample_faces(scored, mode=mode)
    return [
        (
            plots.plot_samples(correct, out / "samples_correct.png", "Correctly named faces"),
            "Sample hits: aligned face crops with true and predicted identity",
        ),
        (
            plots.plot_samples(
                incorrect,
                out / "samples_incorrect.png",
                "Misses, each beside the nearest training face of the identity predicted",
            ),
            "Sample misses and, beside each, the training face that fooled the model",
        ),
    ]


def _training_counts(scored: Evaluation) -> dict[str, int]:
    """Each identity's number of training images (empty where the training images are not at hand)."""
    from collections import Counter

    if scored.training is None:
        return {}
    train_set = set(scored.split.files("train"))
    return Counter(it.identity for it in scored.training.dataset.items if it.rel in train_set)


def _compare_info(compare) -> dict:
    other = Run(compare)
    path = other.report_dir / "metrics.json"
    if not path.exists():
        evaluate(other.path, progress=False, figures=False)
    m = json.loads(path.read_text(encoding="utf-8"))
    return {"name": other.path.name, "model": m.get("model", "?"), "top1": m["top1"], "macro_f1": m["macro_f1"]}


def _dataset_stats(run: Run, training: Prepared | None) -> dict:
    stats = {}
    summary = run.prepare_summary() or (training.summary if training else {})
    if training is not None:
        counts = np.array(sorted(training.dataset.counts().values()))
        stats["images per identity (min / median / max)"] = (
            f"{counts.min()} / {int(np.median(counts))} / {counts.max()}"
        )
    for key in ("identities", "images", "faces_found", "no_face", "multi_face", "skipped"):
        if key in summary:
            stats[key.replace("_", " ")] = summary[key]
    return stats


def sample_faces(scored: Evaluation, *, n_correct: int = 18, n_incorrect: int = 18, mode: str = "head"):
    """Picked hits and misses of ``scored`` with their crops; misses get the nearest training face of the
    predicted identity. Each carries the head's probability (``confidence``) or, in gallery mode, where
    ``scored.probs`` holds minus the distance (``pinsface.scoring.gallery_scores``), the ``distance`` instead."""
    settings, labels, prepared, items = scored.settings, scored.labels, scored.prepared, scored.items
    y, probs, usable, split, training = scored.y, scored.probs, scored.usable, scored.split, scored.training
    pred = np.argmax(probs, 1)
    conf = probs.max(1)
    rng = np.random.default_rng(settings.seed)
    hit, miss = _pick_samples(rng, usable & (pred == y), usable, conf, n_correct=n_correct, n_incorrect=n_incorrect)
    queries = {k: (prepared.hashes[items[k]], labels[pred[k]]) for k in miss if usable[k]}
    nearest = _nearest_training_faces(settings, prepared, training, split, queries)
    shown_faces = [prepared.hashes[items[k]] for k in [*hit, *miss] if usable[k]]
    crops, neighbours = _sample_crops(prepared, shown_faces, nearest, training)

    def score(k) -> dict:
        if mode == "gallery":
            return {"confidence": None, "distance": -float(conf[k])}
        return {"confidence": float(conf[k])}

    def crop(k):
        return crops[prepared.hashes[items[k]]]

    correct = [{"image": crop(k), "true": labels[y[k]], "pred": labels[pred[k]], **score(k)} for k in hit]
    incorrect = []
    for k in miss:
        if not usable[k]:
            incorrect.append(_unscored_miss(prepared, items[k], labels[y[k]], mode))
            continue
        fallback = prepared.status[items[k]] == "no_face"
        incorrect.append(
            {
                "image": crop(k),
                "true": labels[y[k]],
                "pred": labels[pred[k]],
                **score(k),
                "neighbour": neighbours.get(k),
                "note": "no face found:\nmean-landmark crop" if fallback else None,
            }
        )
    return correct, incorrect


def _pick_samples(
    rng: np.random.Generator, named_right: np.ndarray, usable: np.ndarray, conf: np.ndarray, *, n_correct, n_incorrect
) -> tuple[np.ndarray, list]:
    """The images to show: hits drawn at random, and the most confident misses with a few that had no face."""
    hit = np.flatnonzero(named_right)
    miss = np.flatnonzero(~named_right)
    hit = np.sort(rng.choice(hit, min(n_correct, len(hit)), replace=False)) if len(hit) else hit
    # Confident misses first (the instructive ones), and a few without a face, so both kinds show.
    no_face = [k for k in miss if not usable[k]][: n_incorrect // 3]
    miss = sorted([k for k in miss if usable[k]], key=lambda k: -conf[k])[: n_incorrect - len(no_face)] + no_face
    return hit, miss


def _sample_crops(
    prepared: Prepared, shown: list[str], nearest: dict, training: Prepared | None
) -> tuple[dict[str, np.ndarray], dict]:
    """The aligned crops of the faces ``shown`` (by hash), and of each miss's nearest training face (``nearest``:
    miss -> hash), read in one pass over the cache: the two datasets share one cache, or a hash is simply absent."""
    wanted = shown + list(nearest.values())
    faces = prepared.cache.load(wanted, crops=("aligned",)) if wanted else None
    if training is not None and training.cache.root != prepared.cache.root and nearest:
        neighbour_faces = training.cache.load(list(nearest.values()), crops=("aligned",))
    else:
        neighbour_faces = faces
    crops = {h: faces.columns["aligned"][faces.index[h]] for h in shown}
    neighbours = {
        k: neighbour_faces.columns["aligned"][neighbour_faces.index[h]]
        for k, h in nearest.items()
        if h in neighbour_faces.index
    }
    return crops, neighbours


# Why a miss had no face to score, by its status; any other status is a reason the file could not be read.
UNSCORED_NOTES = {
    "no_face": "no face found",
    "no_face_photo": "no face found",
    "ambiguous": "several faces, none clearly the subject",
}


def _unscored_miss(prepared: Prepared, item: int, true: str, mode: str) -> dict:
    """A miss with no face to score: the whole photo (None if it cannot be read), and why."""
    from pinsface.images import BadImage, load_image

    try:
        image = load_image(prepared.dataset.path(prepared.dataset.items[item]))
    except BadImage:
        image = None
    status = prepared.status[item]
    return {
        "image": image,
        "true": true,
        "pred": None,
        "confidence": None if mode == "gallery" else 0.0,
        "note": UNSCORED_NOTES.get(status, f"unreadable: {status}"),
        "neighbour": None,
    }


def _nearest_training_faces(
    settings: Settings, prepared: Prepared, training: Prepared | None, split: Split, queries: dict
) -> dict:
    """For each miss with a face (``queries``: miss -> its face's hash and the identity predicted): the hash of the
    training face of the predicted identity that is nearest (``_face_vectors``)."""
    if training is None or not queries:
        return {}
    train_set = set(split.files("train"))
    ok = usable_status(settings)
    by_identity: dict[str, list[str]] = {}
    for i, it in enumerate(training.dataset.items):
        if it.rel in train_set and training.status[i] in ok:
            by_identity.setdefault(identity_key(it.identity), []).append(training.hashes[i])
    query_hashes = [digest for digest, _ in queries.values()]
    pools = [by_identity.get(identity_key(name), []) for _, name in queries.values()]
    candidates = sorted({h for pool in pools for h in pool})
    index, vector = _face_vectors(settings, prepared, training, query_hashes, candidates)
    result = {}
    for k, qh, pool in zip(queries, query_hashes, pools):
        pool = [h for h in pool if h in index]
        if not pool or qh not in index:
            continue
        d = np.linalg.norm(np.stack([vector(h) for h in pool]) - vector(qh), axis=1)
        result[k] = pool[int(np.argmin(d))]
    return result


def _face_vectors(settings: Settings, prepared: Prepared, training: Prepared, query_hashes: list, candidates: list):
    """What faces are compared by: their embeddings where all are cached (embedding runs), else the pixels of their
    grayscale box crops. Returns the hashes that have one, and a function from hash to vector."""
    index, emb, _ = run_embedding_cache(settings, prepared.cache.root).load(query_hashes + candidates)
    if all(h in index for h in query_hashes + candidates):
        return index, lambda h: emb[index[h]]
    table = training.cache.load(candidates, crops=("box",))
    queries_table = prepared.cache.load(query_hashes, crops=("box",))
    boxes = {
        **{h: (table, i) for h, i in table.index.items()},
        **{h: (queries_table, i) for h, i in queries_table.index.items()},
    }
    return boxes, lambda h: boxes[h][0].columns["box"][boxes[h][1]].astype(np.float32).ravel()


def write_reports(out: Path, metrics: dict, labels: list[str]) -> None:
    """classification_report.txt and .csv: per identity, then macro and weighted averages."""
    import csv

    from pinsface.dataset import spreadsheet_safe

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
    lines.append(
        f"{'weighted avg':<{width}}{weighted[0]:>10.4f}{weighted[1]:>10.4f}{weighted[2]:>10.4f}"
        f"{int(support.sum()):>10d}"
    )
    (out / "classification_report.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(out / "classification_report.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["identity", "precision", "recall", "f1", "support"])
        for r in rows:
            writer.writerow([spreadsheet_safe(r[0]), f"{r[1]:.6f}", f"{r[2]:.6f}", f"{r[3]:.6f}", r[4]])
        writer.writerow(["macro avg", *(f"{v:.6f}" for v in macro), int(support.sum())])
        writer.writerow(["weighted avg", *(f"{v:.6f}" for v in weighted), int(support.sum())])


@dataclass
class _Answers:
    """The run's answers for a set of images: which had a face, and for each of those the identity named, the
    head's probability for it and the face's distance to that identity in the gallery."""

    usable: np.ndarray
    pred: np.ndarray
    probability: np.ndarray
    distance: np.ndarray


def _answers(
    prepared: Prepared, items: np.ndarray, *, settings: Settings, state, embedder, mode: str, progress
) -> _Answers:
    """What the run (``state``: its head and gallery) answers for the images ``items`` of ``prepared``."""
    from pinsface.embeddings import ensure_embeddings
    from pinsface.scoring import head_probabilities, identity_scores, nearest_identities

    ok = usable_status(settings)
    usable = np.array([prepared.status[i] in ok for i in items], dtype=bool)
    hashes = [prepared.hashes[i] for i in items[usable]]
    cache = run_embedding_cache(settings, prepared.cache.root)
    emb, flip = ensure_embeddings(hashes, prepared.cache, cache, embedder, progress=progress)
    gallery = state.gallery
    if mode == "gallery":  # no head: every face passes the probability check
        ids, near = nearest_identities(gallery, emb, flip, 1)
        return _Answers(usable, ids[:, 0], np.ones(len(ids), np.float32), near[:, 0])
    probs = head_probabilities(state.head, emb, flip)
    dists = gallery.distances(emb, flip)
    pred = np.argmax(identity_scores(probs, dists, gallery.knn_weight, gallery.knn_tau), 1)
    rows = np.arange(len(pred))
    return _Answers(usable, pred, probs[rows, pred], dists[rows, pred])


def _open_set_rates(
    known: _Answers,
    known_true: np.ndarray,
    strangers: _Answers,
    threshold_probability: float,
    threshold_distance: float,
) -> tuple[float, float]:
    """At these thresholds: the share of strangers rejected, and of known test images accepted and named right."""
    from pinsface.scoring import accepted

    named = accepted(known.probability, known.distance, threshold_probability, threshold_distance)
    known_ok = np.sum((known.pred == known_true) & named) / max(len(known.usable), 1)
    # A stranger with no detectable face is never named: that counts as rejected.
    strangers_named = accepted(strangers.probability, strangers.distance, threshold_probability, threshold_distance)
    rejected = 1.0 - np.sum(strangers_named) / max(len(strangers.usable), 1)
    return float(rejected), float(known_ok)


def _prepare_strangers(settings: Settings, unknown, label_of: dict[str, int], where: dict) -> Prepared:
    """The images of folder ``unknown``, prepared; refused if it holds anyone the run knows."""
    strangers = scan_dataset(unknown)
    clash = [name for name in strangers.identities if identity_key(name) in label_of]
    if clash:
        raise ValueError(f"--unknown must hold people the run does not know; it knows: {', '.join(clash)}")
    return prepare_for_run(settings, strangers.root, dataset=strangers, **where)


def evaluate_open_set(
    run_dir: str | Path,
    unknown: str | Path,
    out: str | Path | None = None,
    *,
    prepared: Prepared | None = None,
    progress: bool = True,
    mode: str | None = None,
    engine: str = "local",
    address: str | None = None,
) -> dict:
    """Known test faces vs faces of people the run never saw: how many strangers are rejected, how many known
    faces are still accepted and named correctly, and the trade-off curve between the two. ``engine`` and
    ``address``: where faces not yet cached are prepared (``pinsface.prepare.prepare``)."""
    from pinsface import plots
    from pinsface.scoring import resolve_mode

    run = Run(run_dir)
    settings = run.settings()
    if settings.model != "embedding":
        raise ValueError("open-set evaluation needs an embedding run (with a calibrated gallery)")
    state = run.load_state(settings)
    gallery = state.gallery
    mode = resolve_mode(mode or settings.mode, len(gallery.labels))
    out = Path(out) if out else run.report_dir
    out.mkdir(parents=True, exist_ok=True)
    where = {"progress": progress, "engine": engine, "address": address}
    if prepared is None:
        prepared = prepare_for_run(settings, **where)
    known_items = _test_items(prepared, run.split())
    label_of = _label_index(gallery.labels)
    strangers = _prepare_strangers(settings, unknown, label_of, where)
    embedder = run_embedder(settings, state.model.get_layer(settings.backbone))
    answer = partial(_answers, settings=settings, state=state, embedder=embedder, mode=mode, progress=progress)
    known = answer(prepared, known_items)
    known_true = np.array(
        [label_of.get(identity_key(prepared.dataset.items[i].identity), -1) for i in known_items[known.usable]]
    )
    stranger_answers = answer(strangers, np.arange(len(strangers.dataset.items)))
    rates = partial(_open_set_rates, known, known_true, stranger_answers)
    threshold_probability = gallery.threshold_probability if mode == "head" else 0.0
    threshold_distance = gallery.threshold_distance
    rejected, known_ok = rates(threshold_probability, threshold_distance)
    curve = [rates(threshold_probability, d) for d in np.linspace(0.0, 1.0, 1001)]
    curve_p = [rates(p, threshold_distance) for p in np.linspace(0.0, 1.0, 101)]
    result = {
        "unknown_dir": str(strangers.dataset.root),
        "n_strangers": len(strangers.dataset.items),
        "n_strangers_with_face": int(stranger_answers.usable.sum()),
        "n_known_test_images": len(known_items),
        "strangers_rejected": rejected,
        "known_accepted_and_correct": known_ok,
        "threshold_probability": threshold_probability,
        "threshold_distance": threshold_distance,
        "target_far": gallery.target_far,
        "calibration": gallery.calibration,
        "mode": mode,
    }
    plots.plot_open_set(curve, curve_p, (rejected, known_ok), out / "open_set.png")
    (out / "open_set.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return result
