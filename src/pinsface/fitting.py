"""Fit the models' trainable parts: the embedding head (on cached embeddings of each face and its mirror
image), the pixels-mlp baseline, optional fine-tuning of the backbone's top blocks, and the head's refit when
people are enrolled or forgotten. What to train on comes from the caller (``pinsface.pipeline``); what is
fitted goes back to it, except the per-epoch log lines and best-epoch checkpoints, written where it says."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pinsface.settings import Settings

log = logging.getLogger(__name__)


def epoch_log(path: Path, stage: str, echo: bool = False):
    """A Keras callback: one line per epoch into ``train.log`` (and, with ``echo``, onto the terminal)."""
    import keras

    class EpochLog(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs = logs if logs is not None else {}
            line = f"{stage} epoch {epoch + 1}: " + " ".join(f"{k}={v:.5g}" for k, v in sorted(logs.items()))
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
            if echo:
                print(line, flush=True)

    return EpochLog()


def mix_batch(xb, yb, alpha: float, seed: int, step):
    """Each example blended with another of the same batch, labels alike, with Beta(alpha, alpha) weights.
    Deterministic for (seed, step)."""
    import tensorflow as tf

    n = tf.shape(xb)[0]
    a = tf.random.stateless_gamma([n, 1], [seed, 2 * step], alpha)
    b = tf.random.stateless_gamma([n, 1], [seed, 2 * step + 1], alpha)
    lam = a / (a + b)
    other = tf.random.experimental.stateless_shuffle(tf.range(n), [seed + 1, step])
    lam_x = tf.reshape(lam, tf.concat([[n], tf.ones([tf.rank(xb) - 1], tf.int32)], 0))
    return lam_x * xb + (1 - lam_x) * tf.gather(xb, other), lam * yb + (1 - lam) * tf.gather(yb, other)


def lr_schedule(settings: Settings, lr: float, epochs: int):
    """``plateau``: cut the rate by 0.3 when the monitored value stalls. ``cosine``: from ``lr`` down to
    ``lr / 1000`` along a half cosine over ``epochs``."""
    import math

    import keras

    if settings.lr_schedule == "plateau":
        return keras.callbacks.ReduceLROnPlateau(
            monitor=settings.monitor,
            factor=0.3,
            patience=settings.lr_patience,
            min_delta=settings.min_delta,
            min_lr=lr / 1000,
        )
    if settings.lr_schedule == "cosine":
        floor = lr / 1000
        return keras.callbacks.LearningRateScheduler(
            lambda epoch: floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * epoch / max(epochs - 1, 1)))
        )
    raise ValueError(f"lr_schedule must be 'plateau' or 'cosine', not {settings.lr_schedule!r}")


@dataclass(frozen=True)
class Examples:
    """What a fit learns from, (``x``, ``y``), and what it is validated on, (``x_val``, ``y_val``).

    ``x`` is (examples, dim), or (examples, views, dim) for several views of each example (a face's embedding
    and its mirror image's): then each step takes one view of each example, drawn at random."""

    x: np.ndarray
    y: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


@dataclass(frozen=True)
class Plan:
    """How one fit trains: its name in the logs and checkpoints, at most ``epochs`` epochs from
    ``learning_rate``, optional class weights and mixup.

    With ``replay`` (the learning rate of each epoch of an earlier fit) it is a replay instead: exactly those
    epochs at those rates, no early stopping, the last epoch kept. That is the final refit on more data, whose
    validation faces are part of its training data and so cannot pick an epoch."""

    stage: str
    epochs: int
    learning_rate: float
    class_weight: dict[int, float] | None = None
    mixup: float = 0.0
    replay: list[float] | None = None


@dataclass(frozen=True)
class TrainLog:
    """Where a fit writes: one line per epoch into ``path`` (and, with ``echo``, onto the terminal), and its
    best epoch's weights into ``checkpoints``."""

    path: Path
    checkpoints: Path
    echo: bool = False


def fit(model, examples: Examples, plan: Plan, *, settings: Settings, log: TrainLog) -> dict:
    """Train ``model`` on the examples with early stopping and the LR schedule (or replay ``plan.replay``);
    returns the stage's history. The best epoch's weights are restored at the end.

    Each epoch is one compiled call: shuffling, mixup, every step and the metrics run inside one graph, because
    the head's steps are so cheap that per-step and per-batch overhead (Keras's loop, tf.data) cost several
    times the arithmetic. The epochs are driven by Keras's own callbacks, as ``Model.fit`` would."""
    import keras

    keras.utils.set_random_seed(settings.seed)
    model.compile(
        optimizer=keras.optimizers.AdamW(plan.learning_rate, weight_decay=settings.weight_decay),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=settings.label_smoothing),
    )
    callbacks, epochs = _callbacks(model, plan, settings, log)
    train_epoch = _epoch_trainer(model, examples, plan, settings)
    validate = _validator(model, examples)
    hist = _run_epochs(model, callbacks, epochs, train_epoch, validate)
    best = _best_epoch(hist, settings.monitor, replayed=bool(plan.replay))
    return {
        "stage": plan.stage,
        "epochs_run": len(hist.get("loss", [])),
        "best_epoch": best + 1,
        "mixup": plan.mixup,
        **hist,
    }


