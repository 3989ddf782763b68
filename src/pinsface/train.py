"""Train a model on a prepared dataset and write a self-contained run folder.

The frozen-backbone model trains its head on cached embeddings (each face and its mirror image, plus a few
augmented views pushed through the backbone), then saves the whole network, crop to probabilities.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pinsface.dataset import Split, split_dataset
from pinsface.prepare import Prepared, prepare
from pinsface.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class SplitData:
    """Per split: positions in the dataset, label index, and whether a face crop exists for the image."""

    items: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    usable: dict[str, np.ndarray]


def usable_status(settings: Settings) -> set[str]:
    return {"ok", "no_face"} if settings.no_face_fallback else {"ok"}


def split_arrays(prepared: Prepared, split: Split, labels: list[str], settings: Settings) -> SplitData:
    label_of = {name: i for i, name in enumerate(labels)}
    ok = usable_status(settings)
    by_split: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, item in enumerate(prepared.dataset.items):
        name = split.assignment.get(item.rel)
        if name:
            by_split[name].append(i)
    items = {k: np.array(v, dtype=np.int64) for k, v in by_split.items()}
    y = {k: np.array([label_of.get(prepared.dataset.items[i].identity, -1) for i in v], dtype=np.int64)
         for k, v in items.items()}
    usable = {k: np.array([prepared.status[i] in ok for i in v], dtype=bool) for k, v in items.items()}
    return SplitData(items, y, usable)


def epoch_log(path: Path, stage: str):
    """A Keras callback: the learning rate into the history, and one line per epoch into ``train.log``."""
    import keras

    class EpochLog(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs = logs if logs is not None else {}
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            text = " ".join(f"{k}={v:.5g}" for k, v in sorted(logs.items()))
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(f"{stage} epoch {epoch + 1}: {text}\n")

    return EpochLog()


STEPS_PER_EXECUTION = 8


def mixup_batches(x: np.ndarray, y_onehot: np.ndarray, batch_size: int, alpha: float, seed: int):
    """Shuffled batches in which each example is blended with another of the same batch, labels alike,
    with Beta(alpha, alpha) weights. Deterministic for a seed."""
    import tensorflow as tf

    def mix(step, batch):
        xb, yb = batch
        n = tf.shape(xb)[0]
        a = tf.random.stateless_gamma([n, 1], [seed, 2 * step], alpha)
        b = tf.random.stateless_gamma([n, 1], [seed, 2 * step + 1], alpha)
        lam = a / (a + b)
        other = tf.random.experimental.stateless_shuffle(tf.range(n), [seed + 1, step])
        return lam * xb + (1 - lam) * tf.gather(xb, other), lam * yb + (1 - lam) * tf.gather(yb, other)

    data = tf.data.Dataset.from_tensor_slices((x.astype(np.float32), y_onehot.astype(np.float32)))
    data = data.shuffle(len(x), seed=seed, reshuffle_each_iteration=True).batch(batch_size)
    # enumerate() restarts every epoch; the epoch's own shuffle keeps the pairs changing.
    return data.enumerate().map(lambda i, b: mix(tf.cast(i, tf.int32), b)).prefetch(2)


def lr_schedule(settings: Settings, lr: float, epochs: int):
    """``plateau``: cut the rate by 0.3 when the monitored value stalls. ``cosine``: from ``lr`` down to
    ``lr / 1000`` along a half cosine over ``epochs``."""
    import math

    import keras

    if settings.lr_schedule == "plateau":
        return keras.callbacks.ReduceLROnPlateau(monitor=settings.monitor, factor=0.3, patience=settings.lr_patience,
                                                 min_delta=settings.min_delta, min_lr=lr / 1000)
    if settings.lr_schedule == "cosine":
        floor = lr / 1000
        return keras.callbacks.LearningRateScheduler(
            lambda epoch: floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * epoch / max(epochs - 1, 1))))
    raise ValueError(f"lr_schedule must be 'plateau' or 'cosine', not {settings.lr_schedule!r}")


def _fit(model, x, y, xv, yv, settings: Settings, run_dir: Path, stage: str, epochs: int, lr: float,
         class_weight=None, progress: bool = True, mixup: float = 0.0):
    import keras

    keras.utils.set_random_seed(settings.seed)
    model.compile(
        optimizer=keras.optimizers.AdamW(lr, weight_decay=settings.weight_decay),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=settings.label_smoothing),
        metrics=["accuracy"],
        # Several small steps per graph call: the head's steps are so cheap that per-call overhead dominated.
        steps_per_execution=STEPS_PER_EXECUTION,
    )
    n_classes = model.output_shape[-1]
    ckpt = run_dir / "checkpoints" / f"{stage}.weights.h5"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    callbacks = [
        epoch_log(run_dir / "train.log", stage),
        keras.callbacks.EarlyStopping(monitor=settings.monitor, patience=settings.early_stopping_patience,
                                      min_delta=settings.min_delta, restore_best_weights=True),
        lr_schedule(settings, lr, epochs),
        keras.callbacks.ModelCheckpoint(str(ckpt), monitor=settings.monitor, save_best_only=True,
                                        save_weights_only=True),
    ]
    targets = keras.utils.to_categorical(y, n_classes)
    if mixup:
        data = {"x": mixup_batches(x, targets, settings.batch_size, mixup, settings.seed), "shuffle": False}
    else:
        data = {"x": x, "y": targets, "batch_size": settings.batch_size, "shuffle": True, "class_weight": class_weight}
    history = model.fit(
        **data, validation_data=(xv, keras.utils.to_categorical(yv, n_classes)),
        epochs=epochs, callbacks=callbacks, verbose=2 if progress else 0,
    )
    hist = {k: [float(v) for v in vals] for k, vals in history.history.items()}
    series = hist.get(settings.monitor)
    if series:
        best = int(np.argmax(series)) if "acc" in settings.monitor else int(np.argmin(series))
    else:
        best = len(hist.get("loss", [])) - 1
    return {"stage": stage, "epochs_run": len(hist.get("loss", [])), "best_epoch": best + 1, "mixup": mixup, **hist}


def _class_weight(y: np.ndarray, n_classes: int) -> dict[int, float]:
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    weights = len(y) / (n_classes * np.maximum(counts, 1))
    return {i: float(w) for i, w in enumerate(weights)}


def augmented_embeddings(crops: np.ndarray, embedder, settings: Settings, views: int) -> np.ndarray:
    """``views`` random flip/zoom/rotation versions of each crop, each pushed through the backbone."""
    from pinsface.models import augmentation

    augment = augmentation(settings, name="augment_views")
    out = []
    for view in range(views):
        batches = []
        for lo in range(0, len(crops), 512):
            x = augment(crops[lo:lo + 512].astype(np.float32), training=True)
            batches.append(np.clip(np.asarray(x), 0, 255).astype(np.uint8))
        out.append(embedder(np.concatenate(batches)))
    return np.concatenate(out) if out else np.zeros((0, 128), np.float32)


def weights_fingerprint(model) -> str:
    import hashlib

    digest = hashlib.blake2b(digest_size=6)
    for w in model.get_weights():
        digest.update(np.ascontiguousarray(w).tobytes())
    return digest.hexdigest()


def fine_tune(backbone, head, crops: dict[str, np.ndarray], y: dict[str, np.ndarray], settings: Settings,
              run_dir: Path, progress: bool) -> dict:
    """Unfreeze the backbone from block ``settings.fine_tune_from`` up and train it with the head, at a low
    learning rate. The frozen lower part runs once per crop (and mirror image); its activations are the
    training inputs, so each epoch only costs the top blocks."""
    import keras

    from pinsface.embeddings import Embedder

    mid = backbone.get_layer(f"{settings.fine_tune_from}_conv1").input
    lower = keras.Model(backbone.input, mid, name="frozen_lower")
    upper = keras.Model(mid, backbone.output, name="tuned_upper")
    embed_lower = Embedder(lower, settings.embed_batch_size)
    x_train = np.concatenate([embed_lower(crops["train"]), embed_lower(crops["train"], flip=True)])
    y_train = np.concatenate([y["train"], y["train"]])
    x_val = embed_lower(crops["val"])
    backbone.trainable = True
    for layer in backbone.layers:
        layer.trainable = layer in upper.layers
    inputs = keras.Input(mid.shape[1:], name="lower_activations")
    model = keras.Model(inputs, head(upper(inputs)), name="fine_tune")
    history = _fit(model, x_train, y_train, x_val, y["val"], settings, run_dir, "fine-tune",
                   settings.fine_tune_epochs, settings.fine_tune_learning_rate, None, progress)
    backbone.trainable = False
    return history


def train(data_dir=None, out_dir="runs/latest", settings: Settings | None = None, cache_dir=None,
          progress: bool = True, prepared: Prepared | None = None, engine: str = "local",
          address: str | None = None) -> dict:
    """Prepare (if needed) and train ``settings.model``; write the run folder and return a summary.
    ``engine``/``address``: where prepare runs (``pinsface.prepare.prepare``)."""
    import keras

    from pinsface.cache import default_cache_dir
    from pinsface.dataset import default_data_dir

    settings = settings or Settings()
    if settings.model == "embedding" and settings.mixup and settings.class_weights:
        raise ValueError("mixup and class weights do not combine: set Settings.mixup=0 to use class weights")
    run_dir = Path(out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train.log").write_text("", encoding="utf-8")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    if prepared is None:
        settings.data_dir = str(Path(data_dir if data_dir else default_data_dir()).resolve())
        settings.cache_dir = str(Path(cache_dir or default_cache_dir()).resolve())
        prepared = prepare(settings.data_dir, settings.cache_dir, settings.faces,
                           batch_size=settings.detect_batch_size, progress=progress, engine=engine, address=address,
                           embed=settings if settings.model == "embedding" else None)
    else:
        settings.data_dir = str(prepared.dataset.root)
        settings.cache_dir = str(prepared.cache.root)
    timings["prepare"] = time.perf_counter() - t0
    (run_dir / "prepare_summary.json").write_text(json.dumps(prepared.summary, indent=1, ensure_ascii=False))

    split = split_dataset(prepared.dataset, settings.seed, settings.test_fraction, settings.val_fraction)
    split.save(run_dir / "split.json")
    labels = list(prepared.dataset.identities)
    (run_dir / "labels.json").write_text(json.dumps(labels, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    data = split_arrays(prepared, split, labels, settings)
    n_classes = len(labels)
    keras.utils.set_random_seed(settings.seed)

    items = prepared.dataset.items
    hashes = {k: [prepared.hashes[i] for i in v[data.usable[k]]] for k, v in data.items.items()}
    y = {k: data.labels[k][data.usable[k]] for k in data.items}
    histories = []

    if settings.model == "embedding":
        from pinsface.backbones import get_backbone
        from pinsface.embeddings import ensure_embeddings, run_embedder, run_embedding_cache
        from pinsface.models import build_embedding_model, build_head

        t2 = time.perf_counter()
        backbone = get_backbone(settings.backbone)
        embedder = run_embedder(settings, backbone)
        settings.embedding_key = ""
        emb_cache = run_embedding_cache(settings, settings.cache_dir)
        emb = {k: ensure_embeddings(hashes[k], prepared.cache, emb_cache, embedder, progress=progress)
               for k in hashes}
        timings["embed"] = time.perf_counter() - t2
        if settings.augment_views or settings.fine_tune:
            faces = prepared.cache.load(sorted(set(hashes["train"]) | set(hashes["val"])), crops=("aligned",))

        t3 = time.perf_counter()
        x_train = [emb["train"][0], emb["train"][1]]
        y_train = [y["train"], y["train"]]
        if settings.augment_views:
            crops = faces.columns["aligned"][faces.rows(hashes["train"])]
            x_train.append(augmented_embeddings(crops, embedder, settings, settings.augment_views))
            y_train.extend([y["train"]] * settings.augment_views)
            del crops
        timings["augment"] = time.perf_counter() - t3
        x_train, y_train = np.concatenate(x_train), np.concatenate(y_train)

        t4 = time.perf_counter()
        head = build_head(n_classes, settings, backbone.output_shape[-1])
        cw = _class_weight(y_train, n_classes) if settings.class_weights else None
        histories.append(_fit(head, x_train, y_train, emb["val"][0], y["val"], settings, run_dir, "head",
                              settings.epochs, settings.learning_rate, cw, progress, mixup=settings.mixup))
        timings["train_head"] = time.perf_counter() - t4
        backbone.trainable = False
        settings.embedding_key = settings.backbone
        if settings.fine_tune:
            t5 = time.perf_counter()
            crops = {k: faces.columns["aligned"][faces.rows(hashes[k])] for k in ("train", "val")}
            histories.append(fine_tune(backbone, head, crops, y, settings, run_dir, progress))
            settings.embedding_key = f"{settings.backbone}-ft-{weights_fingerprint(backbone)}"
            timings["fine_tune"] = time.perf_counter() - t5
        model = build_embedding_model(backbone, head, settings)

        t6 = time.perf_counter()
        from pinsface.gallery import build_gallery

        if settings.fine_tune:  # the tuned backbone embeds differently: embed the gallery faces again
            tuned_cache = run_embedding_cache(settings, settings.cache_dir)
            embedder = run_embedder(settings, backbone)
            emb = {k: ensure_embeddings(hashes[k], prepared.cache, tuned_cache, embedder, progress=progress)
                   for k in ("train", "val")}
        gallery = build_gallery(labels, emb["train"][0], emb["train"][1], y["train"], emb["val"][0], emb["val"][1],
                                y["val"], head, settings.target_far)
        gallery.save(run_dir / "gallery.npz")
        timings["calibrate"] = time.perf_counter() - t6
    elif settings.model == "pixels-mlp":
        from pinsface.models import build_pixels_mlp

        t4 = time.perf_counter()
        faces = prepared.cache.load(sorted({h for v in hashes.values() for h in v}), crops=("box",))
        box = {k: faces.columns["box"][faces.rows(hashes[k])][..., None] for k in hashes}
        model = build_pixels_mlp(n_classes, settings, settings.faces.box_size)
        cw = _class_weight(y["train"], n_classes) if settings.class_weights else None
        histories.append(_fit(model, box["train"], y["train"], box["val"], y["val"], settings, run_dir, "pixels",
                              settings.epochs, settings.learning_rate, cw, progress))
        timings["train"] = time.perf_counter() - t4
    else:
        raise ValueError(f"unknown model {settings.model!r}; choose one of embedding, pixels-mlp")

    model.save(run_dir / "model.keras")
    settings.save(run_dir / "config.json")
    timings["total"] = time.perf_counter() - t0
    history = {"stages": histories, "timings_seconds": {k: round(v, 2) for k, v in timings.items()}}
    (run_dir / "history.json").write_text(json.dumps(history, indent=1) + "\n", encoding="utf-8")

    from pinsface.evaluate import score_images, topk_correct

    val_probs, val_usable = score_images(model, settings, prepared, data.items["val"])
    val_top1 = float(np.mean(topk_correct(val_probs, val_usable, data.labels["val"], 1))) if len(val_probs) else 0.0
    with open(run_dir / "train.log", "a", encoding="utf-8") as fh:
        fh.write(f"model {settings.model}: {len(items)} images, {n_classes} identities, "
                 f"validation top-1 {val_top1:.4f}, timings {history['timings_seconds']}\n")
    return {"run_dir": str(run_dir), "val_top1": val_top1, "timings": history["timings_seconds"],
            "prepared": prepared}


def run(data_dir=None, out_dir="runs/latest", settings: Settings | None = None, cache_dir=None,
        progress: bool = True, engine: str = "local", address: str | None = None) -> dict:
    """prepare -> train -> evaluate on the test split; returns the evaluation metrics."""
    from pinsface.evaluate import evaluate

    result = train(data_dir, out_dir, settings, cache_dir=cache_dir, progress=progress, engine=engine,
                   address=address)
    return evaluate(out_dir, prepared=result["prepared"], progress=progress)
