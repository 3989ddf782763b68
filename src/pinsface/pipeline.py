"""The conductor: resolve the settings -> prepare -> split -> embed -> fit the head (-> final refit) (-> fine-tune)
-> calibrate -> save the run -> (evaluate).

Each stage is a function that returns a small frozen dataclass with what the next stages need; the work itself is
other modules'. The caller's ``Settings`` are never changed: ``resolve_settings`` makes the run's own copy once, at
the start, and the only later change, the fine-tuned backbone's embedding key, makes a second copy by name
(``Trained.settings``), which is what the run folder keeps.
"""

from __future__ import annotations

import contextlib
import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pinsface.clock import StageClock
from pinsface.dataset import Split, split_dataset
from pinsface.fitting import Examples, Plan, TrainLog
from pinsface.prepare import Prepared, prepare_for_run, usable_status
from pinsface.runfolder import Run
from pinsface.settings import Settings

if TYPE_CHECKING:
    import keras

    from pinsface.cache import FaceCache, FaceTable
    from pinsface.dataset import Dataset
    from pinsface.embeddings import Embedder
    from pinsface.gallery import Gallery


@dataclass(frozen=True)
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


# --- what every stage reads, and what the caller gives ---------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """What every stage reads: the run folder it writes to, the run's settings, the stage clock, and whether
    to show progress."""

    run: Run
    settings: Settings
    clock: StageClock
    progress: bool

    @property
    def log(self) -> TrainLog:
        return TrainLog(self.run.log_path, self.run.checkpoint_dir, echo=self.progress)

    @contextlib.contextmanager
    def timed(self, stage: str):
        """Times the block as ``stage`` in the run's history (only when it finishes)."""
        mark = self.clock.mark()
        yield
        self.clock.record(stage, mark)


@dataclass(frozen=True)
class Source:
    """Where the faces come from: ``dataset``, either ``prepared`` by the caller already, or to be prepared by
    ``engine`` (at ``address``, for Ray)."""

    dataset: Dataset
    prepared: Prepared | None = None
    engine: str = "local"
    address: str | None = None


def resolve_settings(settings: Settings, source: Source, cache_dir) -> Settings:
    """The run's settings: the caller's, with the data and cache folders it uses and, for the embedding model,
    the pretrained backbone's embedding key (whatever a ``--config`` from a fine-tuned run said)."""
    from pinsface.cache import default_cache_dir

    if source.prepared is None:
        folders = {
            "data_dir": str(source.dataset.root.resolve()),
            "cache_dir": str(Path(cache_dir or default_cache_dir()).resolve()),
        }
    else:
        folders = {"data_dir": str(source.prepared.dataset.root), "cache_dir": str(source.prepared.cache.root)}
    key = {"embedding_key": settings.backbone} if settings.model == "embedding" else {}
    return dataclasses.replace(settings, **folders, **key)


# --- the stages ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """The prepared dataset, and the backbone if prepare already loaded it (to embed new faces meanwhile)."""

    prepared: Prepared
    backbone: keras.Model | None = None


def prepare_stage(job: Job, source: Source) -> Ready:
    """Detect and align every image the cache lacks, unless the caller prepared them."""
    with job.timed("prepare"):
        ready = Ready(source.prepared) if source.prepared is not None else _prepare(job, source)
    job.run.save_prepare_summary(ready.prepared.summary)
    return ready


def _prepare(job: Job, source: Source) -> Ready:
    settings, backbone, background = job.settings, None, None
    if settings.model == "embedding" and source.engine == "local":
        from pinsface.backbones import get_backbone
        from pinsface.embeddings import BackgroundEmbedder, run_embedder, run_embedding_cache

        # New faces are embedded while the detector finds the next ones: the two share the cores.
        backbone = get_backbone(settings.backbone)
        background = BackgroundEmbedder(
            run_embedder(settings, backbone), run_embedding_cache(settings, settings.cache_dir)
        )
    try:
        prepared = prepare_for_run(
            settings,
            progress=job.progress,
            engine=source.engine,
            address=source.address,
            dataset=source.dataset,
            on_records=background,
        )
    finally:
        if background is not None:
            background.close()
    if background is not None:
        prepared.summary["embedded_during_prepare"] = background.faces
    return Ready(prepared, backbone)


