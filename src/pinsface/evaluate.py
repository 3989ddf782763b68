"""Judge a trained run on its test split or on any labelled folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from pinsface.clock import StageClock
from pinsface.dataset import Split, identity_key, scan_dataset
from pinsface.embeddings import run_embedder, run_embedding_cache
from pinsface.prepare import Prepared, prepare_for_run, usable_status
from pinsface.run import Run
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


def evaluate(
    run_dir: str | Path,
    data: str | Path | None = None,
    out: str | Path | None = None,
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
    t0 = clock.mark()
    run = Run(run_dir)
    settings = run.settings()
    state = run.load_state(settings, model=model is None)
    labels, model = state.labels, model if model is not None else state.model
    out = Path(out) if out else run.report_dir
    out.mkdir(parents=True, exist_ok=True)
    label_of = {identity_key(name): i for i, name in enumerate(labels)}
    split = run.split()

    training = None
    if data is None:
        if prepared is None:
            prepared = prepare_for_run(settings, progress=progress, engine=engine, address=address)
        training = prepared
        test = set(split.files("test"))
        items = np.array([i for i, it in enumerate(prepared.dataset.items) if it.rel in test], dtype=np.int64)
        unknown_folders: dict[str, int] = {}
    else:
        dataset = scan_dataset(data)
        prepared = prepare_for_run(
            settings, dataset.root, dataset=dataset, progress=progress, engine=engine, address=address
        )
        counts = dataset.counts()
        unknown_folders = {name: counts[name] for name in dataset.identities if identity_key(name) not in label_of}
        for name, count in unknown_folders.items():
            log.warning("identity %r (%d images) is not known to this run: reported, not scored", name, count)
        items = np.array(
            [i for i, it in enumerate(prepared.dataset.items) if identity_key(it.identity) in label_of], dtype=np.int64
        )
    y = np.array([label_of[identity_key(prepared.dataset.items[i].identity)] for i in items], dtype=np.int64)
    t1 = clock.mark()
    clock.record("prepare", t0)
    mode = resolve_mode(mode or settings.mode, len(labels)) if settings.model == "embedding" else "head"
    head = state.head if model is state.model else None  # a model given by the caller brings its own head
    probs, usable = score_images(
        model, settings, prepared, items, progress, gallery=state.gallery, mode=mode, head=head
    )
    clock.record("score", t1)
    status = [prepared.status[i] for i in items]
    metrics = compute_metrics(probs, usable, y, labels, status)
    metrics["unknown_identities"] = unknown_folders
    metrics["data"] = str(prepared.dataset.root) if data is not None else "the run's test split"
    metrics["model"] = settings.model
    if settings.model == "embedding":
        metrics["saved_model"] = (
            "the saved head, refitted on the training and validation faces after early stopping "
            "chose its epochs; the test images were held out of both"
            if settings.final_fit == "train+val"
            else "the saved head, trained on the training faces; the test images were held out"
        )
    metrics["mode"] = mode
    metrics["seconds"], metrics["cpu_share"] = clock.seconds, clock.cpu_share
    write_reports(out, metrics, labels)
    pred = np.where(usable, np.argmax(probs, 1), -1)
    confusions = write_top_confusions(out / "top_confusions.csv", y, pred, labels)
    if figures:
        t3 = clock.mark()
        if training is None and settings.data_dir and Path(settings.data_dir).is_dir():
            training = prepare_for_run(settings, progress=progress)
        write_figures(
            out,
            run,
            settings,
            model,
            state.gallery,
            labels,
            prepared,
            items,
            y,
            probs,
            usable,
            split,
            training,
            confusions,
            metrics,
            compare,
        )
        clock.record("figures", t3)
    clock.record("total", t0)
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


def write_figures(
    out: Path,
    run: Run,
    settings: Settings,
    model,
    gallery,
    labels: list[str],
    prepared: Prepared,
    items: np.ndarray,
    y: np.ndarray,
    probs: np.ndarray,
    usable: np.ndarray,
    split: Split,
    training: Prepared | None,
    confusions,
    metrics: dict,
    compare,
) -> None:
    from sklearn.metrics import confusion_matrix

    from pinsface import plots, report

    history = run.history()
    figures = []
    if history.get("stages"):
        figures.append((plots.plot_curves(history, out / "curves.png"), "Training curves"))
    pred = np.argmax(probs, 1)
    cm = confusion_matrix(y[usable], pred[usable], labels=list(range(len(labels))))
    confused = ((cm + cm.T) > 0) & ~np.eye(len(cm), dtype=bool)
    # Any confused pair is pulled together too, so the errors cluster near the diagonal.
    similarity = np.clip(class_similarity(model, settings, gallery) + 0.8 * confused, -1, 1)
    order = plots.cluster_order(similarity)
    _, block = plots.plot_confusion(cm, labels, order, out / "confusion_matrix.png")
    figures.append(
        (
            out / "confusion_matrix.png",
            "Confusion matrix (row-normalised, clustered), with the most-confused block enlarged",
        )
    )
    correct, incorrect = sample_faces(
        settings, labels, prepared, items, y, probs, usable, split, training, mode=metrics.get("mode", "head")
    )
    figures.append(
        (
            plots.plot_samples(correct, out / "samples_correct.png", "Correctly named faces"),
            "Sample hits: aligned face crops with true and predicted identity",
        )
    )
    figures.append(
        (
            plots.plot_samples(
                incorrect,
                out / "samples_incorrect.png",
                "Misses, each beside the nearest training face of the identity predicted",
            ),
            "Sample misses and, beside each, the training face that fooled the model",
        )
    )
    train_counts = {}
    if training is not None:
        from collections import Counter

        train_set = set(split.files("train"))
        train_counts = Counter(it.identity for it in training.dataset.items if it.rel in train_set)
    compare_info = _compare_info(compare) if compare else None
    dataset_stats = _dataset_stats(run, training)
    timings = {f"train: {k}": v for k, v in history.get("timings_seconds", {}).items()}
    timings.update({f"evaluate: {k}": v for k, v in metrics["seconds"].items()})
    lines = report.insights(metrics, confusions, train_counts, compare_info)
    metrics["insights"] = lines
    report.write_html(out / "report.html", metrics, settings.to_dict(), dataset_stats, timings, figures, lines)


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


def sample_faces(
    settings: Settings,
    labels,
    prepared: Prepared,
    items,
    y,
    probs,
    usable,
    split: Split,
    training: Prepared | None,
    n_correct: int = 18,
    n_incorrect: int = 18,
    mode: str = "head",
):
    """Picked hits and misses with their crops; misses get the nearest training face of the predicted identity.
    Each carries the head's probability (``confidence``) or, in gallery mode, where ``probs`` holds minus the
    distance (``pinsface.scoring.gallery_scores``), the ``distance`` instead."""
    from pinsface.images import BadImage, load_image

    rng = np.random.default_rng(settings.seed)
    pred = np.argmax(probs, 1)
    conf = probs.max(1)
    hit = np.flatnonzero(usable & (pred == y))
    miss = np.flatnonzero(~usable | (pred != y))
    hit = np.sort(rng.choice(hit, min(n_correct, len(hit)), replace=False)) if len(hit) else hit
    # Confident misses first (the instructive ones), and a few without a face, so both kinds show.
    no_face = [k for k in miss if not usable[k]][: n_incorrect // 3]
    miss = sorted([k for k in miss if usable[k]], key=lambda k: -conf[k])[: n_incorrect - len(no_face)] + no_face
    nearest = _nearest_training_faces(settings, labels, prepared, items, miss, pred, usable, split, training)
    # One pass over the cache for every crop shown (the two datasets share one cache, or a hash is simply absent).
    wanted = [prepared.hashes[items[k]] for k in [*hit, *miss] if usable[k]] + list(nearest.values())
    faces = prepared.cache.load(wanted, crops=("aligned",)) if wanted else None
    if training is not None and training.cache.root != prepared.cache.root and nearest:
        neighbour_faces = training.cache.load(list(nearest.values()), crops=("aligned",))
    else:
        neighbour_faces = faces

    def crop(k):
        return faces.columns["aligned"][faces.index[prepared.hashes[items[k]]]]

    neighbours = {
        k: neighbour_faces.columns["aligned"][neighbour_faces.index[h]]
        for k, h in nearest.items()
        if h in neighbour_faces.index
    }

    def score(k) -> dict:
        if mode == "gallery":
            return {"confidence": None, "distance": -float(conf[k])}
        return {"confidence": float(conf[k])}

    correct = [{"image": crop(k), "true": labels[y[k]], "pred": labels[pred[k]], **score(k)} for k in hit]
    incorrect = []
    for k in miss:
        true = labels[y[k]]
        if not usable[k]:
            try:
                image = load_image(prepared.dataset.path(prepared.dataset.items[items[k]]))
            except BadImage:
                image = None
            status = prepared.status[items[k]]
            note = {
                "no_face": "no face found",
                "no_face_photo": "no face found",
                "ambiguous": "several faces, none clearly the subject",
            }.get(status, f"unreadable: {status}")
            incorrect.append(
                {
                    "image": image,
                    "true": true,
                    "pred": None,
                    "confidence": None if mode == "gallery" else 0.0,
                    "note": note,
                    "neighbour": None,
                }
            )
        else:
            fallback = prepared.status[items[k]] == "no_face"
            incorrect.append(
                {
                    "image": crop(k),
                    "true": true,
                    "pred": labels[pred[k]],
                    **score(k),
                    "neighbour": neighbours.get(k),
                    "note": "no face found:\nmean-landmark crop" if fallback else None,
                }
            )
    return correct, incorrect


def _nearest_training_faces(settings, labels, prepared, items, miss, pred, usable, split, training) -> dict:
    """For each miss with a face: the hash of the training face of the predicted identity that is nearest, in
    embedding space where the embeddings are cached (embedding runs), else in the pixels of the grayscale box
    crop."""
    queries = [k for k in miss if usable[k]]
    if training is None or not queries:
        return {}
    train_set = set(split.files("train"))
    ok = usable_status(settings)
    by_identity: dict[str, list[str]] = {}
    for i, it in enumerate(training.dataset.items):
        if it.rel in train_set and training.status[i] in ok:
            by_identity.setdefault(identity_key(it.identity), []).append(training.hashes[i])
    query_hashes = [prepared.hashes[items[k]] for k in queries]
    pools = [by_identity.get(identity_key(labels[pred[k]]), []) for k in queries]
    candidates = sorted({h for pool in pools for h in pool})
    index, emb, _ = run_embedding_cache(settings, prepared.cache.root).load(query_hashes + candidates)
    if any(h not in index for h in query_hashes + candidates):
        table = training.cache.load(candidates, crops=("box",))
        queries_table = prepared.cache.load(query_hashes, crops=("box",))
        index = {
            **{h: ("c", i) for h, i in table.index.items()},
            **{h: ("q", i) for h, i in queries_table.index.items()},
        }

        def vector(h):
            where, i = index[h]
            source = table if where == "c" else queries_table
            return source.columns["box"][i].astype(np.float32).ravel()
    else:

        def vector(h):
            return emb[index[h]]

    result = {}
    for k, qh, pool in zip(queries, query_hashes, pools):
        pool = [h for h in pool if h in index]
        if not pool or qh not in index:
            continue
        d = np.linalg.norm(np.stack([vector(h) for h in pool]) - vector(qh), axis=1)
        result[k] = pool[int(np.argmin(d))]
    return result


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


def evaluate_open_set(
    run_dir: str | Path,
    unknown: str | Path,
    out: str | Path | None = None,
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
    from pinsface.scoring import accepted, head_probabilities, identity_scores

    run = Run(run_dir)
    settings = run.settings()
    if settings.model != "embedding":
        raise ValueError("open-set evaluation needs an embedding run (with a calibrated gallery)")
    from pinsface.scoring import nearest_identities, resolve_mode

    state = run.load_state(settings)
    model, gallery = state.model, state.gallery
    mode = resolve_mode(mode or settings.mode, len(gallery.labels))
    out = Path(out) if out else run.report_dir
    out.mkdir(parents=True, exist_ok=True)
    if prepared is None:
        prepared = prepare_for_run(settings, progress=progress, engine=engine, address=address)
    test = set(run.split().files("test"))
    label_of = {identity_key(name): i for i, name in enumerate(gallery.labels)}
    known_items = np.array([i for i, it in enumerate(prepared.dataset.items) if it.rel in test], dtype=np.int64)
    strangers_ds = scan_dataset(unknown)
    clash = [name for name in strangers_ds.identities if identity_key(name) in label_of]
    if clash:
        raise ValueError(f"--unknown must hold people the run does not know; it knows: {', '.join(clash)}")
    strangers = prepare_for_run(
        settings, strangers_ds.root, dataset=strangers_ds, progress=progress, engine=engine, address=address
    )

    from pinsface.embeddings import ensure_embeddings

    embedder = run_embedder(settings, model.get_layer(settings.backbone))

    def scores(prep: Prepared, items: np.ndarray):
        ok = usable_status(settings)
        usable = np.array([prep.status[i] in ok for i in items], dtype=bool)
        hashes = [prep.hashes[i] for i in items[usable]]
        cache = run_embedding_cache(settings, prep.cache.root)
        emb, flip = ensure_embeddings(hashes, prep.cache, cache, embedder, progress=progress)
        if mode == "gallery":  # no head: every face passes the probability check
            ids, near = nearest_identities(gallery, emb, flip, 1)
            return usable, ids[:, 0], np.ones(len(ids), np.float32), near[:, 0]
        probs = head_probabilities(state.head, emb, flip)
        dists = gallery.distances(emb, flip)
        pred = np.argmax(identity_scores(probs, dists, gallery.knn_weight, gallery.knn_tau), 1)
        rows = np.arange(len(pred))
        return usable, pred, probs[rows, pred], dists[rows, pred]

    k_usable, k_pred, k_p, k_d = scores(prepared, known_items)
    k_true = np.array(
        [label_of.get(identity_key(prepared.dataset.items[i].identity), -1) for i in known_items[k_usable]]
    )
    s_items = np.arange(len(strangers.dataset.items))
    s_usable, _, s_p, s_d = scores(strangers, s_items)
    n_known, n_strangers = len(known_items), len(s_items)

    def rates(t_p: float, t_d: float) -> tuple[float, float]:
        known_ok = np.sum((k_pred == k_true) & accepted(k_p, k_d, t_p, t_d)) / max(n_known, 1)
        # A stranger with no detectable face is never named: that counts as rejected.
        rejected = 1.0 - np.sum(accepted(s_p, s_d, t_p, t_d)) / max(n_strangers, 1)
        return float(rejected), float(known_ok)

    t_p, t_d = (gallery.threshold_probability if mode == "head" else 0.0), gallery.threshold_distance
    rejected, known_ok = rates(t_p, t_d)
    curve = [rates(t_p, d) for d in np.linspace(0.0, 1.0, 1001)]
    curve_p = [rates(p, t_d) for p in np.linspace(0.0, 1.0, 101)]
    result = {
        "unknown_dir": str(strangers_ds.root),
        "n_strangers": n_strangers,
        "n_strangers_with_face": int(s_usable.sum()),
        "n_known_test_images": n_known,
        "strangers_rejected": rejected,
        "known_accepted_and_correct": known_ok,
        "threshold_probability": t_p,
        "threshold_distance": t_d,
        "target_far": gallery.target_far,
        "calibration": gallery.calibration,
        "mode": mode,
    }
    plots.plot_open_set(curve, curve_p, (rejected, known_ok), out / "open_set.png")
    (out / "open_set.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return result
