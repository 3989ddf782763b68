"""pinsface side by side with a face_recognition-style peer, on the same split, one after the other.

The peer is what face_recognition does, called through dlib directly: dlib's HOG face detector (upsampled
once, face_recognition's default), its 5-point landmarks and its ResNet descriptor (one jitter), then a
classifier on the descriptors: logistic regression (headline) and k-nearest neighbours (as in
face_recognition's own examples), each fitted on the train split alone and on train + validation. Where HOG
finds no face, the image counts as wrong (test) or is left out (training); where it finds several, the
largest is used.

pinsface runs as a child process (`pinsface run DATA --out DIR --no-progress`) with a fresh cache, first;
then the peer runs in this process. Both score every image of the same test split (the split file the
pinsface run wrote is checked against the peer's).

    pip install -e '.[peers]'          # dlib-bin and face-recognition-models wheels, no compiling
    python bench/peers.py [--data DIR] [--limit-per-identity N] [--out runs/peers] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

INSTALL_HINT = (
    "bench/peers.py needs the optional 'peers' extra (dlib-bin and face-recognition-models, "
    "prebuilt wheels):\n    .venv/bin/pip install -e '.[peers]'"
)


def load_peer_models():
    """dlib's detector, 5-point landmark model and descriptor network, or exit with how to install them."""
    try:
        import dlib
        import face_recognition_models
    except ImportError as exc:
        sys.exit(f"{INSTALL_HINT}\n({exc})")
    return (
        dlib.get_frontal_face_detector(),
        dlib.shape_predictor(face_recognition_models.pose_predictor_five_point_model_location()),
        dlib.face_recognition_model_v1(face_recognition_models.face_recognition_model_location()),
    )


