"""User-like photo collections: phone-size photos, small faces, group photos, reduced-scale decoding."""

import io

import numpy as np
import pytest
from PIL import Image

from pinsface.cache import FaceCache
from pinsface.faces import STATUSES, Detection, choose_subject, min_subject_size
from pinsface.images import decode_scaled, load_image
from pinsface.prepare import prepare, usable_status
from pinsface.settings import FaceSettings, Settings
from pinsface.testing.photos import build_groups, chosen_is, phone_photo, pins_faces

PEOPLE = ["pins_Adriana Lima", "pins_Bill Gates", "pins_Chris Evans"]


def _chosen_boxes(result, settings=None):
    settings = settings or FaceSettings()
    table = FaceCache(result.cache.root, settings.version()).load([h for h in result.hashes if h], crops=())
    out = {}
    for item, h in zip(result.dataset.items, result.hashes):
        row = table.index.get(h) if h else None
        if row is not None and table.columns["chosen"][row] >= 0:
            out[item.rel] = table.detections(row)["boxes"][table.columns["chosen"][row]]
    return out


def test_phone_size_photos_train_on_the_subjects_face(tmp_path, pins_dir, detector):
    root = tmp_path / "data"
    truth = {}
    for p, person in enumerate(PEOPLE[:2]):
        (root / person).mkdir(parents=True)
        for k, source in enumerate(pins_faces(pins_dir, person)[:3]):
            data, pasted = phone_photo(source, person, seed=10 * p + k, size=(4032, 3024), face_fraction=0.1)
            (root / person / f"phone_{k}.jpg").write_bytes(data)
            truth[f"{person}/phone_{k}.jpg"] = pasted
    blank = Image.new("RGB", (4032, 3024), (128, 120, 110))
    blank.save(root / PEOPLE[0] / "wall.jpg")
    Image.new("RGB", (224, 224), (128, 120, 110)).save(root / PEOPLE[0] / "crop_without_face.jpg")

    result = prepare(root, tmp_path / "cache", progress=False, detector=detector)
    status = {it.rel.split("/", 1)[1]: st for it, st in zip(result.dataset.items, result.status)}
    chosen = _chosen_boxes(result)
    # Each face is a tenth of the shorter side: found, counted as one small face, and the one chosen.
    for rel, pasted in truth.items():
        assert result.status[[it.rel for it in result.dataset.items].index(rel)] == "small_face", rel
        assert chosen_is(chosen[rel], pasted), rel
    assert status["wall.jpg"] == "no_face_photo"  # not crop-like: no mean-landmark crop of a wall
    assert status["crop_without_face.jpg"] == "no_face"  # crop-like: the fallback may align it
    assert result.summary["faces_found"] == 6 and result.summary["no_face"] == 2
    assert result.summary["outcomes"]["small_face"] == 6
    ok = usable_status(Settings())
    assert "small_face" in ok and "no_face" in ok and "no_face_photo" not in ok and "ambiguous" not in ok
    faces = result.faces()
    row = faces.index[result.hashes[[it.rel for it in result.dataset.items].index(f"{PEOPLE[0]}/phone_0.jpg")]]
    assert faces.columns["aligned"][row].shape == (150, 150, 3) and faces.columns["aligned"][row].std() > 20


def test_group_photos_second_pass_picks_the_person_of_the_folder(tmp_path, pins_dir, detector):
    truth = build_groups(
        pins_dir,
        tmp_path / "data",
        PEOPLE[:2],
        [p for p in sorted(d.name for d in pins_dir.iterdir())[10:30]],
        references=8,
        groups=4,
        seed=3,
    )
    scores = {}
    for label, settings in (("rule", FaceSettings(subject_pass_min_photos=0)), ("pass", FaceSettings())):
        result = prepare(tmp_path / "data", tmp_path / "cache", settings, progress=False, detector=detector)
        chosen = _chosen_boxes(result, settings)
        status = dict(zip((it.rel for it in result.dataset.items), result.status))
        correct = sum(
            1 for rel, pasted in truth.items() if status[rel] == "subject" and chosen_is(chosen[rel], pasted[0])
        )
        scores[label] = (correct, sum(1 for rel in truth if status[rel] == "ambiguous"), result.summary)
    rule, passed = scores["rule"], scores["pass"]
    assert rule[2]["ambiguous"] == rule[1] and rule[2]["outcomes"]["ambiguous"] == rule[1]
    assert passed[0] >= 7 and passed[0] > rule[0], scores
    counts = passed[2]["subject_pass"]
    assert sum(counts.get(k, 0) for k in ("changed", "confirmed", "undecided")) == len(truth)