@dataclass(frozen=True)
class SplitFaces:
    """The identities, every image of each split (``data``), and each split's usable faces: their content
    hashes and label indices."""

    labels: list[str]
    data: SplitData
    hashes: dict[str, list[str]]
    y: dict[str, np.ndarray]

    @property
    def n_classes(self) -> int:
        return len(self.labels)


def split_stage(job: Job, prepared: Prepared) -> SplitFaces:
    """Split the images into training, validation and test (saved in the run folder)."""
    settings = job.settings
    split = split_dataset(prepared.dataset, settings.seed, settings.test_fraction, settings.val_fraction)
    job.run.save_split(split)
    labels = list(prepared.dataset.identities)
    data = split_arrays(prepared, split, labels, settings)
    hashes = {k: [prepared.hashes[i] for i in v[data.usable[k]]] for k, v in data.items.items()}
    y = {k: data.labels[k][data.usable[k]] for k in data.items}
    return SplitFaces(labels, data, hashes, y)


@dataclass(frozen=True)
class Embedded:
    """The backbone, the embedder built on it, each split's (embedding, mirror image's embedding), the face
    cache they came from, and the training and validation faces' aligned crops where augmented views or
    fine-tuning need them."""

    backbone: keras.Model
    embedder: Embedder
    vectors: dict[str, tuple[np.ndarray, np.ndarray]]
    face_cache: FaceCache
    crops: FaceTable | None


def embed_stage(job: Job, ready: Ready, faces: SplitFaces) -> Embedded:
    """Embed every usable face with the pretrained backbone (the cached embeddings where there are)."""
    from pinsface.backbones import get_backbone
    from pinsface.embeddings import ensure_embeddings, run_embedder, run_embedding_cache

    settings, cache = job.settings, ready.prepared.cache
    with job.timed("embed"):
        backbone = ready.backbone if ready.backbone is not None else get_backbone(settings.backbone)
        embedder = run_embedder(settings, backbone)
        store = run_embedding_cache(settings, settings.cache_dir)
        vectors = {
            k: ensure_embeddings(h, cache, store, embedder, progress=job.progress) for k, h in faces.hashes.items()
        }
    crops = None
    if settings.augment_views or settings.fine_tune:
        crops = cache.load(sorted(set(faces.hashes["train"]) | set(faces.hashes["val"])), crops=("aligned",))
    return Embedded(backbone, embedder, vectors, cache, crops)


def _aligned(crops: FaceTable, hashes: list[str]) -> np.ndarray:
    return crops.columns["aligned"][crops.rows(hashes)]


@dataclass(frozen=True)
class HeadExamples:
    """The head's training examples: (faces, views, dim) with one view drawn per step, or every view as its
    own example (examples, dim)."""

    x: np.ndarray
    y: np.ndarray


def head_examples_stage(job: Job, embedded: Embedded, faces: SplitFaces) -> HeadExamples:
    """The views of each training face: its embedding, its mirror image's, and any augmented ones."""
    from pinsface.fitting import VIEW_SAMPLING_FROM, augmented_embeddings

    settings, (emb, emb_flip) = job.settings, embedded.vectors["train"]
    with job.timed("augment"):
        views = [emb, emb_flip]
        if settings.augment_views:
            crops = _aligned(embedded.crops, faces.hashes["train"])
            extra = augmented_embeddings(crops, embedded.embedder, settings, settings.augment_views)
            views.extend(np.split(extra, settings.augment_views))
            del crops
    y = faces.y["train"]
    if len(y) >= VIEW_SAMPLING_FROM:
        return HeadExamples(np.stack(views, 1), y)
    # A small folder: every view in every epoch costs little, and its head needs all it can get.
    return HeadExamples(np.concatenate(views), np.concatenate([y] * len(views)))


@dataclass(frozen=True)
class GalleryStart:
    """The gallery of the pretrained embeddings, and the distances its calibration needs, being computed in a
    thread (none where fine-tuning will change the embeddings)."""

    gallery: Gallery
    leave_one_out: Future | None
    blend_distances: Future | None


