"""What the final refit (``Settings.final_fit="train+val"``) does to people enrolled later.

    python bench/refit.py [--per-identity 24] [--enrol-photos 4]

Trains the same small run (six Pins identities) with and without the refit and with and without the
head/nearest-faces blend, enrols two newcomers from a few photos each, and counts how many of ten other photos of
each newcomer are named correctly. Everything is built in a temporary folder from ../shared.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from pinsface.testing.shared import pins_dir

PINS = pins_dir()
KNOWN = ["Adriana Lima", "Alex Lawther", "Bill Gates", "Brie Larson", "Chris Evans", "Anne Hathaway"]
NEWCOMERS = ["Ben Affleck", "Avril Lavigne"]


def photos(name: str, n: int, start: int) -> list[str]:
    return [str(p) for p in sorted((PINS / f"pins_{name}").glob("*.jpg"))[start : start + n]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-identity", type=int, default=24)
    parser.add_argument("--enrol-photos", type=int, default=4)
    args = parser.parse_args()

    from pinsface.pipeline import train
    from pinsface.predict import Recognizer
    from pinsface.prepare import prepare
    from pinsface.settings import Settings

    base = Path(tempfile.mkdtemp(prefix="pinsface-refit-"))
    try:
        for name in KNOWN:
            (base / "data" / name).mkdir(parents=True)
            for p in photos(name, args.per_identity, 0):
                shutil.copy(p, base / "data" / name)
        prepared = prepare(base / "data", base / "cache", progress=False)
        for final_fit in ("none", "train+val"):
            for blend in (False, True):
                settings = Settings(
                    epochs=25, test_fraction=0.25, val_fraction=0.25, final_fit=final_fit, knn_blend=blend
                )
                out = base / f"run-{final_fit}-{blend}"
                result = train(out_dir=out, settings=settings, progress=False, prepared=prepared)
                recognizer = Recognizer.load(out)
                for name in NEWCOMERS:
                    recognizer.enroll(name, photos(name, args.enrol_photos, 0), save=False)
                named = []
                for name in NEWCOMERS:
                    results = recognizer.identify_many(photos(name, 10, 40))
                    named.append(sum(bool(r.faces) and r.faces[0].identity == name for r in results))
                print(
                    f"final_fit={final_fit:9s} blend={blend!s:5s} (weight {recognizer.gallery.knn_weight}): "
                    f"validation top-1 {result['val_top1']:.4f}; newcomers enrolled from {args.enrol_photos} photos, "
                    + ", ".join(f"{n}: {k}/10 other photos named" for n, k in zip(NEWCOMERS, named)),
                    flush=True,
                )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
