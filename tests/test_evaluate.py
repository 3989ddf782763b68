import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from pinsface.cli import main
from pinsface.evaluate import compute_metrics, evaluate
from tests.conftest import copy_identities


@pytest.fixture(scope="module")
def report(small_run):
    run_dir, result = small_run
    metrics = evaluate(run_dir, prepared=result["prepared"], progress=False)
    return run_dir / "report", metrics


def test_every_report_file_exists_and_parses(report):
    out, metrics = report
    for name in (
        "metrics.json",
        "classification_report.txt",
        "classification_report.csv",
        "curves.png",
        "confusion_matrix.png",
        "top_confusions.csv",
        "samples_correct.png",
        "samples_incorrect.png",
        "report.html",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    saved = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    for key in (
        "top1",
        "top5",
        "macro_precision",
        "macro_recall",
        "macro_f1",
        "n_images",
        "n_scored",
        "n_no_face",
        "n_unreadable",
        "per_identity",
    ):
        assert key in saved, key
    assert 0 <= saved["top1"] <= saved["top5"] <= 1
    with open(out / "top_confusions.csv", encoding="utf-8") as fh:
        assert next(csv.reader(fh)) == ["true", "predicted", "count", "share_of_true"]


def test_figures_have_sane_sizes(report):
    out, _ = report
    for name, (min_w, min_h) in {
        "curves.png": (1000, 300),
        "confusion_matrix.png": (900, 500),
        "samples_correct.png": (600, 200),
        "samples_incorrect.png": (300, 200),
    }.items():
        w, h = Image.open(out / name).size
        assert w >= min_w and h >= min_h, (name, w, h)
        assert w <= 6000 and h <= 6000, (name, w, h)


def test_metrics_agree_with_the_classification_report(report):
    out, metrics = report
    with open(out / "classification_report.csv", encoding="utf-8") as fh:
        rows = {r["identity"]: r for r in csv.DictReader(fh)}
    for name, v in metrics["per_identity"].items():
        assert float(rows[name]["f1"]) == pytest.approx(v["f1"], abs=1e-5)
        assert int(rows[name]["support"]) == v["support"]
    assert float(rows["macro avg"]["f1"]) == pytest.approx(metrics["macro_f1"], abs=1e-5)
    assert sum(v["support"] for v in metrics["per_identity"].values()) == metrics["n_images"]
    text = (out / "classification_report.txt").read_text(encoding="utf-8")
    assert "Brïe Lårson é" in text and f"{metrics['top1']:.4f}" in text


def test_html_report_is_self_contained(report):
    out, metrics = report
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 4
    assert 'src="http' not in page and 'href="http' not in page
    assert "Insights" in page and "sortTable" in page and "filterTable" in page
    assert f"{100 * metrics['top1']:.2f}%" in page
    assert "<td>{}</td>" not in page  # mappings such as skipped-by-reason read as text, "none" when empty


def test_images_without_a_face_count_as_errors():
    labels = ["a", "b"]
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.0, 0.0], [0.7, 0.3]])
    usable = np.array([True, True, False, True])
    y = np.array([0, 1, 1, 1])
    m = compute_metrics(probs, usable, y, labels, ["ok", "ok", "no_face", "ok"])
    assert m["top1"] == pytest.approx(2 / 4)
    assert m["top1_over_faces"] == pytest.approx(2 / 3)
    assert m["n_no_face"] == 1 and m["n_scored"] == 3 and m["n_images"] == 4
    assert m["per_identity"]["b"]["recall"] == pytest.approx(1 / 3)


def test_evaluate_on_another_folder_reports_unknown_identities(small_run, tmp_path, capsys):
    run_dir, _ = small_run
    other = copy_identities(
        tmp_path / "other", ["pins_Adriana Lima", "pins_Bill Gates", "pins_Ben Affleck"], 3, start=40
    )
    # Case and prefix differences still match the known identity.
    shutil.move(other / "pins_Bill Gates", other / "bill gates")
    code = main(["evaluate", str(run_dir), "--data", str(other), "--out", str(tmp_path / "rep"), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Ben Affleck (3 images)" in printed
    m = json.loads((tmp_path / "rep" / "metrics.json").read_text(encoding="utf-8"))
    assert m["unknown_identities"] == {"Ben Affleck": 3}
    assert m["n_images"] == 6
    assert m["per_identity"]["Bill Gates"]["support"] == 3


def test_compare_with_a_baseline_run_goes_into_the_insights(small_run, tmp_path):
    from pinsface.pipeline import train
    from pinsface.settings import Settings

    run_dir, result = small_run
    baseline = Settings(model="pixels-mlp", epochs=2, test_fraction=0.25, val_fraction=0.25)
    train(out_dir=tmp_path / "pixels", settings=baseline, progress=False, prepared=result["prepared"])
    metrics = evaluate(
        run_dir, out=tmp_path / "rep", prepared=result["prepared"], progress=False, compare=tmp_path / "pixels"
    )
    line = [x for x in metrics["insights"] if "Compared with" in x]
    assert line and "pixels-mlp" in line[0]
    assert (tmp_path / "pixels" / "report" / "metrics.json").is_file()
    assert "Compared with" in (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