def gallery_stage(job: Job, embedded: Embedded, faces: SplitFaces) -> GalleryStart:
    """Build the gallery and start its head-free distances."""
    from pinsface.gallery import new_gallery

    settings, emb, y = job.settings, embedded.vectors, faces.y
    # The gallery's distances need no head: with the backbone frozen they are computed in a thread while the
    # head trains (which keeps about one core busy), and only the thresholds wait for the head.
    side = ThreadPoolExecutor(1, thread_name_prefix="pinsface-gallery")
    gallery = new_gallery(faces.labels, emb, y)
    leave_one_out = None if settings.fine_tune else side.submit(gallery.leave_one_out)
    blend_distances = (
        side.submit(validation_distances, emb, y, faces.n_classes, gallery.knn)
        if settings.knn_blend and not settings.fine_tune
        else None
    )
    side.shutdown(wait=False)
    return GalleryStart(gallery, leave_one_out, blend_distances)


@dataclass(frozen=True)
class FittedHead:
    """A trained head and its fit's history (``pinsface.fitting.fit``)."""

    head: keras.Model
    history: dict


def fit_head_stage(job: Job, examples: HeadExamples, embedded: Embedded, faces: SplitFaces) -> FittedHead:
    """Train the head on the training faces' views, early-stopped on the validation faces."""
    from pinsface.fitting import class_weight, fit, head_epochs
    from pinsface.models import build_head

    settings = job.settings
    with job.timed("train_head"):
        head = build_head(faces.n_classes, settings, embedded.backbone.output_shape[-1])
        plan = Plan(
            "head",
            head_epochs(settings, len(examples.y)),
            settings.learning_rate,
            class_weight(examples.y, faces.n_classes) if settings.class_weights else None,
            mixup=settings.mixup,
        )
        val = embedded.vectors["val"][0], faces.y["val"]
        history = fit(head, Examples(examples.x, examples.y, *val), plan, settings=settings, log=job.log)
    return FittedHead(head, history)


def final_refit_stage(
    job: Job, chosen: FittedHead, examples: HeadExamples, embedded: Embedded, faces: SplitFaces
) -> FittedHead:
    """A new head trained on the training and validation faces together, replaying the epochs and learning
    rates that early stopping chose for ``chosen``."""
    from pinsface.fitting import fit
    from pinsface.models import build_head

    settings, val, y_val = job.settings, embedded.vectors["val"], faces.y["val"]
    with job.timed("final_fit"):
        head = build_head(faces.n_classes, settings, embedded.backbone.output_shape[-1])
        if examples.x.ndim == 3:
            val_views = np.stack([val[k % 2] for k in range(examples.x.shape[1])], 1)
            x_all, y_all = np.concatenate([examples.x, val_views]), np.concatenate([examples.y, y_val])
        else:
            x_all, y_all = np.concatenate([examples.x, *val]), np.concatenate([examples.y, y_val, y_val])
        best = chosen.history["best_epoch"]
        plan = Plan(
            "final", best, settings.learning_rate, mixup=settings.mixup, replay=chosen.history["learning_rate"][:best]
        )
        history = fit(head, Examples(x_all, y_all, val[0], y_val), plan, settings=settings, log=job.log)
        history["note"] = "trained on the training and validation faces: its validation figures are not held out"
    return FittedHead(head, history)


@dataclass(frozen=True)
class Tuned:
    """The fine-tuning's history, and the key that names the tuned backbone's embeddings."""

    history: dict
    embedding_key: str


def fine_tune_stage(job: Job, head: keras.Model, embedded: Embedded, faces: SplitFaces) -> Tuned:
    """Train the backbone's top blocks with ``head`` (both changed in place)."""
    from pinsface.fitting import fine_tune, weights_fingerprint

    settings, y = job.settings, faces.y
    with job.timed("fine_tune"):
        train, val = (_aligned(embedded.crops, faces.hashes[k]) for k in ("train", "val"))
        crops = Examples(train, y["train"], val, y["val"])
        history = fine_tune(embedded.backbone, head, crops, settings=settings, log=job.log)
        key = f"{settings.backbone}-ft-{weights_fingerprint(embedded.backbone)}"
    return Tuned(history, key)


@dataclass(frozen=True)
class Calibrated:
    """The calibrated gallery, and the training and validation faces' embeddings it holds."""

    gallery: Gallery
    vectors: dict[str, tuple[np.ndarray, np.ndarray]]


