"""An LFW-format copy of the shared Pins data's TEST split, with a pairs.txt in LFW's View 2 format.

The images are linked (symlinks) into DEST/<Name>/<Name>_NNNN.jpg, numbered from 1 in the order of their paths.
Only the test split of the default seed and fractions (as `pinsface run` draws it) is used, so nothing that any
pinsface model was fitted on appears in a pair. As in LFW, the folds are identity-disjoint: the identities are
dealt out to the folds, and each fold's matched pairs are two images of one of its identities and its mismatched
pairs one image each of two of its identities, drawn without repeats from ``--seed``.

    python bench/lfw_pins.py DEST [--data DIR] [--folds 10] [--pairs-per-fold 300] [--seed 0]
    python bench/lfw.py --lfw DEST --pairs DEST/pairs.txt
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import numpy as np


def lfw_name(identity: str) -> str:
    """LFW's spelling of a person's name: words joined by underscores."""
    return "_".join(identity.split())


def test_images(data) -> dict[str, list[Path]]:
    """Each identity's test-split images (sorted by path), by LFW name."""
    from pinsface.dataset import scan_dataset, split_dataset
    from pinsface.settings import Settings

    dataset = scan_dataset(data)
    defaults = Settings()
    split = split_dataset(dataset, defaults.seed, defaults.test_fraction, defaults.val_fraction)
    out: dict[str, list[Path]] = {}
    for item in dataset.items:
        if split.assignment[item.rel] == "test":
            out.setdefault(lfw_name(item.identity), []).append(dataset.path(item))
    return out


def link_images(images: dict[str, list[Path]], dest: Path) -> None:
    """DEST/<Name>/<Name>_NNNN.jpg -> the shared images (symlinks; nothing is copied)."""
    for name, paths in images.items():
        folder = dest / name
        folder.mkdir(parents=True, exist_ok=True)
        for n, path in enumerate(paths, 1):
            (folder / f"{name}_{n:04d}.jpg").symlink_to(path.resolve())


def draw_pairs(counts: dict[str, int], folds: int, per_fold: int, seed: int) -> list[tuple[list, list]]:
    """Per fold, ``per_fold`` matched (name, n1, n2) and ``per_fold`` mismatched (name1, n1, name2, n2) pairs."""
    rng = np.random.default_rng(seed)
    names = [n for n in sorted(counts) if counts[n] >= 2]
    names = [names[i] for i in rng.permutation(len(names))]
    out = []
    for fold in range(folds):
        members = sorted(names[fold::folds])
        matched = [(n, a + 1, b + 1) for n in members for a, b in itertools.combinations(range(counts[n]), 2)]
        mismatched = [
            (n1, a + 1, n2, b + 1)
            for n1, n2 in itertools.combinations(members, 2)
            for a in range(counts[n1])
            for b in range(counts[n2])
        ]
        if len(matched) < per_fold or len(mismatched) < per_fold:
            sys.exit(f"fold {fold + 1} has too few images for {per_fold} pairs of each kind: use fewer folds or pairs")
        out.append(
            (
                [matched[i] for i in sorted(rng.choice(len(matched), per_fold, replace=False))],
                [mismatched[i] for i in sorted(rng.choice(len(mismatched), per_fold, replace=False))],
            )
        )
    return out


def write_pairs(path: Path, pairs: list[tuple[list, list]]) -> None:
    lines = [f"{len(pairs)}\t{len(pairs[0][0])}"]
    for matched, mismatched in pairs:
        lines += ["\t".join(map(str, p)) for p in matched] + ["\t".join(map(str, p)) for p in mismatched]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def build(dest, data=None, folds: int = 10, per_fold: int = 300, seed: int = 0) -> Path:
    """Builds the LFW-format folder and DEST/pairs.txt (DEST must be empty or missing); returns pairs.txt."""
    from pinsface.dataset import default_data_dir

    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        sys.exit(f"{dest} is not empty")
    images = test_images(data or default_data_dir())
    pairs = draw_pairs({n: len(p) for n, p in images.items()}, folds, per_fold, seed)
    dest.mkdir(parents=True, exist_ok=True)
    link_images(images, dest)
    write_pairs(dest / "pairs.txt", pairs)
    return dest / "pairs.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", help="folder to create (empty or missing)")
    parser.add_argument("--data", default=None, help="the Pins folder (default: as pinsface run)")
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument(
        "--pairs-per-fold", type=int, default=300, help="matched pairs per fold (and as many mismatched)"
    )
    parser.add_argument("--seed", type=int, default=0, help="draws the folds and pairs (the split stays the default)")
    args = parser.parse_args()
    if args.folds < 2 or args.pairs_per_fold < 1:
        sys.exit("--folds must be at least 2 and --pairs-per-fold at least 1")
    print(build(args.dest, args.data, args.folds, args.pairs_per_fold, args.seed))


if __name__ == "__main__":
    main()
