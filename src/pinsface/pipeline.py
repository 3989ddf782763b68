"""The conductor: prepare -> split -> embed -> fit -> calibrate -> save the run -> (evaluate).

Each step is its own module's work; this one only chains them and times them. The caller's ``Settings`` are
copied, never changed: the run's own copy is saved in the run folder and returned.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pinsface.clock import StageClock
from pinsface.dataset import Split, split_dataset
from pinsface.prepare import Prepared, prepare_for_run, usable_status
from pinsface.run import Run
from pinsface.settings import Settings


@dataclass
class SplitData:
    """Per split: positions in the dataset, label index, and whether a face crop exists for the image."""

    items: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    usable: dict[str, np.ndarray]


def split_arrays(prepared: Prepared, split: Split, labels: list[str], settings: Settings) -> SplitData:
    label_of = {name: i for i, name in enumerate(labels)}
    ok = usable_status(settings)
    by_split: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, item in enumerate(prepared.dataset.items):
        name = split.assignment.get(item.rel)
        if name:
            by_split[name].append(i)
    items = {k: np.array(v, dtype=np.int64) for k, v in by_split.items()}
    y = {
        k: np.array([label_of.get(prepared.dataset.items[i].identity, -1) for i in v], dtype=np.int64)
        for k, v in items.items()
    }
    usable = {k: np.array([prepared.status[i] in ok for i in v], dtype=bool) for k, v in items.items()}
    return SplitData(items, y, usable)


def validation_distances(emb: dict, y: dict, n_classes: int, knn: int) -> np.ndarray:
    """Each validation face's k-nearest-faces distance to each identity, among the training faces alone."""
    from pinsface.face_index import face_vectors, knn_distances, pairwise_distances

    d = pairwise_distances(face_vectors(*emb["val"]).astype(np.float32), face_vectors(*emb["train"]).astype(np.float32))
    return knn_distances(d, y["train"], n_classes, knn)


def choose_blend_on_validation(head, emb: dict, y: dict, dists: np.ndarray) -> tuple[float, float]:
    """The head/nearest-faces blend (``pinsface.scoring.identity_scores``) that names the most validation faces,
    with the validation faces scored by the head that did not train on them, against the training faces alone
    (``dists``: ``validation_distances``)."""
    from pinsface.scoring import choose_blend, head_probabilities

    weight, tau, _ = choose_blend(head_probabilities(head, *emb["val"]), dists, y["val"])
    return weight, tau


def train(
    data_dir=None,
    out_dir="runs/latest",
    settings: Settings | None = None,
    cache_dir=None,
    progress: bool = True,
    prepared: Prepared | None = None,
    engine: str = "local",
    address: str | None = None,
) -> dict:
    """Prepare (if needed) and train ``settings.model``; write the run folder and return a summary.
    ``engine``/``address``: where prepare runs (``pinsface.prepare.prepare``)."""
    from pinsface.dataset import check_trainable, default_data_dir, scan_dataset

    settings = dataclasses.replace(settings or Settings())
    dataset = prepared.dataset if prepared else scan_dataset(data_dir if data_dir else default_data_dir())
    check_trainable(dataset)
    run = Run(out_dir).create()
    with run.lock():
        return _train(run, dataset, cache_dir, settings, progress, prepared, engine, address)


