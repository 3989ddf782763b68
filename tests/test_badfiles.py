"""Inputs that must never stop a run: special files, odd names, foreign formats, extreme shapes, failing images."""

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pinsface.dataset import check_identity_name, check_trainable, scan_dataset, spreadsheet_safe
from pinsface.faces import detect_each
from pinsface.images import REASONS, BadImage, decode_image, load_image, read_bytes
from pinsface.prepare import prepare
from tests.conftest import copy_identities

IDS = ["pins_Adriana Lima", "pins_Bill Gates"]


def _png(width: int, height: int, rows: bytes = b"") -> bytes:
    """A PNG with the given header size; its pixel data is ``rows`` (or a few zero rows)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(rows or b"\x00" * (3 * width + 1) * min(height, 4))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _jpeg_header(width: int, height: int) -> bytes:
    """A real small JPEG whose frame header claims ``width`` x ``height``."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 90, 60)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n"
    b"/Times-Roman findfont 12 scalefont setfont 10 10 moveto (hello) show\nshowpage\n%%EOF\n"
)


def test_special_files_are_never_read(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    (tmp_path / "null.jpg").symlink_to("/dev/null")
    (tmp_path / "fifo_link.jpg").symlink_to(fifo)
    for name in ("pipe.jpg", "zero.jpg", "null.jpg", "fifo_link.jpg"):
        with pytest.raises(BadImage) as err:
            read_bytes(tmp_path / name)  # a FIFO would block here, /dev/zero would never end
        assert err.value.reason == "not_a_file", name
    with pytest.raises(BadImage) as err:
        load_image("/dev/zero")
    assert err.value.reason == "not_a_file"


def test_size_cap_applies_before_reading(tmp_path):
    big = tmp_path / "big.jpg"
    with open(big, "wb") as f:  # sparse: a large file that costs no disk
        f.truncate(300 * 1024 * 1024)
    with pytest.raises(BadImage) as err:
        read_bytes(big)
    assert err.value.reason == "too_large"
    small = tmp_path / "small.jpg"
    small.write_bytes(b"x" * 1000)
    with pytest.raises(BadImage) as err:
        read_bytes(small, max_bytes=999)
    assert err.value.reason == "too_large"
    assert read_bytes(small, max_bytes=1000) == b"x" * 1000


def test_postscript_named_jpg_never_reaches_ghostscript(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    path = tmp_path / "photo.jpg"
    path.write_bytes(EPS)
    assert Image.open(path).format == "EPS"  # unrestricted Pillow would take it (and run Ghostscript to load)
    called = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: called.append(1))
    with pytest.raises(BadImage) as err:
        load_image(path)
    assert err.value.reason == "not_an_image" and not called


@pytest.mark.parametrize(
    "data,reason",
    [
        (_png(1, 1), "too_small"),
        (_png(10000, 3), "too_small"),
        (_png(3, 10000), "too_small"),
        (_png(65000, 65000), "too_large"),
        (_jpeg_header(65000, 65000), "too_large"),
        (_jpeg_header(1, 1), "too_small"),
    ],
)
def test_extreme_shapes_get_a_named_reason(data, reason):
    with pytest.raises(BadImage) as err:
        decode_image(data)
    assert err.value.reason == reason


def test_thin_but_usable_image_decodes():
    image = decode_image(_png(4000, 20, b"".join(b"\x00" + bytes(3 * 4000) for _ in range(20))))
    assert image.shape == (20, 4000, 3)


def _damaged(draw, data: bytes) -> bytes:
    data = bytearray(data)
    keep = draw(st.integers(16, len(data)))
    data = data[:keep]
    for _ in range(draw(st.integers(0, 8))):
        pos = draw(st.integers(min(12, len(data) - 1), len(data) - 1))
        data[pos] = draw(st.integers(0, 255))
    return bytes(data)


def _encoded(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


VALID = {fmt: _encoded(fmt) for fmt in ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")}


def test_the_server_opens_exactly_the_formats_prepare_reads():
    from pinsface.images import FORMATS
    from pinsface.serve.app import sniff

    assert set(VALID) == set(FORMATS)
    for fmt, data in VALID.items():
        assert sniff(data, 4_000_000) == 40 * 56, fmt
        assert decode_image(data).shape == (40, 56, 3), fmt
    for data in (EPS, b"", b"P6 not really"):
        with pytest.raises(BadImage) as server:
            sniff(data, 4_000_000)
        with pytest.raises(BadImage) as files:
            decode_image(data)
        assert server.value.reason == files.value.reason


def _check_decodes_or_names_a_reason(data: bytes) -> None:
    try:
        image = decode_image(data, max_pixels=4_000_000)
    except BadImage as exc:
        assert exc.reason in REASONS
    else:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(data):
    _check_decodes_or_names_a_reason(data)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_valid_headers_with_damaged_bodies(data):
    fmt = data.draw(st.sampled_from(sorted(VALID)))
    _check_decodes_or_names_a_reason(_damaged(data.draw, VALID[fmt]))


def _bad_name_dataset(tmp_path: Path) -> Path:
    root = copy_identities(tmp_path / "data", IDS, 5)
    root_b = os.fsencode(root)
    good = next((root / IDS[0]).glob("*.jpg")).read_bytes()
    (Path(os.fsdecode(root_b + b"/" + IDS[0].encode() + b"/caf\xe9 latin-1.jpg"))).write_bytes(good)
    bad_folder = root_b + b"/pins_Jos\xe9"
    os.mkdir(bad_folder)
    Path(os.fsdecode(bad_folder + b"/one.jpg")).write_bytes(good)
    control = root / "pins_Evil\x1b[31mName"
    control.mkdir()
    (control / "one.jpg").write_bytes(good)
    blank = root / "pins_   "
    blank.mkdir()
    (blank / "one.jpg").write_bytes(good)
    fifo = root / IDS[1] / "pipe.jpg"
    os.mkfifo(fifo)
    (root / IDS[1] / "zero.jpg").symlink_to("/dev/zero")
    (root / IDS[1] / "script.jpg").write_bytes(EPS)
    return root


def test_odd_names_and_special_files_in_a_dataset_are_listed_and_skipped(tmp_path, detector):
    import json

    from pinsface.prepare import format_summary

    root = _bad_name_dataset(tmp_path)
    dataset = scan_dataset(root)
    assert dataset.identities == ["Adriana Lima", "Bill Gates"]
    assert dataset.ignored["bad_name"] == 4
    for rel, _ in dataset.ignored_files:
        rel.encode("utf-8")  # printable: escaped, no lone surrogates
        assert "\x1b" not in rel
    result = prepare(root, tmp_path / "cache", progress=False, detector=detector)
    skipped = {f["path"].split("/")[-1]: f["reason"] for f in result.summary["skipped_files"]}
    assert skipped == {"pipe.jpg": "not_a_file", "zero.jpg": "not_a_file", "script.jpg": "not_an_image"}
    assert result.summary["faces_found"] == 10
    json.dumps(result.summary, ensure_ascii=False).encode("utf-8")
    format_summary(result.summary).encode("utf-8")


def test_train_works_beside_undecodable_names(tmp_path, detector):
    from pinsface.pipeline import train
    from pinsface.settings import Settings

    root = _bad_name_dataset(tmp_path)
    prepared = prepare(root, tmp_path / "cache", progress=False, detector=detector)
    settings = Settings(epochs=2, test_fraction=0.2, val_fraction=0.25)
    result = train(out_dir=tmp_path / "run", settings=settings, progress=False, prepared=prepared)
    assert (tmp_path / "run" / "model.keras").exists() and result


def test_fewer_than_two_identities_is_refused_before_any_work(tmp_path, capsys):
    from pinsface.cli import main
    from pinsface.pipeline import train

    root = copy_identities(tmp_path / "data", IDS[:1], 3)
    with pytest.raises(ValueError, match="at least 2"):
        check_trainable(scan_dataset(root))
    with pytest.raises(ValueError, match="at least 2"):
        train(root, out_dir=tmp_path / "run", cache_dir=tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()
    assert main(["train", str(root), "--out", str(tmp_path / "run2"), "--cache", str(tmp_path / "c")]) == 1
    assert "at least 2" in capsys.readouterr().err


def test_identity_names_are_checked_and_cells_made_safe():
    for bad in ("", "   ", "\t\n", "Eve\x1b[2J", "a\x00b", "new\nline", "bi\u202edi"):
        with pytest.raises(ValueError) as err:
            check_identity_name(bad)
        assert "\x1b" not in str(err.value) and "\x00" not in str(err.value)
    assert check_identity_name("Zoë Ünïcode-Smith") == "Zoë Ünïcode-Smith"
    assert [spreadsheet_safe(v) for v in ("=1+2", "+1", "-1", "@SUM(A1)", "Ann", "")] == [
        "'=1+2",
        "'+1",
        "'-1",
        "'@SUM(A1)",
        "Ann",
        "",
    ]


def test_enroll_refuses_bad_names_before_any_work():
    from pinsface.predict import Recognizer

    recognizer = object.__new__(Recognizer)  # no run needed: the name is refused first
    for bad in ("", "  ", "x\x07"):
        with pytest.raises(ValueError, match="identity name"):
            recognizer.enroll(bad, [])


def test_csv_reports_escape_formula_names(tmp_path):
    import csv

    from pinsface.evaluate import write_reports, write_top_confusions

    labels = ['=HYPERLINK("http://x")', "+cmd", "Ann"]
    y = np.array([0, 0, 1, 2, 2])
    pred = np.array([1, 0, 0, 2, 1])
    write_top_confusions(tmp_path / "top.csv", y, pred, labels)
    metrics = {
        "top1": 0.4,
        "n_images": 5,
        "per_identity": {name: {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2} for name in labels},
    }
    write_reports(tmp_path, metrics, labels)
    for name in ("top.csv", "classification_report.csv"):
        cells = [c for row in csv.reader(open(tmp_path / name, encoding="utf-8")) for c in row]
        assert not any(c[:1] in "=+-@" and c[:1] for c in cells if not c.replace(".", "").isdigit()), cells
        assert any(c.startswith("'=HYPERLINK") for c in cells)


def test_dollar_names_show_as_text_in_figures(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from pinsface.plots import plot_confusion, plot_samples

    labels = ["$\\notacommand{$", "Price $5 and $6", "A"]
    confusion = np.array([[3, 1, 0], [0, 4, 0], [1, 0, 2]])
    path, _ = plot_confusion(confusion, labels, np.arange(3), tmp_path / "cm.png", zoom=2)
    assert path.stat().st_size > 0  # mathtext would have raised on the first name
    samples = [{"image": np.zeros((150, 150, 3), np.uint8), "true": labels[0], "pred": labels[1], "confidence": 0.5}]
    assert plot_samples(samples, tmp_path / "s.png", "t").stat().st_size > 0


def test_predict_takes_existing_paths_with_glob_characters_as_files(tmp_path):
    from pinsface.predict import expand_inputs

    for name in ("a[1].jpg", "b*.jpg", "c?.jpg"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "d.jpg").write_bytes(b"x")
    for name in ("a[1].jpg", "b*.jpg", "c?.jpg"):
        assert expand_inputs([str(tmp_path / name)]) == [str(tmp_path / name)]
    assert str(tmp_path / "d.jpg") in expand_inputs([str(tmp_path / "d*")])


class FailingDetector:
    """The real detector, except that it raises on any batch holding an image of a marked width."""

    def __init__(self, detector, width):
        self.detector, self.settings, self.width = detector, detector.settings, width

    def detect(self, images, min_face_sizes=None, thresholds=None, coarse_sizes=None):
        if any(image.shape[1] == self.width for image in images):
            raise RuntimeError("simulated OpenCV failure")
        return self.detector.detect(images, min_face_sizes, thresholds, coarse_sizes)


def test_detector_error_on_one_image_skips_only_that_image(tmp_path, detector, pins_dir):
    root = copy_identities(tmp_path / "data", IDS, 4)
    source = Image.open(next((pins_dir / IDS[0]).glob("*.jpg"))).convert("RGB")
    source.resize((233, 233)).save(root / IDS[0] / "odd_one.jpg")
    result = prepare(root, tmp_path / "cache", progress=False, detector=FailingDetector(detector, 233))
    skipped = {f["path"].split("/")[-1]: (f["reason"], f["detail"]) for f in result.summary["skipped_files"]}
    assert list(skipped) == ["odd_one.jpg"]
    assert skipped["odd_one.jpg"][0] == "detector_error" and "simulated" in skipped["odd_one.jpg"][1]
    assert result.summary["faces_found"] == 8

    images = [np.zeros((40, 50, 3), np.uint8), np.zeros((40, 233, 3), np.uint8)]
    out = detect_each(FailingDetector(detector, 233), images)
    assert out[0] == [] and isinstance(out[1], RuntimeError)
