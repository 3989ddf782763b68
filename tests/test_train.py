import json

import keras
import numpy as np
import pytest

import pinsface.layers  # noqa: F401  (registers the custom layers for loading saved models)
from pinsface.dataset import Split
from pinsface.embeddings import Embedder, run_embedding_cache
from pinsface.fitting import mix_batch
from pinsface.models import build_head, build_pixels_mlp
from pinsface.settings import Settings


def test_run_folder_has_every_artifact(small_run):
    run_dir, result = small_run
    for name in (
        "model.keras",
        "labels.json",
        "config.json",
        "split.json",
        "history.json",
        "train.log",
        "prepare_summary.json",
    ):
        assert (run_dir / name).is_file(), name
    labels = json.loads((run_dir / "labels.json").read_text(encoding="utf-8"))
    assert len(labels) == 6 and "Brïe Lårson é" in labels
    config = Settings.load(run_dir / "config.json")
    assert config.model == "embedding" and config.faces.aligned_size == 150
    history = json.loads((run_dir / "history.json").read_text())
    stage = history["stages"][0]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
        assert len(stage[key]) == stage["epochs_run"] > 0, key
    assert 1 <= stage["best_epoch"] <= stage["epochs_run"]
    assert "validation top-1" in (run_dir / "train.log").read_text()
    split = Split.load(run_dir / "split.json")
    assert {"train", "val", "test"} == set(split.assignment.values())
    # Six well-separated people: the frozen embedding + head must be nearly perfect on validation.
    assert result["val_top1"] >= 0.9


def test_saved_model_is_the_whole_network_and_matches_the_cached_path(small_run, reference_chips):
    run_dir, result = small_run
    model = keras.saving.load_model(run_dir / "model.keras", safe_mode=True, compile=False)
    assert model.input_shape == (None, 150, 150, 3)
    assert model.output_shape == (None, 6)
    prepared = result["prepared"]
    hashes = [h for h, s in zip(prepared.hashes, prepared.status) if s == "ok"][:12]
    crops = prepared.cache.load(hashes, crops=("aligned",))
    x = crops.columns["aligned"][crops.rows(hashes)].astype(np.float32)
    full = model.predict(x, verbose=0)
    settings = Settings.load(run_dir / "config.json")
    index, emb, emb_flip = run_embedding_cache(settings, prepared.cache.root).load(hashes)
    rows = [index[h] for h in hashes]
    head = model.get_layer("head")
    cached = (head.predict(emb[rows], verbose=0) + head.predict(emb_flip[rows], verbose=0)) / 2
    # The same path in float32, as the saved model runs: it must agree to rounding.
    embedder = Embedder(model.get_layer(settings.backbone), precision="float32")
    e32, f32 = embedder.both_views(x.astype(np.uint8))
    assert np.allclose(full, (head.predict(e32, verbose=0) + head.predict(f32, verbose=0)) / 2, atol=1e-4)
    # The cache holds bfloat16 embeddings where the CPU computes them natively: the same answers, and
    # probabilities within bfloat16's rounding (a face between two people moves most).
    assert np.array_equal(full.argmax(1), cached.argmax(1))
    assert np.allclose(full, cached, atol=2e-2)
    assert np.allclose(full.sum(1), 1.0, atol=1e-4)
    # Augmentation is inactive at inference: two calls agree exactly.
    assert np.array_equal(model.predict(x[:4], verbose=0), model.predict(x[:4], verbose=0))


def test_every_model_the_settings_accept_has_a_trainer():
    from pinsface.pipeline import TRAINERS
    from pinsface.settings import MODELS

    # Settings refuses any other model when built, so the pipeline needs no check of its own.
    assert set(TRAINERS) == set(MODELS)


def test_pixels_mlp_is_the_briefs_network():
    model = build_pixels_mlp(105, Settings(model="pixels-mlp"))
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert [d.units for d in dense] == [512, 256, 128, 105]
    assert [d.activation.__name__ for d in dense] == ["relu", "relu", "relu", "softmax"]
    assert sum(isinstance(layer, keras.layers.Dropout) for layer in model.layers) == 3
    flatten = model.get_layer("flatten")
    assert flatten.output.shape[-1] == 10_000
    x = np.full((2, 100, 100, 1), 255, np.uint8)
    assert np.allclose(model.predict(x, verbose=0).sum(1), 1, atol=1e-5)