def test_choose_subject_outcomes():
    def face(x, y, size, conf=0.99):
        return Detection(np.array([x, y, x + size, y + size], np.float32), conf, np.zeros((5, 2), np.float32))

    shape = (3000, 4000, 3)
    assert choose_subject([face(1900, 1400, 300)], shape) == (0, "small_face")
    assert choose_subject([face(1500, 1000, 900)], shape) == (0, "ok")
    # One large central face and a small one at the edge: the subject is clear.
    assert choose_subject([face(100, 100, 150), face(1800, 1200, 500)], shape) == (1, "subject")
    # Two alike faces side by side: nobody is clearly the subject.
    assert choose_subject([face(1400, 1300, 300), face(2300, 1300, 300)], shape)[1] == "ambiguous"
    assert choose_subject([], shape) == (-1, "no_face_photo")
    assert choose_subject([], (224, 224, 3)) == (-1, "no_face")
    # Small faces count in photos (3% of the shorter side), not in crop-shaped images (as before).
    assert min_subject_size(shape, FaceSettings()) == pytest.approx(90)
    assert min_subject_size((224, 224, 3), FaceSettings()) == pytest.approx(44.8)
    assert set(STATUSES) >= {"ok", "small_face", "subject", "ambiguous", "no_face", "no_face_photo"}


def test_reduced_decoding_follows_exif_orientation():
    canvas = np.full((3000, 4000, 3), 90, np.uint8)
    canvas[600:700, 3000:3100] = 255  # a white square at x 3000-3100, y 600-700 as stored
    stored = Image.fromarray(canvas)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    data = buffer.getvalue()
    full = load_image(data)
    view = decode_scaled(data, min_side=700)
    assert full.shape[:2] == (4000, 3000) and view.full_size == (4000, 3000)
    assert view.pixels.shape[:2] == (1000, 750)  # decoded at a quarter scale, then turned upright
    ys, xs = np.nonzero(full[..., 0] > 200)
    vys, vxs = np.nonzero(view.pixels[..., 0] > 200)
    centre = view.to_full(np.array([vxs.mean(), vys.mean()]))
    assert np.allclose(centre, [xs.mean(), ys.mean()], atol=3)