def limited_copy(dataset, per_identity: int, dest: Path) -> Path:
    """A folder of links to the first ``per_identity`` images of each identity, with the same relative paths
    (so the same split)."""
    taken: dict[str, int] = {}
    for item in dataset.items:
        if taken.get(item.identity, 0) >= per_identity:
            continue
        taken[item.identity] = taken.get(item.identity, 0) + 1
        link = dest / item.rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(dataset.path(item).resolve())
    return dest


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def run_pinsface(data: Path, out: Path, cache: Path) -> dict:
    """`pinsface run` as a child process; its wall and CPU time and its test metrics."""
    exe = Path(sys.executable).with_name("pinsface")
    env = dict(os.environ, PINSFACE_CACHE=str(cache))
    cpu0 = cpu_seconds(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        [str(exe), "run", str(data), "--out", str(out), "--cache", str(cache), "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"pinsface run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    metrics = json.loads((out / "report" / "metrics.json").read_text(encoding="utf-8"))
    return {
        "wall": wall,
        "cpu": cpu_seconds(resource.RUSAGE_CHILDREN) - cpu0,
        "metrics": metrics,
        "stdout": proc.stdout.strip(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def peer_descriptors(dataset, models, log_every: int = 1000) -> tuple[np.ndarray, np.ndarray, dict]:
    """dlib's descriptor of the largest HOG face of every image (NaN rows where none), and stage times."""
    from PIL import Image

    detector, landmarks, network = models
    out = np.full((len(dataset.items), 128), np.nan, np.float32)
    found = np.zeros(len(dataset.items), bool)
    seconds = {"decode": 0.0, "detect": 0.0, "describe": 0.0}
    start = time.perf_counter()
    for i, item in enumerate(dataset.items):
        t0 = time.perf_counter()
        try:
            with Image.open(dataset.path(item)) as im:  # as face_recognition.load_image_file does
                image = np.asarray(im.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
        t1 = time.perf_counter()
        boxes = detector(image, 1)
        t2 = time.perf_counter()
        seconds["decode"] += t1 - t0
        seconds["detect"] += t2 - t1
        if len(boxes):
            box = max(boxes, key=lambda b: b.width() * b.height())
            out[i] = np.asarray(network.compute_face_descriptor(image, landmarks(image, box), 1), np.float32)
            found[i] = True
            seconds["describe"] += time.perf_counter() - t2
        if log_every and (i + 1) % log_every == 0:
            elapsed = time.perf_counter() - start
            print(
                f"  peer: {i + 1}/{len(dataset.items)} images, {(i + 1) / elapsed:.1f} img/s",
                file=sys.stderr,
                flush=True,
            )
    return out, found, seconds


def fit_and_score(x: np.ndarray, found: np.ndarray, y: np.ndarray, split: np.ndarray) -> dict:
    """Test top-1 (no-face images wrong) of each classifier, fitted on train alone and on train + validation.
    Hyper-parameters are chosen on validation when fitting on train."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    def subset(name):
        return (split == name) & found

    candidates = {
        "logistic regression": [("C", c, lambda c=c: LogisticRegression(C=c, max_iter=3000)) for c in (1, 10, 100)],
        "k-NN (distance-weighted)": [
            ("k", k, lambda k=k: KNeighborsClassifier(k, weights="distance")) for k in (1, 5, 10, 20)
        ],
    }
    test = split == "test"
    results = {}
    for name, options in candidates.items():
        best = None
        t0 = time.perf_counter()
        for param, value, make in options:
            model = make().fit(x[subset("train")], y[subset("train")])
            val_top1 = (
                float(np.mean(model.predict(x[subset("val")]) == y[subset("val")])) if subset("val").any() else 0.0
            )
            if best is None or val_top1 > best[0]:
                best = (val_top1, param, value, make, model)
        val_top1, param, value, make, model = best
        row = {"param": f"{param}={value}", "val_top1": val_top1}
        for label, fitted in (
            ("train", model),
            ("train+val", make().fit(x[subset("train") | subset("val")], y[subset("train") | subset("val")])),
        ):
            pred = np.full(len(y), -1)
            pred[test & found] = fitted.predict(x[test & found])
            row[f"test_top1_{label}"] = float(np.mean(pred[test] == y[test]))
        row["seconds"] = time.perf_counter() - t0
        results[name] = row
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="dataset folder (default: as pinsface run)")
    parser.add_argument("--limit-per-identity", type=int, metavar="N", help="first N images of each identity")
    parser.add_argument("--out", default="runs/peers", help="pinsface run folder to write")
    parser.add_argument(
        "--cache",
        help="pinsface cache for this run: must be empty or missing (default: a temporary folder, removed afterwards)",
    )
    args = parser.parse_args()

    load_start = os.getloadavg()
    models = load_peer_models()  # fail before the long pinsface run if the extra is missing

    from pinsface.dataset import Split, default_data_dir, scan_dataset, split_dataset
    from pinsface.settings import Settings

    if args.cache and Path(args.cache).exists() and any(Path(args.cache).iterdir()):
        sys.exit(f"--cache {args.cache} is not empty: the comparison times pinsface from a fresh cache")
    work = Path(tempfile.mkdtemp(prefix="pinsface-peers-"))
    try:
        data = Path(args.data) if args.data else default_data_dir()
        dataset = scan_dataset(data)
        if args.limit_per_identity:
            dataset = scan_dataset(limited_copy(dataset, args.limit_per_identity, work / "data"))
        cache = Path(args.cache) if args.cache else work / "cache"
        out = Path(args.out)
        if out.exists():
            shutil.rmtree(out)
        defaults = Settings()
        split = split_dataset(dataset, defaults.seed, defaults.test_fraction, defaults.val_fraction)
        print(
            f"{len(dataset.items)} images, {len(dataset.identities)} identities, "
            f"{len(split.files('test'))} test images (seed {defaults.seed})",
            flush=True,
        )

        print("pinsface run ...", flush=True)
        ours = run_pinsface(dataset.root, out, cache)
        if set(Split.load(out / "split.json").files("test")) != set(split.files("test")):
            sys.exit("the pinsface run's test split differs from the peer's: not comparable")

        print("peer (dlib HOG + 5 landmarks + ResNet descriptor) ...", flush=True)
        label_of = {name: i for i, name in enumerate(dataset.identities)}
        y = np.array([label_of[item.identity] for item in dataset.items])
        which = np.array([split.assignment[item.rel] for item in dataset.items])
        cpu0 = cpu_seconds(resource.RUSAGE_SELF)
        start = time.perf_counter()
        x, found, stage_seconds = peer_descriptors(dataset, models)
        describe_wall = time.perf_counter() - start
        results = fit_and_score(x, found, y, which)
        peer_wall = time.perf_counter() - start
        peer_cpu = cpu_seconds(resource.RUSAGE_SELF) - cpu0
    finally:
        shutil.rmtree(work, ignore_errors=True)

    m = ours["metrics"]
    test = which == "test"
    print()
    print(
        f"data: {dataset.root}  ({len(dataset.items)} images, {len(dataset.identities)} identities, "
        f"{int(test.sum())} test images)"
    )
    print(
        f"pinsface run : test top-1 {m['top1']:.4f} ({m['n_images']} images, {m['n_no_face']} without an MTCNN "
        f"face, {m['n_no_face_scored_by_fallback']} scored from the fallback crop); "
        f"wall {ours['wall']:.0f} s, CPU {ours['cpu']:.0f} s ({100 * ours['cpu'] / ours['wall']:.0f}% of one "
        f"core), peak RSS {ours['peak_rss_mb']:.0f} MB"
    )
    print(f"               {ours['stdout'].splitlines()[0] if ours['stdout'] else ''}")
    print(
        f"peer         : HOG found a face in {int(found.sum())}/{len(found)} images "
        f"({int((test & ~found).sum())} of the test images have none: counted wrong); "
        f"descriptors {describe_wall:.0f} s ({len(found) / describe_wall:.1f} img/s: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in stage_seconds.items())
        + ")"
    )
    for name, r in results.items():
        print(
            f"  {name:26s} {r['param']:6s} val {r['val_top1']:.4f}  test top-1: fit on train "
            f"{r['test_top1_train']:.4f}, on train+val {r['test_top1_train+val']:.4f}  ({r['seconds']:.0f} s)"
        )
    print(
        f"peer total   : wall {peer_wall:.0f} s, CPU {peer_cpu:.0f} s ({100 * peer_cpu / peer_wall:.0f}% of one core)"
    )
    headline = results["logistic regression"]
    print()
    print(f"{'':28s}{'test top-1':>12s}{'wall s':>9s}")
    print(f"{'pinsface run':28s}{m['top1']:12.4f}{ours['wall']:9.0f}")
    print(f"{'peer, LR fit on train':28s}{headline['test_top1_train']:12.4f}{peer_wall:9.0f}")
    print(f"{'peer, LR fit on train+val':28s}{headline['test_top1_train+val']:12.4f}{peer_wall:9.0f}")
    print(f"peer / pinsface wall time: {peer_wall / ours['wall']:.2f}x")
    print(
        f"load average at the start {load_start[0]:.1f}, at the end {os.getloadavg()[0]:.1f} "
        f"({os.cpu_count()} cores; other work on the machine slows both sides)"
    )


if __name__ == "__main__":
    main()
