"""Phone-size photos: `prepare`, `run` (train + evaluate) and `predict` photos/s and peak RSS, and subject choice
in group photos with and without the second pass.

    python bench/photos.py [--photos 1000] [--identities 10] [--root /tmp/photos-bench] [--chunk 512]
                           [--min-face-fraction 0.03]
    python bench/photos.py --groups [--subjects 8 --groups-per-subject 6]
    python bench/photos.py --crops [--enlarge-every 4]
    python bench/photos.py --stages [--stage-photos 80]

The photo folder (4000x3000 JPEGs, one Pins face each, about a tenth of the shorter side, on a textured
background) is built under --root on first use and kept there; it is never committed. Each phase runs in its
own process and reports that process's own peak RSS, its photos/s (wall clock) and its photos per 2 CPU-seconds
(what 2 otherwise idle cores could do at best: the wall-clock figure depends on the machine's load). Run it at
`nice -n 10` on a shared machine and note the load averages it prints.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pinsface.testing.shared import pins_dir

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
PINS = pins_dir()

PREPARE = r"""
import json, resource, sys, time
from pathlib import Path
t0 = time.perf_counter()
import pinsface.prepare as prep
from pinsface.face_records import decode_file
from pinsface.faces import FaceDetector
from pinsface.prepare import prepare
from pinsface.settings import FaceSettings
data, cache, chunk, fraction = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
prep.CHUNK_IMAGES = chunk
settings = FaceSettings(min_face_fraction=fraction)
# Start-up, timed apart: TensorFlow's import, the detector, and its graphs traced on the folder's first photo.
detector = FaceDetector(settings)
view = decode_file(sorted(Path(data).rglob("*.jpg"))[0], settings)[0]
short = min(view.pixels.shape[:2])
detector.detect([view.pixels], [fraction * short], coarse_sizes=[max(fraction, 0.05) * short])
startup = time.perf_counter() - t0
cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
cpu0 = cpu()
t = time.perf_counter()
result = prepare(data, cache, settings, progress=False, detector=detector)
seconds = time.perf_counter() - t
table = result.cache.load([h for h in result.hashes if h], crops=())
chosen = {}
for item, h in zip(result.dataset.items, result.hashes):
    row = table.index.get(h) if h else None
    if row is not None and table.columns["chosen"][row] >= 0:
        chosen[item.rel] = table.detections(row)["boxes"][table.columns["chosen"][row]].tolist()
