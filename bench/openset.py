"""The honest open-set test: train on 95 of the 105 Pins identities, treat the other 10 as strangers.

    python bench/openset.py [--out runs/openset] [--cache DIR]

Prints the share of strangers rejected and of known test faces accepted and named correctly at the calibrated
thresholds, then enrols one stranger from 10 photos and prints how well their other photos are named and how
much top-1 on the 95 known identities moves. Then the same for gallery mode (no head, pinsface.scoring): test
top-1, the open-set figures, and enrolment without a head refit.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from pinsface.testing.shared import pins_dir

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402  (the set-up above must come first)

PINS = pins_dir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(PINS))
    parser.add_argument("--out", default="runs/openset")
    parser.add_argument("--cache", default=None)
    args = parser.parse_args()

    from pinsface.embeddings import run_embedding_cache
    from pinsface.evaluate import evaluate, evaluate_open_set
    from pinsface.pipeline import train
    from pinsface.predict import Recognizer
    from pinsface.runfolder import Run
    from pinsface.scoring import head_probabilities
    from pinsface.settings import Settings

    folders = sorted(p for p in Path(args.data).iterdir() if p.is_dir())
    strangers = folders[5::10][:10]  # ten identities spread over the alphabet
    tmp = Path(tempfile.mkdtemp(prefix="pinsface-openset-"))
    for folder in folders:
        dest = tmp / ("strangers" if folder in strangers else "known") / folder.name
        dest.parent.mkdir(exist_ok=True)
        dest.symlink_to(folder.resolve(), target_is_directory=True)
    print("strangers:", ", ".join(f.name[5:] for f in strangers))

    t = time.perf_counter()
    result = train(tmp / "known", args.out, Settings(), cache_dir=args.cache, progress=False)
    print(f"trained on {len(folders) - len(strangers)} identities in {time.perf_counter() - t:.0f} s")
    o = evaluate_open_set(args.out, tmp / "strangers", prepared=result["prepared"], progress=False)
    print(
        f"calibrated thresholds: probability >= {o['threshold_probability']:.3f}, "
        f"distance <= {o['threshold_distance']:.3f} (validation: {o['calibration']})"
    )
    print(f"strangers rejected: {100 * o['strangers_rejected']:.2f}% of {o['n_strangers']} images")
    print(
        f"known test images accepted and named correctly: {100 * o['known_accepted_and_correct']:.2f}% "
        f"of {o['n_known_test_images']}"
    )

    # Enrol one stranger from 10 photos; name their other photos; check the known identities' top-1.
    recognizer = Recognizer.load(args.out)
    settings: Settings = recognizer.settings
    prepared = result["prepared"]
    split = Run(args.out).split()
    test = set(split.files("test"))
    items = [i for i, it in enumerate(prepared.dataset.items) if it.rel in test and prepared.status[i] != "skipped"]
    hashes = [prepared.hashes[i] for i in items]
    labels = recognizer.labels
    y = np.array([labels.index(prepared.dataset.items[i].identity) for i in items])
    index, emb, flip = run_embedding_cache(settings, prepared.cache.root).load(hashes)
    rows = [index[h] for h in hashes if h in index]
    y_scored = np.array([yy for h, yy in zip(hashes, y) if h in index])

    def known_top1() -> float:
        probs = head_probabilities(recognizer.head, emb[rows], flip[rows])
        return float(np.sum(np.argmax(probs, 1) == y_scored) / len(items))

    before = known_top1()
    person = strangers[0]
    photos = sorted(person.glob("*.jpg"))
    t = time.perf_counter()
    summary = recognizer.enroll(person.name[5:], [str(p) for p in photos[:10]])
    enroll_seconds = time.perf_counter() - t
    results = recognizer.identify_many([str(p) for p in photos[10:]])
    named = np.mean([bool(r.faces) and r.faces[0].identity == person.name[5:] for r in results])
    after = known_top1()
    print(
        f"enrolled {person.name[5:]} from 10 photos in {enroll_seconds:.1f} s ({summary['faces_used']} faces): "
        f"{100 * named:.1f}% of their other {len(results)} photos named correctly"
    )
    print(
        f"known identities' test top-1: {100 * before:.2f}% before, {100 * after:.2f}% after "
        f"({100 * (after - before):+.2f} points)"
    )

    # Gallery mode beside head mode, on the same run, which now knows the enrolled stranger: the other nine are
    # the strangers here (evaluate_open_set refuses a stranger the run knows).
    unenrolled = tmp / "strangers-unenrolled"
    unenrolled.mkdir()
    for folder in strangers[1:]:
        (unenrolled / folder.name).symlink_to(folder.resolve(), target_is_directory=True)
    for mode in ("head", "gallery"):
        m = evaluate(
            args.out, out=Path(args.out) / f"report-{mode}", prepared=prepared, progress=False, figures=False, mode=mode
        )
        o = evaluate_open_set(
            args.out,
            unenrolled,
            out=Path(args.out) / f"report-{mode}",
            prepared=prepared,
            progress=False,
            mode=mode,
        )
        print(
            f"{mode} mode: test top-1 {100 * m['top1']:.2f}%, top-5 {100 * m['top5']:.2f}%; strangers rejected "
            f"{100 * o['strangers_rejected']:.2f}%, known test images accepted and named correctly "
            f"{100 * o['known_accepted_and_correct']:.2f}%"
        )
    gallery_mode = Recognizer.load(args.out, mode="gallery")
    t = time.perf_counter()
    summary = gallery_mode.enroll(person.name[5:], [str(p) for p in photos[:10]])
    enroll_seconds = time.perf_counter() - t
    results = gallery_mode.identify_many([str(p) for p in photos[10:]])
    named = np.mean([bool(r.faces) and r.faces[0].identity == person.name[5:] for r in results])
    print(
        f"gallery mode: enrolled {person.name[5:]} from 10 photos in {enroll_seconds:.2f} s (detection and "
        f"embedding included, no head refit): {100 * named:.1f}% of their other {len(results)} photos named"
    )


if __name__ == "__main__":
    main()