def _callbacks(model, plan: Plan, settings: Settings, log: TrainLog):
    """The Keras callbacks that drive a fit's epochs, and how many epochs it runs at most."""
    import keras

    ckpt = Path(log.checkpoints) / f"{plan.stage}.weights.h5"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    epochs = plan.epochs
    if plan.replay:
        epochs = len(plan.replay)
        control = [
            keras.callbacks.LearningRateScheduler(lambda epoch: float(plan.replay[epoch])),
            keras.callbacks.ModelCheckpoint(str(ckpt), save_weights_only=True),
        ]
    else:
        control = [
            keras.callbacks.EarlyStopping(
                monitor=settings.monitor,
                patience=settings.early_stopping_patience,
                min_delta=settings.min_delta,
                restore_best_weights=True,
            ),
            lr_schedule(settings, plan.learning_rate, epochs),
            keras.callbacks.ModelCheckpoint(
                str(ckpt), monitor=settings.monitor, save_best_only=True, save_weights_only=True
            ),
        ]
    callbacks = keras.callbacks.CallbackList([epoch_log(log.path, plan.stage, log.echo), *control], model=model)
    return callbacks, epochs


def _epoch_trainer(model, examples: Examples, plan: Plan, settings: Settings):
    """One epoch of training as one compiled call of the epoch's number; it returns the epoch's mean loss and
    accuracy. The model must be compiled."""
    import tensorflow as tf

    n_classes = model.output_shape[-1]
    optimizer, loss_fn = model.optimizer, model.loss
    x = tf.convert_to_tensor(np.asarray(examples.x, np.float32))
    views = x.shape[1] if x.shape.rank == 3 else 0
    targets = tf.one_hot(tf.convert_to_tensor(examples.y, tf.int32), n_classes)
    weights = (
        tf.ones([n_classes])
        if plan.class_weight is None
        else tf.constant([plan.class_weight.get(k, 1.0) for k in range(n_classes)], tf.float32)
    )
    batch, seed, n, mixup = settings.batch_size, settings.seed, len(examples.y), plan.mixup
    steps = -(-n // batch)
    variables = model.trainable_variables
    optimizer.build(variables)  # its slots made now, or the first call would trace the epoch twice

    @tf.function(reduce_retracing=True)
    def train_epoch(epoch):
        order = tf.random.experimental.stateless_shuffle(tf.range(n), [seed, epoch])
        total_loss, total_correct = tf.constant(0.0), tf.constant(0.0)
        for step in tf.range(steps):
            rows = order[step * batch : tf.minimum((step + 1) * batch, n)]
            xb, yb = tf.gather(x, rows), tf.gather(targets, rows)
            if views:
                pick = tf.random.stateless_uniform(
                    [tf.shape(rows)[0]], [seed + 2, epoch * steps + step], 0, views, "int32"
                )
                xb = tf.gather(xb, pick, batch_dims=1)
            if mixup:
                xb, yb = mix_batch(xb, yb, mixup, seed, epoch * steps + step)
            sample_weight = tf.gather(weights, tf.argmax(yb, 1))
            with tf.GradientTape() as tape:
                probs = model(xb, training=True)
                loss = loss_fn(yb, probs, sample_weight=sample_weight)
            optimizer.apply(tape.gradient(loss, variables), variables)
            count = tf.cast(tf.shape(rows)[0], tf.float32)
            total_loss += loss * count
            total_correct += tf.reduce_sum(tf.cast(tf.argmax(probs, 1) == tf.argmax(yb, 1), tf.float32))
        return total_loss / n, total_correct / n

    return train_epoch


def _validator(model, examples: Examples):
    """The validation loss and accuracy, as one compiled call."""
    import tensorflow as tf

    n_classes, loss_fn, y_val = model.output_shape[-1], model.loss, examples.y_val
    x_val = tf.convert_to_tensor(np.asarray(examples.x_val, np.float32))
    val_targets = tf.one_hot(tf.convert_to_tensor(y_val, tf.int32), n_classes)

    @tf.function(reduce_retracing=True)
    def validate():
        probs = (
            tf.concat([model(x_val[lo : lo + 4096], training=False) for lo in range(0, len(y_val), 4096)], 0)
            if len(y_val)
            else tf.zeros([0, n_classes])
        )
        accuracy = tf.reduce_mean(tf.cast(tf.argmax(probs, 1) == tf.argmax(val_targets, 1), tf.float32))
        return loss_fn(val_targets, probs), accuracy

    return validate


def _run_epochs(model, callbacks, epochs: int, train_epoch, validate) -> dict[str, list[float]]:
    """Up to ``epochs`` epochs, as Keras's callbacks direct (early stopping ends it); each epoch's figures."""
    import keras
    import tensorflow as tf

    hist: dict[str, list[float]] = {}
    model.stop_training = False
    callbacks.on_train_begin()
    for epoch in range(epochs):
        callbacks.on_epoch_begin(epoch)
        rate = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))  # before the schedule changes it
        loss, accuracy = train_epoch(tf.constant(epoch))
        val_loss, val_accuracy = validate()
        logs = {
            "loss": float(loss),
            "accuracy": float(accuracy),
            "val_loss": float(val_loss),
            "val_accuracy": float(val_accuracy),
            "learning_rate": rate,
        }
        callbacks.on_epoch_end(epoch, logs)
        for key, value in logs.items():
            hist.setdefault(key, []).append(float(value))
        if model.stop_training:
            break
    callbacks.on_train_end()
    return hist