def test_reduced_decoding_gives_pillows_pixels_and_reports_truncation(monkeypatch):
    import pinsface.images as images
    from pinsface.images import BadImage

    rng = np.random.default_rng(1)
    canvas = np.kron((rng.random((12, 16, 3)) * 255).astype(np.uint8), np.ones((100, 100, 1), np.uint8))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buffer = io.BytesIO()
        Image.fromarray(canvas).save(buffer, "JPEG", quality=90, exif=exif.tobytes())
        data = buffer.getvalue()
        fast = decode_scaled(data, min_side=300)
        with monkeypatch.context() as m:
            m.setattr(images, "_decode_reduced", lambda *args: None)  # Pillow alone
            slow = decode_scaled(data, min_side=300)
        assert fast.pixels.shape == slow.pixels.shape and fast.full_size == slow.full_size
        assert np.array_equal(fast.pixels, slow.pixels), orientation
    with pytest.raises(BadImage) as caught:
        decode_scaled(data[: len(data) * 2 // 3], min_side=300)
    assert caught.value.reason == "truncated"


def _encoded(pixels: np.ndarray, fmt: str, mode: str, orientation: int = 1, lossy: bool = False) -> bytes:
    image = Image.fromarray(pixels)
    if mode == "RGBA":  # the right half transparent: it must come out white, as Pillow lays it
        alpha = np.where(np.arange(pixels.shape[1]) < pixels.shape[1] // 2, 255, 0).astype(np.uint8)
        image.putalpha(Image.fromarray(np.broadcast_to(alpha, pixels.shape[:2]).copy()))
    elif mode in ("LA", "L", "1"):
        image = image.convert(mode)
    elif mode == "P":
        image = image.quantize(64)
    elif mode == "I;16":
        image = Image.fromarray(pixels[..., 1].astype(np.uint16) * 257)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    options = {"lossless": not lossy} if fmt == "WEBP" else {"compression": "tiff_deflate"} if fmt == "TIFF" else {}
    image.save(buffer, fmt, **options, **({"exif": exif.tobytes()} if orientation != 1 else {}))
    return buffer.getvalue()


@pytest.mark.parametrize(
    "fmt,mode,orientation",
    [
        ("PNG", "RGB", 1),
        ("PNG", "RGB", 6),
        ("PNG", "RGBA", 1),
        ("PNG", "LA", 8),
        ("PNG", "P", 1),
        ("PNG", "I;16", 1),
        ("WEBP", "RGB", 6),
        ("WEBP", "RGBA", 3),
        ("TIFF", "RGB", 1),
        ("GIF", "P", 1),
        ("BMP", "RGB", 1),
        ("BMP", "P", 1),
        ("BMP", "1", 1),
        ("PPM", "RGB", 1),
        ("PPM", "L", 1),
        ("PPM", "1", 1),
    ],
)
def test_every_format_is_decoded_at_reduced_scale_into_pillows_picture(fmt, mode, orientation, monkeypatch):
    """PNG, WebP, TIFF and GIF photos are decoded at reduced scale (libvips, a strip at a time), BMP and PPM a band
    of rows at a time, as JPEGs are by DCT scaling: the same picture as Pillow's whole decode, averaged down,
    turned upright by the same EXIF tag."""
    import pinsface.images as images

    rng = np.random.default_rng(2)
    canvas = np.kron((rng.random((12, 16, 3)) * 255).astype(np.uint8), np.ones((100, 100, 1), np.uint8))
    data = _encoded(canvas, fmt, mode, orientation)
    fast = decode_scaled(data, min_side=300)
    with monkeypatch.context() as m:
        m.setattr(images, "_decode_shrunk", lambda *args: None)  # Pillow alone, whole
        m.setattr(images, "_decode_raw_bands", lambda *args: None)
        whole = decode_scaled(data, min_side=300)
    assert whole.pixels.shape[:2] == whole.full_size and fast.full_size == whole.full_size
    assert fast.pixels.shape == (whole.full_size[0] // 4, whole.full_size[1] // 4, 3)
    reference = np.asarray(Image.fromarray(whole.pixels).resize(fast.pixels.shape[1::-1], Image.BOX), np.float32)
    assert np.abs(reference - fast.pixels).mean() < 1.5, (fmt, mode)
    if orientation != 1:
        assert whole.full_size == ((1600, 1200) if orientation in (6, 8) else (1200, 1600))


def test_a_truncated_large_png_is_reported_as_truncated():
    from pinsface.images import BadImage

    data = _encoded(np.full((1200, 1600, 3), 90, np.uint8), "PNG", "RGB")
    with pytest.raises(BadImage) as caught:
        decode_scaled(data[: len(data) // 2], min_side=300)
    assert caught.value.reason == "truncated"


@pytest.mark.parametrize(
    "fmt,mode,lossy",
    [
        ("PNG", "RGB", False),
        ("WEBP", "RGB", True),
        ("WEBP", "RGB", False),
        ("TIFF", "RGB", False),
        ("GIF", "P", False),
        ("BMP", "P", False),
        ("BMP", "1", False),
        ("PPM", "L", False),
    ],
)
def test_a_40_megapixel_photo_of_any_format_decodes_in_bounded_memory(tmp_path, fmt, mode, lossy):
    """A few hundred KB can hold 40 megapixels: decoded whole, such a photo costs several times its RGB size in
    memory; at reduced scale, a fraction of it. GIF and lossless WebP decoders hold one full frame (4 bytes a
    pixel) before it is shrunk, and nothing more. BMP and PPM are decoded a band of rows at a time."""
    from pinsface.testing.decoding import decode_in_fresh_process

    height, width = 5400, 7200
    blocks = np.random.default_rng(3).integers(0, 255, (54, 72, 3), dtype=np.uint8)
    path = tmp_path / f"big.{fmt.lower()}"
    path.write_bytes(_encoded(np.kron(blocks, np.ones((100, 100, 1), np.uint8)), fmt, mode, lossy=lossy))
    peaks = {}
    for how in ("reduced", "whole"):
        cost = decode_in_fresh_process(path, how, 1000, timeout=120)
        peaks[how] = cost.peak_growth
        assert cost.size[1] == (height // 4 if how == "reduced" else height)
    rgb = height * width * 3
    assert peaks["whole"] > rgb  # the measure can see a whole decode
    full_frame = fmt == "GIF" or (fmt == "WEBP" and not lossy)
    assert peaks["reduced"] < (0.6 * peaks["whole"] if full_frame else 0.5 * rgb), peaks


def test_crops_from_reduced_decoding_match_full_size_decoding(originals_dir, detector, backbone):
    """Descriptor distance between chips cut by prepare (reduced-scale decoding) and from full-size decoding."""
    from pinsface.embeddings import Embedder
    from pinsface.testing.photos import enlarged_original, reduced_and_full_chips

    settings = FaceSettings()
    embed = Embedder(backbone)
    paths = sorted(originals_dir.rglob("*.jpg"))
    same_landmarks, end_to_end = [], []
    for n, path in enumerate(paths):
        enlarge = n % 4 == 0  # every fourth original is also tried as a 12-megapixel photo
        chips = reduced_and_full_chips(enlarged_original(path, enlarge), detector, settings)
        if chips is None:
            continue
        e = embed(np.stack(chips))
        end_to_end.append((enlarge, float(np.linalg.norm(e[0] - e[2]))))
        same_landmarks.append(float(np.linalg.norm(e[1] - e[2])))
    small = [d for big, d in end_to_end if not big]
    large = [d for big, d in end_to_end if big]
    assert len(small) >= 35 and len(large) >= 10
    assert max(small) < 0.05  # the shared originals themselves: decoded as they are
    assert max(same_landmarks) < 0.05  # the crop itself, at reduced scale, matches the full-size crop
    # End to end: the refined landmarks hardly move with the decoding scale.
    assert np.median(large) < 0.05 and np.quantile(large, 0.9) < 0.05


def test_faces_from_a_reduced_png_match_its_full_size_decoding(originals_dir, detector, backbone):
    """The libvips path end to end: 12-megapixel PNGs of real faces give the descriptors of their full decoding."""
    from pinsface.embeddings import Embedder
    from pinsface.testing.photos import enlarged_original, reduced_and_full_chips

    embed = Embedder(backbone)
    distances = []
    for path in sorted(originals_dir.rglob("*.jpg"))[::8]:
        buffer = io.BytesIO()
        Image.open(io.BytesIO(enlarged_original(path, True))).save(buffer, "PNG", compress_level=1)
        chips = reduced_and_full_chips(buffer.getvalue(), detector, FaceSettings())
        if chips is not None:
            e = embed(np.stack(chips))
            distances.append(float(np.linalg.norm(e[0] - e[2])))
    assert len(distances) >= 5
    assert np.median(distances) < 0.05 and max(distances) < 0.05, distances  # as for JPEG


def test_decoding_holds_a_bounded_batch(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    import pinsface.face_records as records
    from pinsface.face_records import decoded_batches

    paths = []
    for k in range(12):
        path = tmp_path / f"{k}.jpg"
        Image.new("RGB", (2400, 2000), (k * 10, 50, 50)).save(path)
        paths.append((k, path))
    monkeypatch.setattr(records, "BATCH_BYTES", 3 * 1200 * 1000 * 3)
    with ThreadPoolExecutor(2) as pool:
        batches = list(decoded_batches(pool, paths, 64, FaceSettings()))
    assert [i for batch in batches for i, _ in batch] == list(range(12))
    for batch in batches:
        # Decoded at half scale (1200x1000): at most 3 of them, the last one crossing the line.
        assert len(batch) <= 3
        for _, (view, _) in batch:
            assert view.pixels.shape == (1000, 1200, 3) and view.full_size == (2000, 2400)


def _canvas_with_faces(pins_dir, faces: list[tuple[str, int, tuple[int, int]]]) -> tuple[np.ndarray, list]:
    from pinsface.testing.photos import background, paste

    canvas = background(2000, 1500, 3)
    pasted = [paste(canvas, pins_faces(pins_dir, person)[2], size, centre, person) for person, size, centre in faces]
    return np.asarray(canvas), pasted


def test_coarse_to_fine_scan_finds_each_face_once_and_stops_early_beside_a_large_face(pins_dir, detector, monkeypatch):
    """A photo is scanned down to the smallest face size only when the coarse scan found no face large enough
    to stand; then the finer levels add the faces the coarse ones missed, and none twice."""
    small, coarse = 45.0, 75.0  # 3% and 5% of the shorter side, as prepare asks
    scans = []
    scan = detector._large_faces
    monkeypatch.setattr(
        detector, "_large_faces", lambda halvings, scales, *a: scans.append(scales) or scan(halvings, scales, *a)
    )

    image, pasted = _canvas_with_faces(pins_dir, [(PEOPLE[0], 100, (600, 700)), (PEOPLE[1], 70, (1400, 800))])
    full = detector.detect([image], [small])[0]
    scans.clear()
    staged = detector.detect([image], [small], coarse_sizes=[coarse])[0]
    assert len(scans) == 2 and max(scans[0]) < min(scans[1])  # coarse levels, then the finer ones
    assert len(full) == 2 and all(any(chosen_is(f.box, p) for f in full) for p in pasted)
    assert len(staged) == 2 and all(sum(chosen_is(f.box, p) for f in staged) == 1 for p in pasted)
    for p in pasted:
        a = next(f for f in full if chosen_is(f.box, p))
        b = next(f for f in staged if chosen_is(f.box, p))
        assert np.abs(a.landmarks - b.landmarks).max() < 0.05 * a.size

    image, pasted = _canvas_with_faces(pins_dir, [(PEOPLE[0], 240, (700, 700)), (PEOPLE[1], 70, (1500, 800))])
    scans.clear()
    staged = detector.detect([image], [small], coarse_sizes=[coarse])[0]
    assert len(scans) == 1 and any(chosen_is(f.box, pasted[0]) for f in staged)


def test_cli_min_face_fraction_leaves_out_smaller_faces(tmp_path, pins_dir, capsys):
    """`--min-face-fraction` sets the smallest face counted in a photo; a face under it is not the subject."""
    import json

    from pinsface.cli import main

    root = tmp_path / "data"
    for p, person in enumerate(PEOPLE[:2]):
        (root / person).mkdir(parents=True)
        source = pins_faces(pins_dir, person)[0]
        (root / person / "phone.jpg").write_bytes(phone_photo(source, person, seed=p, face_fraction=0.1)[0])
    argv = ["prepare", str(root), "--cache", str(tmp_path / "cache"), "--json", "--no-progress"]
    outcomes = []
    for extra in ([], ["--min-face-fraction", "0.2"]):
        assert main(argv + extra) == 0
        outcomes.append(json.loads(capsys.readouterr().out)["outcomes"])
    assert outcomes[0]["small_face"] == 2  # faces of about 7% of the shorter side count by default
    assert outcomes[1]["no_face_photo"] == 2 and outcomes[1]["small_face"] == 0
    assert main(argv + ["--min-face-fraction", "1.5"]) == 2  # a usage error
