"""Chip framing: how the template's scale (``FaceSettings.template_scale``) changes how well descriptors tell
people apart.

    nice -n 5 python bench/framing.py [--data PINS] [--scales 1.0 1.05 1.075 1.1 1.15] [--draws 4]

The faces: those of the run split's train and validation photos (the face `prepare` chose in each, with its
cached landmarks; photos where no face was found are left out), each cut again at every scale and described as
`pinsface index` and `describe` describe them (the chip's embedding averaged with its mirror image's). The test
split is never read but for its sizes. Per scale:

- nearest-centre accuracy: each validation face named after the nearest mean of a person's train faces;
- the share of validation faces whose nearest other face is a stranger's;
- the known-people bound (bench/cluster.py) on the validation split and on --draws libraries like the test split
  drawn from the train split (bench/cluster.py --frontier's draws; medians);
- pinsface's clustering at the thresholds bench/cluster.py --tune's rule picks for that scale from its grid
  (the validation long tails refitted to that scale's train faces): BCubed F1 of the validation split and the
  draws (median), and the long tails' precision and F1, with Chinese whispers' F1 on them (dlib, the `peers`
  extra; without it the rule's F1 floor is 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402  (the set-up above must come first)

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cluster as cb  # noqa: E402  (bench/ on the path first)


def chosen_faces(data) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(each photo's path, the chosen face's landmarks, its person, its part) for the train and validation
    photos with a face found."""
    from pinsface.cache import default_cache_dir
    from pinsface.dataset import default_data_dir, scan_dataset, split_dataset
    from pinsface.prepare import prepare
    from pinsface.settings import Settings

    settings = Settings()
    dataset = scan_dataset(data or default_data_dir())
    prepared = prepare(dataset=dataset, cache_dir=default_cache_dir(), settings=settings.faces, progress=False)
    split = split_dataset(dataset, settings.seed, settings.test_fraction, settings.val_fraction)
    table = prepared.faces(crops=())
    columns = table.columns
    paths, landmarks, owner, part = [], [], [], []
    for i, item in enumerate(dataset.items):
        where, digest = split.assignment[item.rel], prepared.hashes[i]
        if where not in ("train", "val") or prepared.status[i] == "ambiguous" or digest not in table.index:
            continue
        row = table.index[digest]
        if columns["n_faces"][row] == 0 or columns["chosen"][row] < 0:
            continue
        paths.append(str(dataset.root / item.rel))
        landmarks.append(np.asarray(columns["landmarks"][columns["face_offset"][row] + columns["chosen"][row]]))
        owner.append(dataset.identities.index(item.identity))
        part.append(where)
    return paths, np.array(landmarks, np.float32), np.array(owner), np.array(part)


def describe_at(scale: float, paths: list[str], landmarks, embedder) -> np.ndarray:
    """The faces' descriptors with the chip cut at ``scale`` (each photo decoded again: holding every photo's
    pixels would take gigabytes)."""
    from pinsface.face_index import face_vectors
    from pinsface.faces import align_face
    from pinsface.images import load_image
    from pinsface.settings import FaceSettings

    framing = dataclasses.replace(FaceSettings(), template_scale=scale)
    chips = np.stack([align_face(load_image(p), lm, framing) for p, lm in zip(paths, landmarks)])
    return face_vectors(*embedder.both_views(chips)).astype(np.float32)


def nearest_centre_accuracy(x: np.ndarray, owner: np.ndarray, train: np.ndarray, val: np.ndarray) -> float:
    people = np.unique(owner[train])
    centres = np.stack([x[train][owner[train] == k].mean(0) for k in people])
    squared = (x[val] ** 2).sum(1)[:, None] - 2 * x[val] @ centres.T + (centres**2).sum(1)[None, :]
    return float(np.mean(people[squared.argmin(1)] == owner[val]))


def stranger_share(x: np.ndarray, owner: np.ndarray) -> float:
    from pinsface.library_cluster import neighbour_graph

    _, ids = neighbour_graph(x, k=1)
    return float(np.mean(owner[ids[:, 0]] != owner))


def tuned(val, draws, tails) -> tuple[dict, float, float, float, float, float]:
    """bench/cluster.py --tune's rule over its grid: (setting, validation F1, draws' median F1, long tails'
    precision and F1, Chinese whispers' F1 on the tails)."""
    floor = cb.whispers_f1(tails)
    best = cb.tune_choice(cb.tune_rows(val, draws, tails), floor)
    if best is None:
        return {}, np.nan, np.nan, np.nan, np.nan, floor
    setting, val_scores, drawn, tail, _ = best
    return setting, val_scores[2], float(np.median(drawn)), tail[0], tail[2], floor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="the Pins folder (default: as pinsface finds it)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.05, 1.075, 1.1, 1.15])
    parser.add_argument("--draws", type=int, default=4, help="libraries like the test split drawn from train")
    args = parser.parse_args()

    from pinsface.backbones import get_backbone
    from pinsface.embeddings import run_embedder
    from pinsface.settings import Settings

    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    paths, landmarks, owner, part = chosen_faces(args.data)
    train, val = np.flatnonzero(part == "train"), np.flatnonzero(part == "val")
    wanted = np.bincount(cb.test_split(args.data, "test")[1], minlength=owner.max() + 1)
    draws = cb.draw_rows(owner[train], wanted, args.draws)
    print(f"{len(train):,} train and {len(val):,} validation faces; {args.draws} test-like draws from train")
    embedder = run_embedder(Settings(), get_backbone(Settings().backbone))
    print(
        "| template_scale | nearest-centre accuracy | stranger nearest | known-people bound: validation / draws "
        "| tuned setting | F1: validation / draws | long tails P / F1 (Chinese whispers F1) | describe s |"
    )
    print("|---" * 8 + "|")
    for scale in args.scales:
        start = time.perf_counter()
        x = describe_at(scale, paths, landmarks, embedder)
        seconds = time.perf_counter() - start
        libraries = [(x[train][rows], owner[train][rows]) for rows in draws]
        fit = cb.fit_generator(x[train], owner[train], np.random.default_rng(0))
        tails = []
        for seed in cb.TUNE_TAIL_SEEDS:
            tail, who = cb.synthetic(x[train], owner[train], 3000, 3, np.random.default_rng(seed), vary=True, fit=fit)
            tails.append((np.concatenate([x[val], tail]), np.concatenate([owner[val], who + owner.max() + 1])))
        bound = np.median([cb.known_people_bound(*lib) for lib in libraries])
        setting, val_f1, drawn, tail_p, tail_f1, floor = tuned((x[val], owner[val]), libraries, tails)
        short = " / ".join(f"{v:g}" for v in setting.values())
        print(
            f"| {scale:g} | {nearest_centre_accuracy(x, owner, train, val):.4f} "
            f"| {stranger_share(x[val], owner[val]):.2%} "
            f"| {cb.known_people_bound(x[val], owner[val]):.4f} / {bound:.4f} | {short} "
            f"| {val_f1:.4f} / {drawn:.4f} | {tail_p:.4f} / {tail_f1:.4f} ({floor:.4f}) | {seconds:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