def _best_epoch(hist: dict[str, list[float]], monitor: str, replayed: bool) -> int:
    """The epoch (from 0) whose weights the fit kept: the best by ``monitor``, or the last of a replay."""
    series = hist.get(monitor)
    if replayed or not series:
        return len(hist.get("loss", [])) - 1
    return int(np.argmax(series)) if "acc" in monitor else int(np.argmin(series))


# Training faces from which each step takes one view of each face (``fit`` with (faces, views, dim)) rather
# than every view: below it an epoch is a few steps anyway, and the head of a small folder, on which enrolment
# builds, learnt less from half the examples.
VIEW_SAMPLING_FROM = 4096

# Optimizer steps the head takes at least. On a small folder an epoch is a step or two, and the schedule's
# epochs alone would leave the head, whose features enrolment builds on, half trained.
MIN_HEAD_STEPS = 60


def head_epochs(settings: Settings, n_examples: int) -> int:
    """``settings.epochs``, or more where that many epochs would be under ``MIN_HEAD_STEPS`` steps."""
    steps = -(-max(n_examples, 1) // settings.batch_size)
    return max(settings.epochs, -(-MIN_HEAD_STEPS // steps))


def class_weight(y: np.ndarray, n_classes: int) -> dict[int, float]:
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    weights = len(y) / (n_classes * np.maximum(counts, 1))
    return {i: float(w) for i, w in enumerate(weights)}


def augmented_embeddings(crops: np.ndarray, embedder, settings: Settings, views: int) -> np.ndarray:
    """``views`` random flip/zoom/rotation versions of each crop, each pushed through the backbone."""
    from pinsface.models import augmentation

    augment = augmentation(settings, name="augment_views")
    out = []
    for _ in range(views):
        batches = []
        for lo in range(0, len(crops), 512):
            x = augment(crops[lo : lo + 512].astype(np.float32), training=True)
            batches.append(np.clip(np.asarray(x), 0, 255).astype(np.uint8))
        out.append(embedder(np.concatenate(batches)))
    return np.concatenate(out) if out else np.zeros((0, 128), np.float32)


def weights_fingerprint(model) -> str:
    import hashlib

    digest = hashlib.blake2b(digest_size=6)
    for w in model.get_weights():
        digest.update(np.ascontiguousarray(w).tobytes())
    return digest.hexdigest()


def fine_tune(backbone, head, crops: Examples, *, settings: Settings, log: TrainLog) -> dict:
    """Unfreeze the backbone from block ``settings.fine_tune_from`` up and train it with the head, at a low
    learning rate, on the aligned ``crops`` of the training and validation faces. The frozen lower part runs
    once per crop (and mirror image); its activations are the training inputs, so each epoch only costs the
    top blocks."""
    import keras

    from pinsface.embeddings import Embedder

    mid = backbone.get_layer(f"{settings.fine_tune_from}_conv1").input
    lower = keras.Model(backbone.input, mid, name="frozen_lower")
    upper = keras.Model(mid, backbone.output, name="tuned_upper")
    embed_lower = Embedder(lower, settings.embed_batch_size)
    activations = Examples(
        x=np.concatenate([embed_lower(crops.x), embed_lower(crops.x, flip=True)]),
        y=np.concatenate([crops.y, crops.y]),
        x_val=embed_lower(crops.x_val),
        y_val=crops.y_val,
    )
    backbone.trainable = True
    for layer in backbone.layers:
        layer.trainable = layer in upper.layers
    inputs = keras.Input(mid.shape[1:], name="lower_activations")
    model = keras.Model(inputs, head(upper(inputs)), name="fine_tune")
    plan = Plan("fine-tune", settings.fine_tune_epochs, settings.fine_tune_learning_rate)
    history = fit(model, activations, plan, settings=settings, log=log)
    backbone.trainable = False
    return history


def to_keras_head(array_head, settings: Settings, input_dim: int):
    """A Keras head (``build_head``) holding the weights of an ``ArrayHead``, imprinted columns included."""
    from pinsface.models import build_head

    head = build_head(array_head.n_classes, settings, input_dim)
    dense = iter(array_head.dense)
    for layer in head.layers:
        if layer.name.startswith("head_dense_"):
            layer.set_weights(list(next(dense)))
    if array_head.cosine_scale:
        head.get_layer("cosine_logits").set_weights([array_head.kernel])
    else:
        head.get_layer("logits").set_weights([array_head.kernel, array_head.bias])
    return head


def refit_head(old_head, gallery, settings: Settings, *, epochs: int = 30, tune_stack_epochs: int = 3):
    """A head for all of the gallery's identities, those enrolled since training included (``pinsface refit``).

    The dense stack is kept, known identities keep their output weights, a new identity starts from the mean of
    its faces' features (imprinting); the output layer trains on every enrolled face and its mirror image, then
    the whole head for ``tune_stack_epochs`` at a low learning rate, so its features can also tell the new face
    apart."""
    import keras

    # Seeded: the same gallery gives the same head, whatever the process did before.
    keras.utils.set_random_seed(settings.seed)
    n = len(gallery.labels)
    head = _head_with_frozen_stack(old_head, n, settings, gallery.embeddings.shape[1])
    features = keras.Model(head.input, head.get_layer("cosine_logits").input)
    x = np.concatenate([gallery.embeddings, gallery.flips])
    y = np.concatenate([gallery.owner, gallery.owner])
    h = features.predict(x, batch_size=2048, verbose=0)
    out_layer = head.get_layer("cosine_logits")
    out_layer.set_weights([_imprinted_output(old_head, h, y, n)])
    if epochs:
        _train_output_layer(out_layer, h, y, settings, epochs)
        if tune_stack_epochs:
            _tune_whole_head(head, x, y, settings, tune_stack_epochs)
    return head


# The batch of the refit's training, and the optimizer steps its output layer takes at least, however few faces
# are enrolled.
REFIT_BATCH = 256
REFIT_MIN_STEPS = 300


def _head_with_frozen_stack(old_head, n_classes: int, settings: Settings, input_dim: int):
    """A head for ``n_classes`` identities whose dense stack is ``old_head``'s, frozen; the output layer is left
    to the caller."""
    from pinsface.models import build_head

    head = build_head(n_classes, settings, input_dim)
    for layer in head.layers:
        if layer.weights and layer.name != "cosine_logits":
            layer.set_weights(old_head.get_layer(layer.name).get_weights())
            layer.trainable = False
    return head


def _imprinted_output(old_head, h: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    """The output layer's weights: ``old_head``'s columns, then one per new identity, imprinted from its faces'
    features ``h``."""
    old_w = old_head.get_layer("cosine_logits").get_weights()[0]
    w = np.zeros((old_w.shape[0], n_classes), np.float32)
    w[:, : old_w.shape[1]] = old_w
    # ReLU features share one big common direction: imprint the new identity with its features' offset from
    # the mean of everyone's, or it would look like everybody.
    for k in range(old_w.shape[1], n_classes):
        direction = h[y == k].mean(0) - h.mean(0)
        w[:, k] = direction / max(np.linalg.norm(direction), 1e-12) * np.linalg.norm(old_w, axis=0).mean()
    return w


def _train_output_layer(out_layer, h: np.ndarray, y: np.ndarray, settings: Settings, epochs: int):
    """Train the output layer alone on the faces' features ``h``."""
    import keras

    inputs = keras.Input(h.shape[1:])
    probe = keras.Model(inputs, keras.layers.Softmax()(out_layer(inputs)))
    n_classes = probe.output_shape[-1]
    epochs = max(epochs, int(np.ceil(REFIT_MIN_STEPS / np.ceil(len(h) / REFIT_BATCH))))
    _fit_classes(probe, h, y, n_classes, settings, learning_rate=1e-3, epochs=epochs)


def _tune_whole_head(head, x: np.ndarray, y: np.ndarray, settings: Settings, epochs: int):
    """Train every layer of the head a little, at a low learning rate, on the faces' embeddings ``x``."""
    for layer in head.layers:
        layer.trainable = True
    _fit_classes(head, x, y, head.output_shape[-1], settings, learning_rate=3e-4, epochs=epochs)


def _fit_classes(model, x: np.ndarray, y: np.ndarray, n_classes: int, settings: Settings, *, learning_rate, epochs):
    """``model`` (ending in a softmax) trained on ``x`` to identities ``y``, classes weighted by their size."""
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=settings.label_smoothing),
    )
    model.fit(
        x,
        keras.utils.to_categorical(y, n_classes),
        epochs=epochs,
        batch_size=REFIT_BATCH,
        verbose=0,
        class_weight=class_weight(y, n_classes),
        shuffle=True,
    )