def _train(
    run: Run,
    dataset,
    cache_dir,
    settings: Settings,
    progress: bool,
    prepared: Prepared | None,
    engine: str = "local",
    address: str | None = None,
) -> dict:
    import keras

    from pinsface import train as fitting
    from pinsface.cache import default_cache_dir
    from pinsface.scoring import score_images, topk_correct

    run.start_log()
    clock = StageClock()
    backbone = None
    t0 = clock.mark()
    if prepared is None:
        settings = dataclasses.replace(
            settings,
            data_dir=str(dataset.root.resolve()),
            cache_dir=str(Path(cache_dir or default_cache_dir()).resolve()),
        )
        background = None
        if settings.model == "embedding" and engine == "local":
            from pinsface.backbones import get_backbone
            from pinsface.embeddings import BackgroundEmbedder, run_embedder, run_embedding_cache

            # New faces are embedded while the detector finds the next ones: the two share the cores.
            settings = dataclasses.replace(settings, embedding_key="")
            backbone = get_backbone(settings.backbone)
            background = BackgroundEmbedder(
                run_embedder(settings, backbone), run_embedding_cache(settings, settings.cache_dir)
            )
        try:
            prepared = prepare_for_run(
                settings,
                progress=progress,
                engine=engine,
                address=address,
                dataset=dataset,
                on_records=background,
            )
        finally:
            if background is not None:
                background.close()
        if background is not None:
            prepared.summary["embedded_during_prepare"] = background.faces
    else:
        settings = dataclasses.replace(
            settings, data_dir=str(prepared.dataset.root), cache_dir=str(prepared.cache.root)
        )
    clock.record("prepare", t0)
    run.save_prepare_summary(prepared.summary)

    split = split_dataset(prepared.dataset, settings.seed, settings.test_fraction, settings.val_fraction)
    run.save_split(split)
    labels = list(prepared.dataset.identities)
    data = split_arrays(prepared, split, labels, settings)
    n_classes = len(labels)
    keras.utils.set_random_seed(settings.seed)

    hashes = {k: [prepared.hashes[i] for i in v[data.usable[k]]] for k, v in data.items.items()}
    y = {k: data.labels[k][data.usable[k]] for k in data.items}
    histories = []
    gallery = None
    logs = (run.log_path, run.checkpoint_dir)

    if settings.model == "embedding":
        from pinsface.backbones import get_backbone
        from pinsface.embeddings import ensure_embeddings, run_embedder, run_embedding_cache
        from pinsface.gallery import new_gallery
        from pinsface.models import build_embedding_model, build_head

        t2 = clock.mark()
        if backbone is None:
            backbone = get_backbone(settings.backbone)
        embedder = run_embedder(settings, backbone)
        settings = dataclasses.replace(settings, embedding_key="")
        emb_cache = run_embedding_cache(settings, settings.cache_dir)
        emb = {k: ensure_embeddings(hashes[k], prepared.cache, emb_cache, embedder, progress=progress) for k in hashes}
        clock.record("embed", t2)
        if settings.augment_views or settings.fine_tune:
            faces = prepared.cache.load(sorted(set(hashes["train"]) | set(hashes["val"])), crops=("aligned",))

        t3 = clock.mark()
        # The views of each training face: its embedding, its mirror image's, and any augmented ones.
        views = [emb["train"][0], emb["train"][1]]
        if settings.augment_views:
            crops = faces.columns["aligned"][faces.rows(hashes["train"])]
            extra = fitting.augmented_embeddings(crops, embedder, settings, settings.augment_views)
            views.extend(np.split(extra, settings.augment_views))
            del crops
        clock.record("augment", t3)
        if len(y["train"]) >= fitting.VIEW_SAMPLING_FROM:
            x_train, y_train = np.stack(views, 1), y["train"]
        else:  # a small folder: every view in every epoch costs little, and its head needs all it can get
            x_train, y_train = np.concatenate(views), np.concatenate([y["train"]] * len(views))

        # The gallery's distances need no head: with the backbone frozen they are computed in a thread while the
        # head trains (which keeps about one core busy), and only the thresholds wait for the head.
        side = ThreadPoolExecutor(1, thread_name_prefix="pinsface-gallery")
        gallery = new_gallery(labels, *emb["train"], y["train"], *emb["val"], y["val"])
        distances = None if settings.fine_tune else side.submit(gallery.leave_one_out)
        blend_distances = (
            side.submit(validation_distances, emb, y, n_classes, gallery.knn)
            if settings.knn_blend and not settings.fine_tune
            else None
        )
        side.shutdown(wait=False)
        t4 = clock.mark()
        head = build_head(n_classes, settings, backbone.output_shape[-1])
        cw = fitting.class_weight(y_train, n_classes) if settings.class_weights else None
        histories.append(
            fitting.fit(
                head,
                x_train,
                y_train,
                emb["val"][0],
                y["val"],
                settings,
                *logs,
                "head",
                fitting.head_epochs(settings, len(y_train)),
                settings.learning_rate,
                cw,
                progress,
                mixup=settings.mixup,
            )
        )
        clock.record("train_head", t4)
        split_head = head
        if settings.final_fit == "train+val":
            t7 = clock.mark()
            head = build_head(n_classes, settings, backbone.output_shape[-1])
            chosen = histories[-1]
            if x_train.ndim == 3:
                val_views = np.stack([emb["val"][k % 2] for k in range(x_train.shape[1])], 1)
                x_all, y_all = np.concatenate([x_train, val_views]), np.concatenate([y_train, y["val"]])
            else:
                x_all = np.concatenate([x_train, *emb["val"]])
                y_all = np.concatenate([y_train, y["val"], y["val"]])
            histories.append(
                fitting.fit(
                    head,
                    x_all,
                    y_all,
                    emb["val"][0],
                    y["val"],
                    settings,
                    *logs,
                    "final",
                    chosen["best_epoch"],
                    settings.learning_rate,
                    None,
                    progress,
                    mixup=settings.mixup,
                    lr_trajectory=chosen["learning_rate"][: chosen["best_epoch"]],
                )
            )
            histories[-1]["note"] = (
                "trained on the training and validation faces: its validation figures are not held out"
            )
            clock.record("final_fit", t7)
        backbone.trainable = False
        settings = dataclasses.replace(settings, embedding_key=settings.backbone)
        if settings.fine_tune:
            t5 = clock.mark()
            crops = {k: faces.columns["aligned"][faces.rows(hashes[k])] for k in ("train", "val")}
            histories.append(fitting.fine_tune(backbone, head, crops, y, settings, *logs, progress))
            tuned_key = f"{settings.backbone}-ft-{fitting.weights_fingerprint(backbone)}"
            settings = dataclasses.replace(settings, embedding_key=tuned_key)
            split_head = head  # tuned with the backbone: the head the tuned embeddings belong to
            clock.record("fine_tune", t5)
        model = build_embedding_model(backbone, head, settings)

        t6 = clock.mark()
        if settings.fine_tune:  # the tuned backbone embeds differently: embed the gallery faces again
            tuned_cache = run_embedding_cache(settings, settings.cache_dir)
            embedder = run_embedder(settings, backbone)
            emb = {
                k: ensure_embeddings(hashes[k], prepared.cache, tuned_cache, embedder, progress=progress)
                for k in ("train", "val")
            }
            gallery = new_gallery(labels, *emb["train"], y["train"], *emb["val"], y["val"])
        # The probability threshold is set on validation faces, so by the head that did not train on them; the
        # final head's probabilities for a face it did not train on look the same.
        gallery.calibrate(split_head, settings.target_far, distances.result() if distances else None)
        if settings.knn_blend:
            dists = (
                blend_distances.result() if blend_distances else validation_distances(emb, y, n_classes, gallery.knn)
            )
            gallery.knn_weight, gallery.knn_tau = choose_blend_on_validation(split_head, emb, y, dists)
        clock.record("calibrate", t6)
    elif settings.model == "pixels-mlp":
        from pinsface.models import build_pixels_mlp

        t4 = clock.mark()
        faces = prepared.cache.load(sorted({h for v in hashes.values() for h in v}), crops=("box",))
        box = {k: faces.columns["box"][faces.rows(hashes[k])][..., None] for k in hashes}
        model = build_pixels_mlp(n_classes, settings, settings.faces.box_size)
        cw = fitting.class_weight(y["train"], n_classes) if settings.class_weights else None
        histories.append(
            fitting.fit(
                model,
                box["train"],
                y["train"],
                box["val"],
                y["val"],
                settings,
                *logs,
                "pixels",
                settings.epochs,
                settings.learning_rate,
                cw,
                progress,
            )
        )
        clock.record("train", t4)
    else:
        raise ValueError(f"unknown model {settings.model!r}; choose one of embedding, pixels-mlp")

    run.save_settings(settings)
    run.save_state(labels, model, gallery)
    clock.record("total", t0)
    history = {"stages": histories, "timings_seconds": clock.seconds, "cpu_share": clock.cpu_share}
    run.save_history(history)

    if settings.model == "embedding":  # judged by the head that did not train on the validation faces
        from pinsface.scoring import head_probabilities

        correct = np.argmax(head_probabilities(split_head, *emb["val"]), 1) == y["val"]
        val_top1 = float(correct.sum() / max(len(data.items["val"]), 1))
    else:
        val_probs, val_usable = score_images(model, settings, prepared, data.items["val"])
        val_top1 = float(np.mean(topk_correct(val_probs, val_usable, data.labels["val"], 1))) if len(val_probs) else 0.0
    run.log(
        f"model {settings.model}: {len(prepared.dataset.items)} images, {n_classes} identities, "
        f"validation top-1 {val_top1:.4f}, timings {history['timings_seconds']}"
    )
    return {
        "run_dir": str(run.path),
        "val_top1": val_top1,
        "timings": history["timings_seconds"],
        "prepared": prepared,
        "settings": settings,
        "model": model,
    }


def run(
    data_dir=None,
    out_dir="runs/latest",
    settings: Settings | None = None,
    cache_dir=None,
    progress: bool = True,
    engine: str = "local",
    address: str | None = None,
) -> dict:
    """prepare -> train -> evaluate on the test split; returns the evaluation metrics."""
    from pinsface.evaluate import evaluate

    result = train(data_dir, out_dir, settings, cache_dir=cache_dir, progress=progress, engine=engine, address=address)
    # The model just saved, as it is in memory: reading it back from the run folder would cost a second.
    return evaluate(out_dir, prepared=result["prepared"], progress=progress, model=result["model"])