def test_embedding_head_has_the_briefs_dense_stack():
    head = build_head(105, Settings())
    dense = [layer for layer in head.layers if isinstance(layer, keras.layers.Dense)]
    assert [d.units for d in dense] == [512, 256, 128]
    assert head.output_shape == (None, 105)


def test_pixels_mlp_trains_and_saves(tmp_path, small_dataset, detector):
    from pinsface.pipeline import train
    from pinsface.prepare import prepare

    settings = Settings(model="pixels-mlp", epochs=3, test_fraction=0.25, val_fraction=0.25)
    prepared = prepare(small_dataset, tmp_path / "cache", settings.faces, progress=False, detector=detector)
    result = train(out_dir=tmp_path / "run", settings=settings, progress=False, prepared=prepared)
    model = keras.saving.load_model(tmp_path / "run" / "model.keras", safe_mode=True, compile=False)
    assert model.input_shape == (None, 100, 100, 1)
    assert 0.0 <= result["val_top1"] <= 1.0


def test_unknown_model_name_is_refused_before_any_work():
    from pinsface.errors import SettingsError

    with pytest.raises(SettingsError, match="model must be one of embedding, pixels-mlp, not 'resnet'"):
        Settings(model="resnet")


def test_mixup_blends_inputs_and_labels_alike_and_is_repeatable():
    n = 64
    x = np.eye(n, dtype=np.float32)  # input == label, so any blend must keep them equal
    batches = [mix_batch(x[lo : lo + 16], x[lo : lo + 16], 0.4, seed=3, step=lo // 16) for lo in range(0, n, 16)]
    xb = np.concatenate([b[0].numpy() for b in batches])
    yb = np.concatenate([b[1].numpy() for b in batches])
    np.testing.assert_allclose(xb, yb, atol=1e-6)
    np.testing.assert_allclose(yb.sum(1), 1.0, atol=1e-5)
    assert np.mean(yb.max(1) < 0.999) > 0.5  # most examples really are blends
    again = mix_batch(x[:16], x[:16], 0.4, seed=3, step=0)[0].numpy()
    np.testing.assert_array_equal(xb[:16], again)
    images = np.ones((4, 5, 5, 1), np.float32)  # image batches blend too (the pixels-mlp baseline)
    assert mix_batch(images, np.eye(4, dtype=np.float32), 0.4, 1, 0)[0].shape == images.shape


def test_mixup_and_class_weights_do_not_combine(tmp_path, small_dataset):
    from pinsface.pipeline import train

    with pytest.raises(ValueError, match="mixup and class weights"):
        train(
            small_dataset, tmp_path / "run", Settings(class_weights=True), cache_dir=tmp_path / "cache", progress=False
        )
    assert not (tmp_path / "cache").exists()  # refused before any work


def test_learning_rate_schedules():
    from pinsface.fitting import lr_schedule

    cosine = lr_schedule(Settings(lr_schedule="cosine"), 1e-3, 10)
    assert cosine.schedule(0) == pytest.approx(1e-3) and cosine.schedule(9) == pytest.approx(1e-6)
    assert cosine.schedule(3) > cosine.schedule(4) > cosine.schedule(5)
    plateau = lr_schedule(Settings(lr_schedule="plateau"), 1e-3, 10)
    assert isinstance(plateau, keras.callbacks.ReduceLROnPlateau) and plateau.min_delta == Settings().min_delta
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_schedule(Settings(lr_schedule="step"), 1e-3, 10)


def test_fine_tuning_changes_the_top_blocks_and_re_embeds_the_gallery(tmp_path, small_dataset, detector):
    from pinsface.backbones import get_backbone
    from pinsface.embeddings import run_embedder
    from pinsface.gallery import Gallery
    from pinsface.pipeline import train
    from pinsface.prepare import prepare

    settings = Settings(epochs=3, fine_tune=True, fine_tune_epochs=1, test_fraction=0.25, val_fraction=0.25)
    prepared = prepare(small_dataset, tmp_path / "cache", settings.faces, progress=False, detector=detector)
    train(out_dir=tmp_path / "run", settings=settings, progress=False, prepared=prepared)
    saved = Settings.load(tmp_path / "run" / "config.json")
    assert saved.embedding_key.startswith(f"{saved.backbone}-ft-")
    tuned = keras.saving.load_model(tmp_path / "run" / "model.keras", safe_mode=True, compile=False).get_layer(
        saved.backbone
    )
    pretrained = get_backbone(saved.backbone)
    first, top = "conv32_1_conv1", f"{saved.fine_tune_from}_conv1"
    assert np.array_equal(tuned.get_layer(first).get_weights()[0], pretrained.get_layer(first).get_weights()[0])
    assert not np.allclose(tuned.get_layer(top).get_weights()[0], pretrained.get_layer(top).get_weights()[0])
    # The gallery holds what the tuned backbone computes, not the pretrained one's cached embeddings.
    gallery = Gallery.load(tmp_path / "run" / "gallery.npz")
    val = Split.load(tmp_path / "run" / "split.json").files("val")
    hashes = [
        prepared.hashes[i]
        for i, it in enumerate(prepared.dataset.items)
        if it.rel in set(val) and prepared.status[i] == "ok"
    ][:4]
    crops = prepared.cache.load(hashes, crops=("aligned",))
    crops = crops.columns["aligned"][crops.rows(hashes)]
    fresh = run_embedder(saved, tuned)(crops)
    found = [np.abs(gallery.val_embeddings - v).max(1).min() for v in fresh]
    assert max(found) < 1e-5
    assert np.abs(run_embedder(saved, pretrained)(crops) - fresh).max() > 1e-4


def test_final_refit_replays_the_chosen_epochs_on_training_and_validation_faces(tmp_path, small_run):
    from pinsface.pipeline import train
    from pinsface.runfolder import Run

    settings = Settings(epochs=12, test_fraction=0.25, val_fraction=0.25, final_fit="train+val")
    train(out_dir=tmp_path / "run", settings=settings, progress=False, prepared=small_run[1]["prepared"])
    run = Run(tmp_path / "run")
    stages = {s["stage"]: s for s in run.history()["stages"]}
    head, final = stages["head"], stages["final"]
    assert run.settings().final_fit == "train+val"
    assert final["epochs_run"] == head["best_epoch"]
    np.testing.assert_allclose(final["learning_rate"], head["learning_rate"][: head["best_epoch"]], rtol=1e-6)
    # The saved head is the refitted one: it differs from the best-epoch checkpoint of the split's head.
    saved = run.load_state().model.get_layer("head")
    split = build_head(6, run.settings())
    split.load_weights(tmp_path / "run" / "checkpoints" / "head.weights.h5")
    assert not np.allclose(
        saved.get_layer("cosine_logits").get_weights()[0], split.get_layer("cosine_logits").get_weights()[0]
    )


def test_each_step_trains_on_one_view_of_each_face(tmp_path):
    from pinsface.fitting import Examples, Plan, TrainLog, fit
    from pinsface.models import build_head

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 64)
    clean = rng.normal(size=(4, 128)).astype(np.float32)[y] + 0.3 * rng.normal(size=(len(y), 128)).astype(np.float32)
    blank = np.zeros_like(clean)  # a view with nothing in it to learn from
    settings = Settings(epochs=8, mixup=0.0, dropout=0.0, batch_size=32, lr_schedule="plateau")

    def training_accuracy(views: np.ndarray) -> float:
        head = build_head(4, settings)
        log = TrainLog(tmp_path / "log", tmp_path)
        history = fit(head, Examples(views, y, clean, y), Plan("head", 8, 3e-3), settings=settings, log=log)
        assert history["val_accuracy"][-1] == 1.0  # the clean views taught it every identity
        return history["accuracy"][-1]

    assert training_accuracy(np.stack([clean, clean], 1)) > 0.95
    # Half the steps' faces come as the blank view, which can be right for one identity in four at best.
    assert 0.5 <= training_accuracy(np.stack([clean, blank], 1)) < 0.75


def test_a_small_folder_trains_the_head_for_enough_steps():
    from pinsface.fitting import MIN_HEAD_STEPS, head_epochs

    settings = Settings(epochs=10)
    assert head_epochs(settings, 10_000) == 10  # plenty of steps an epoch: the settings' epochs
    assert head_epochs(settings, 120) >= MIN_HEAD_STEPS  # one step an epoch: more epochs
    assert head_epochs(settings, 600) * 3 >= MIN_HEAD_STEPS > (head_epochs(settings, 600) - 1) * 3