def calibrate_stage(
    job: Job, head: keras.Model, embedded: Embedded, faces: SplitFaces, start: GalleryStart
) -> Calibrated:
    """Set the gallery's thresholds, and the head/nearest-faces blend, with ``head``: one that did not train on
    the validation faces, so that its probabilities for them look like those for a face it never saw. After
    fine-tuning, ``job.settings`` name the tuned backbone's embeddings."""
    settings, y, vectors, gallery = job.settings, faces.y, embedded.vectors, start.gallery
    with job.timed("calibrate"):
        if settings.fine_tune:  # the tuned backbone embeds differently: embed the gallery faces again
            vectors, gallery = _embed_again(job, embedded, faces)
        gallery.calibrate(head, settings.target_far, start.leave_one_out.result() if start.leave_one_out else None)
        if settings.knn_blend:
            dists = (
                start.blend_distances.result()
                if start.blend_distances
                else validation_distances(vectors, y, faces.n_classes, gallery.knn)
            )
            gallery.knn_weight, gallery.knn_tau = choose_blend_on_validation(head, vectors, y, dists)
    return Calibrated(gallery, vectors)


def _embed_again(job: Job, embedded: Embedded, faces: SplitFaces):
    """The training and validation faces' embeddings by the backbone as it is now, and a gallery of them."""
    from pinsface.embeddings import ensure_embeddings, run_embedder, run_embedding_cache
    from pinsface.gallery import new_gallery

    settings, y = job.settings, faces.y
    store, embedder = run_embedding_cache(settings, settings.cache_dir), run_embedder(settings, embedded.backbone)
    vectors = {
        k: ensure_embeddings(faces.hashes[k], embedded.face_cache, store, embedder, progress=job.progress)
        for k in ("train", "val")
    }
    return vectors, new_gallery(faces.labels, vectors, y)


@dataclass(frozen=True)
class Trained:
    """A trained model with what the run folder keeps of it, and what judges it on the validation faces.

    ``settings``: the run's, as saved (after fine-tuning they name the tuned backbone's embeddings).
    ``calibration_head`` and ``val_vectors``: the embedding model's head that did not train on the validation
    faces, and those faces' embeddings (none for pixels-mlp, judged by the whole model)."""

    settings: Settings
    model: keras.Model
    gallery: Gallery | None
    histories: tuple[dict, ...]
    calibration_head: keras.Model | None = None
    val_vectors: tuple[np.ndarray, np.ndarray] | None = None


def train_embedding_model(job: Job, ready: Ready, faces: SplitFaces) -> Trained:
    """The backbone's embeddings, a head trained on them (optionally refitted, and fine-tuned with the
    backbone's top blocks), and the gallery calibrated with the head that did not train on the validation faces."""
    from pinsface.models import build_embedding_model

    settings = job.settings
    embedded = embed_stage(job, ready, faces)
    examples = head_examples_stage(job, embedded, faces)
    start = gallery_stage(job, embedded, faces)
    fitted = fit_head_stage(job, examples, embedded, faces)
    final = fitted
    if settings.final_fit == "train+val":
        final = final_refit_stage(job, fitted, examples, embedded, faces)
    embedded.backbone.trainable = False
    tuned = fine_tune_stage(job, final.head, embedded, faces) if settings.fine_tune else None
    run_job, calibration_head = job, fitted.head
    if tuned is not None:
        # The run's embeddings are now the tuned backbone's, named by its own key, and they belong to the head
        # tuned with it.
        tuned_settings = dataclasses.replace(settings, embedding_key=tuned.embedding_key)
        run_job, calibration_head = dataclasses.replace(job, settings=tuned_settings), final.head
    model = build_embedding_model(embedded.backbone, final.head, run_job.settings)
    calibrated = calibrate_stage(run_job, calibration_head, embedded, faces, start)
    histories = [fitted.history]
    if final is not fitted:
        histories.append(final.history)
    if tuned is not None:
        histories.append(tuned.history)
    return Trained(
        run_job.settings, model, calibrated.gallery, tuple(histories), calibration_head, calibrated.vectors["val"]
    )