print(json.dumps({"images": len(result.dataset.items), "seconds": seconds, "startup": startup,
                  "outcomes": result.summary["outcomes"],
                  "faces_found": result.summary["faces_found"], "chosen": chosen,
                  "cpu_seconds": cpu() - cpu0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

RUN = r"""
import json, resource, sys, time
from pinsface.pipeline import run
from pinsface.settings import Settings
data, cache, out = sys.argv[1], sys.argv[2], sys.argv[3]
t = time.perf_counter()
report = run(data, out, Settings(), cache_dir=cache, progress=False)
print(json.dumps({"seconds": time.perf_counter() - t, "test_top1": report.get("top1"),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

PREDICT = r"""
import json, resource, sys, time
from pinsface.predict import Recognizer, expand_inputs
run_dir, data, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
recognizer = Recognizer.load(run_dir)
files = expand_inputs([data])
files = files[::max(1, len(files) // limit)][:limit] if limit else files
cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
cpu0 = cpu()
t = time.perf_counter()
results = recognizer.identify_many(files)
seconds = time.perf_counter() - t
cpu_seconds = cpu() - cpu0
from pinsface.dataset import identity_from_folder
named = sum(1 for r, f in zip(results, files)
            if r.faces and r.faces[0].identity == identity_from_folder(f.split("/")[-2]))
print(json.dumps({"images": len(files), "seconds": seconds, "with_face": sum(1 for r in results if r.faces),
                  "named_correctly": named, "cpu_seconds": cpu_seconds,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def child(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        sys.stderr.write(out.stderr[-3000:])
        raise SystemExit(f"phase failed ({out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_photos(root: Path, photos: int, identities: int) -> dict:
    """The photo folder and, per file, where its face was pasted (kept in truth.json beside it)."""
    from pinsface.testing.photos import phone_photo, pins_faces

    truth_path = root / "truth.json"
    if truth_path.exists():
        truth = json.loads(truth_path.read_text())
        if len(truth) == photos:
            return truth
    shutil.rmtree(root / "data", ignore_errors=True)
    people = sorted(p.name for p in PINS.iterdir() if p.is_dir())[:identities]
    truth = {}
    t = time.perf_counter()
    for k in range(photos):
        person = people[k % identities]
        faces = pins_faces(PINS, person)
        data, pasted = phone_photo(faces[(k // identities) % len(faces)], person, seed=k)
        folder = root / "data" / person
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"photo_{k:04d}.jpg").write_bytes(data)
        truth[f"{person}/photo_{k:04d}.jpg"] = pasted.rect
    truth_path.write_text(json.dumps(truth))
    print(f"built {photos} photos of 4000x3000 in {time.perf_counter() - t:.0f} s under {root / 'data'}")
    return truth


def on_pasted(box, rect) -> bool:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return rect[0] <= cx <= rect[2] and rect[1] <= cy <= rect[3]


def bench_photos(args) -> None:
    root = Path(args.root)
    truth = build_photos(root, args.photos, args.identities)
    data = str(root / "data")
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    work = root / "work"  # caches and the trained run, kept for a look afterwards; cleared on each start
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    tmp = str(work)
    for r in range(args.repeats if "prepare" in args.phases else 0):
        cache = Path(tmp) / f"cache{r}"
        p = child(PREPARE, data, str(cache), str(args.chunk), str(args.min_face_fraction))
        found = sum(1 for rel, rect in truth.items() if rel in p["chosen"] and on_pasted(p["chosen"][rel], rect))
        print(
            f"prepare (cold, chunk {args.chunk}, faces from {args.min_face_fraction:.0%}): "
            f"{p['images'] / p['seconds']:.1f} photos/s "
            f"({2 * p['images'] / p['cpu_seconds']:.1f} per 2 CPU-seconds; with the start-up of "
            f"{p['startup']:.1f} s, {p['images'] / (p['seconds'] + p['startup']):.1f} photos/s), "
            f"peak RSS {p['peak_rss_mb']:.0f} MB; subject's face found in {found}/{p['images']}; "
            f"outcomes {p['outcomes']}"
        )
    if "run" in args.phases:
        run = child(RUN, data, str(Path(tmp) / "cache0"), str(Path(tmp) / "run"))
        print(
            f"run (train + evaluate, warm cache): {run['seconds']:.0f} s, peak RSS {run['peak_rss_mb']:.0f} MB, "
            f"test top-1 {run['test_top1']}"
        )
    if "predict" in args.phases:
        for _ in range(args.repeats):
            pr = child(PREDICT, str(Path(tmp) / "run"), data, str(args.predict_photos))
            print(
                f"predict: {pr['images'] / pr['seconds']:.1f} photos/s "
                f"({2 * pr['images'] / pr['cpu_seconds']:.1f} per 2 CPU-seconds), "
                f"peak RSS {pr['peak_rss_mb']:.0f} MB; "
                f"{pr['with_face']}/{pr['images']} with a face, {pr['named_correctly']} named correctly"
            )
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


def bench_groups(args) -> None:
    from pinsface.cache import FaceCache
    from pinsface.faces import FaceDetector
    from pinsface.prepare import prepare
    from pinsface.settings import FaceSettings
    from pinsface.testing.photos import build_groups, chosen_is

    people = sorted(p.name for p in PINS.iterdir() if p.is_dir())
    subjects, others = people[: args.subjects], people[args.subjects : args.subjects + 30]
    with tempfile.TemporaryDirectory(prefix="photos-groups-") as tmp:
        truth = build_groups(
            PINS, Path(tmp) / "data", subjects, others, references=args.references, groups=args.groups_per_subject
        )
        detector = FaceDetector()
        for label, settings in (
            ("rule only", FaceSettings(subject_pass_min_photos=0)),
            ("with second pass", FaceSettings()),
        ):
            result = prepare(Path(tmp) / "data", Path(tmp) / "cache", settings, progress=False, detector=detector)
            table = FaceCache(Path(tmp) / "cache", settings.version()).load([h for h in result.hashes if h], crops=())
            correct = wrong = ambiguous = missed = 0
            for item, h, status in zip(result.dataset.items, result.hashes, result.status):
                if item.rel not in truth:
                    continue
                row = table.index[h]
                chosen = int(table.columns["chosen"][row])
                boxes = table.detections(row)["boxes"]
                if not any(chosen_is(b, truth[item.rel][0]) for b in boxes):
                    missed += 1
                elif status == "ambiguous":
                    ambiguous += 1
                elif chosen >= 0 and chosen_is(boxes[chosen], truth[item.rel][0]):
                    correct += 1
                else:
                    wrong += 1
            faces = sum(
                int(table.columns["n_faces"][table.index[h]])
                for item, h in zip(result.dataset.items, result.hashes)
                if item.rel in truth
            )
            pasted = sum(len(v) for v in truth.values())
            print(
                f"{label}: {len(truth)} group photos ({pasted} faces pasted, {faces} found): subject chosen "
                f"correctly {correct}, wrongly {wrong}, left out as ambiguous {ambiguous}, subject's face not "
                f"detected {missed}; second pass {result.summary['subject_pass']}"
            )


def bench_crops(args) -> None:
    """Descriptor distance between chips cut as prepare cuts them (reduced-scale decoding) and chips from
    full-size decoding, on the shared originals; every ``--enlarge-every``-th also enlarged 4x onto a 4000x3000
    canvas (every fourth, as in tests/test_photos.py; 1 for all of them)."""
    import numpy as np

    from pinsface.backbones import get_backbone
    from pinsface.embeddings import Embedder
    from pinsface.faces import FaceDetector
    from pinsface.settings import FaceSettings
    from pinsface.testing.photos import enlarged_original, reduced_and_full_chips

    settings = FaceSettings()
    detector, embed = FaceDetector(settings), Embedder(get_backbone())
    originals = PINS.parents[1] / "pins-originals"
    small, large, same = [], [], []
    for n, path in enumerate(sorted(originals.rglob("*.jpg"))):
        enlarge = n % args.enlarge_every == 0
        chips = reduced_and_full_chips(enlarged_original(path, enlarge), detector, settings)
        if chips is None:
            continue
        e = embed(np.stack(chips))
        (large if enlarge else small).append(float(np.linalg.norm(e[0] - e[2])))
        if enlarge:
            same.append(float(np.linalg.norm(e[1] - e[2])))

    def stats(d):
        if not d:
            return "none"
        return f"median {np.median(d):.3f}, p90 {np.quantile(d, 0.9):.3f}, max {max(d):.3f} ({len(d)} faces)"

    print(f"end to end, 12-megapixel canvases: {stats(large)}")
    print(f"the crop alone (same landmarks), 12-megapixel canvases: {stats(same)}")
    print(f"end to end, the originals as they are: {stats(small)}")


def bench_stages(args) -> None:
    """CPU milliseconds per photo in each stage of `prepare`'s per-batch work, one thread, on the first photos of
    the folder."""
    from pinsface.settings import FaceSettings

    build_photos(Path(args.root), args.photos, args.identities)
    files = sorted((Path(args.root) / "data").rglob("*.jpg"))[: args.stage_photos]
    print_stages(files, FaceSettings())


def stage_times(files: list[Path], settings) -> tuple[float, dict[str, float], list[dict]]:
    """(CPU seconds, CPU seconds per stage, face records) of `face_records.image_records` on ``files`` in batches
    of 16, one thread: decoding, MTCNN's networks, pyramid levels, patch cutting, landmark refinement, decoding
    again finer for small faces. The stages' functions are wrapped with timers (the first file, untimed, traces
    the graphs)."""
    import pinsface.face_records as records
    import pinsface.faces as faces

    detector = faces.FaceDetector(settings)
    spent: dict[str, float] = {}

    def timed(name, function):
        def wrapper(*a, **k):
            start = time.process_time()
            try:
                return function(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.process_time() - start

        return wrapper

    for attribute, name in (("_pnet", "P-net"), ("_rnet", "R-net"), ("_onet", "O-net (with the refinement's)")):
        setattr(detector, attribute, timed(name, getattr(detector, attribute)))
    saved = faces._patches, faces._Halvings.resized, records.refine_view
    faces._patches = timed("patch cutting", faces._patches)
    faces._Halvings.resized = timed("pyramid levels", faces._Halvings.resized)
    records.refine_view = timed("decoding again finer (refine_view)", records.refine_view)
    detector._refine_landmarks = timed("landmark refinement (all of it)", detector._refine_landmarks)
    decode = timed("reading and decoding", records.decode_file)
    work = timed("all of image_records", records.image_records)
    try:
        work(detector, [(0, decode(files[0], settings))], ["warm-up"], settings, {})
        spent.clear()
        made = []
        start = time.process_time()
        for lo in range(0, len(files), 16):
            batch = [(i, decode(f, settings)) for i, f in enumerate(files[lo : lo + 16])]
            made.extend(work(detector, batch, [str(i) for i in range(len(batch))], settings, {})[0])
        return time.process_time() - start, spent, made
    finally:
        faces._patches, faces._Halvings.resized, records.refine_view = saved


def print_stages(files: list[Path], settings) -> list[dict]:
    total, spent, made = stage_times(files, settings)
    print(f"{len(files)} photos, one thread: {1000 * total / len(files):.1f} ms of CPU per photo")
    for name, seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {name}: {1000 * seconds / len(files):.1f} ms")
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--identities", type=int, default=10)
    parser.add_argument("--root", default="/tmp/photos-bench")
    parser.add_argument("--chunk", type=int, default=512, help="prepare's CHUNK_IMAGES")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--min-face-fraction", type=float, default=0.03, help="prepare's smallest face counted")
    parser.add_argument("--phases", default="prepare,run,predict")
    parser.add_argument("--predict-photos", type=int, default=0, help="predict on this many photos (0: all)")
    parser.add_argument("--keep", action="store_true", help="reuse the cache and run of the last bench")
    parser.add_argument("--groups", action="store_true", help="the group-photo composites instead")
    parser.add_argument("--crops", action="store_true", help="chips from reduced vs full-size decoding instead")
    parser.add_argument("--enlarge-every", type=int, default=4, help="with --crops: which originals to enlarge")
    parser.add_argument("--stages", action="store_true", help="CPU time per photo in each stage of prepare")
    parser.add_argument("--stage-photos", type=int, default=80)
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--references", type=int, default=12)
    parser.add_argument("--groups-per-subject", type=int, default=6)
    args = parser.parse_args()
    if args.stages:
        bench_stages(args)
    elif args.crops:
        bench_crops(args)
    elif args.groups:
        bench_groups(args)
    else:
        bench_photos(args)


if __name__ == "__main__":
    main()