def train_pixels_mlp(job: Job, ready: Ready, faces: SplitFaces) -> Trained:
    """The brief's baseline network, trained on the faces' grayscale box crops."""
    from pinsface.fitting import class_weight, fit
    from pinsface.models import build_pixels_mlp

    settings, hashes, y = job.settings, faces.hashes, faces.y
    with job.timed("train"):
        table = ready.prepared.cache.load(sorted({h for v in hashes.values() for h in v}), crops=("box",))
        box = {k: table.columns["box"][table.rows(hashes[k])][..., None] for k in hashes}
        model = build_pixels_mlp(faces.n_classes, settings, settings.faces.box_size)
        weights = class_weight(y["train"], faces.n_classes) if settings.class_weights else None
        plan = Plan("pixels", settings.epochs, settings.learning_rate, weights)
        examples = Examples(box["train"], y["train"], box["val"], y["val"])
        history = fit(model, examples, plan, settings=settings, log=job.log)
    return Trained(settings, model, None, (history,))


TRAINERS = {"embedding": train_embedding_model, "pixels-mlp": train_pixels_mlp}


def save_stage(job: Job, trained: Trained, faces: SplitFaces, start_mark) -> dict:
    """Write the run's settings, state and history (with every stage's time, the whole since ``start_mark``)
    into the run folder; returns the history."""
    job.run.save_settings(trained.settings)
    job.run.save_state(faces.labels, trained.model, trained.gallery)
    job.clock.record("total", start_mark)
    history = {
        "stages": list(trained.histories),
        "timings_seconds": job.clock.seconds,
        "cpu_share": job.clock.cpu_share,
    }
    job.run.save_history(history)
    return history


def validation_top1(trained: Trained, prepared: Prepared, faces: SplitFaces) -> float:
    """The share of validation images named right (an image without a usable face counts as missed)."""
    from pinsface.scoring import head_probabilities, score_images, topk_correct

    items = faces.data.items["val"]
    if trained.calibration_head is not None:  # judged by the head that did not train on the validation faces
        correct = np.argmax(head_probabilities(trained.calibration_head, *trained.val_vectors), 1) == faces.y["val"]
        return float(correct.sum() / max(len(items), 1))
    probs, usable = score_images(trained.model, trained.settings, prepared, items)
    return float(np.mean(topk_correct(probs, usable, faces.data.labels["val"], 1))) if len(probs) else 0.0


# --- the whole run ------------------------------------------------------------------------------------------------


def train(
    data_dir=None,
    out_dir="runs/latest",
    settings: Settings | None = None,
    *,
    cache_dir=None,
    progress: bool = True,
    prepared: Prepared | None = None,
    engine: str = "local",
    address: str | None = None,
) -> dict:
    """Prepare (if needed) and train ``settings.model``; write the run folder and return a summary.
    ``engine``/``address``: where prepare runs (``pinsface.prepare.prepare``)."""
    from pinsface.dataset import check_trainable, default_data_dir, scan_dataset

    dataset = prepared.dataset if prepared else scan_dataset(data_dir if data_dir else default_data_dir())
    check_trainable(dataset)
    source = Source(dataset, prepared, engine, address)
    resolved = resolve_settings(settings or Settings(), source, cache_dir)
    run = Run(out_dir).create()
    with run.lock():
        return _train(Job(run, resolved, StageClock(), progress), source)


def _train(job: Job, source: Source) -> dict:
    import keras

    job.run.start_log()
    start = job.clock.mark()
    ready = prepare_stage(job, source)
    faces = split_stage(job, ready.prepared)
    keras.utils.set_random_seed(job.settings.seed)  # the models' initial weights
    trained = TRAINERS[job.settings.model](job, ready, faces)
    history = save_stage(job, trained, faces, start)
    val_top1 = validation_top1(trained, ready.prepared, faces)
    job.run.log(
        f"model {trained.settings.model}: {len(ready.prepared.dataset.items)} images, {faces.n_classes} identities, "
        f"validation top-1 {val_top1:.4f}, timings {history['timings_seconds']}"
    )
    return {
        "run_dir": str(job.run.path),
        "val_top1": val_top1,
        "timings": history["timings_seconds"],
        "prepared": ready.prepared,
        "settings": trained.settings,
        "model": trained.model,
    }


def run(
    data_dir=None,
    out_dir="runs/latest",
    settings: Settings | None = None,
    *,
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
