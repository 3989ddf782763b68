"""Enrolment by imprinting, measured: train on 90 Pins identities, enrol the other 15 from 5 photos each.

    python bench/enrol.py [--run runs/enrol90] [--photos 5]

The 90 trained identities are every identity but each seventh (from the fourth); the run is trained once (into
--run) and reused. Faces come from the shared face cache, as training sees them. Printed, for head mode and
gallery mode on copies of the run:
- strangers rejected before anyone is enrolled: the 15 people's photos against the 90;
- recall after enrolment: the share of each enrolled person's other photos named as them;
- strangers rejected after enrolment: each enrolled person forgotten in turn, their photos against the 104
  others (90 trained and 14 enrolled), then enrolled again;
- after enrolment, the enrolled people's other photos given someone else's name; the trained people's photos
  whose right name was lost (or gained) by the enrolments;
- server time per enrolment (detection excluded) and per forgetting, medians; one full enrolment with
  detection; the growth of peak RSS over 50 enrolments and forgettings; the bytes one enrolment writes.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from pinsface.testing.shared import pins_dir

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402  (the set-up above must come first)

PINS = pins_dir()


def split_folders(data: Path, tmp: Path) -> tuple[Path, Path]:
    folders = sorted(p for p in data.iterdir() if p.is_dir())
    for i, folder in enumerate(folders):
        dest = tmp / ("held" if i % 7 == 3 else "known") / folder.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(folder.resolve(), target_is_directory=True)
    return tmp / "known", tmp / "held"


def held_embeddings(run_dir: Path, held: Path) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """Each held-out person's usable faces (embeddings, mirror embeddings, file names), in file order."""
    from pinsface.dataset import scan_dataset
    from pinsface.embeddings import ensure_embeddings, run_embedder, run_embedding_cache
    from pinsface.prepare import prepare_for_run, usable_status
    from pinsface.runfolder import Run

    run = Run(run_dir)
    settings = run.settings()
    prepared = prepare_for_run(settings, held, dataset=scan_dataset(held), progress=False)
    ok = usable_status(settings)
    model = run.load_state(settings).model
    embedder = run_embedder(settings, model.get_layer(settings.backbone))
    out = {}
    for name in prepared.dataset.identities:
        rows = [i for i, it in enumerate(prepared.dataset.items) if it.identity == name and prepared.status[i] in ok]
        rows.sort(key=lambda i: prepared.dataset.items[i].rel)
        hashes = [prepared.hashes[i] for i in rows]
        emb, flip = ensure_embeddings(
            hashes, prepared.cache, run_embedding_cache(settings, prepared.cache.root), embedder, progress=False
        )
        out[name] = (emb, flip, [str(held / prepared.dataset.items[i].rel) for i in rows])
    return out


def named(rec, emb, flip) -> list[str | None]:
    return [rec.labels[m.best] if m.accepted else None for m in rec.match(emb, flip, top_k=1)]


def named_all(rec, people: dict, n: int = 0) -> tuple[list[str | None], list[str]]:
    """(the name given to each person's photos after their first ``n``, who each photo is of)."""
    given = [who for e, f, _ in people.values() for who in named(rec, e[n:], f[n:])]
    return given, [name for name, (e, _, _) in people.items() for _ in range(len(e) - n)]


def measure(rec, people: dict, n: int, trained: dict) -> dict:
    """The figures above for one recogniser (head or gallery mode) on its own copy of the run."""
    before, _ = named_all(rec, people, n)
    trained_before, truth = named_all(rec, trained)
    enrol_s, enrol_cpu, forget_s, written = [], [], [], []
    for name, (e, f, _) in people.items():
        files = {p: p.stat().st_size for p in rec.run_dir.iterdir()}
        t, c = time.perf_counter(), time.process_time()
        rec.enroll_faces(name, e[:n], f[:n], [f"{name}-{k}" for k in range(n)])
        enrol_s.append(time.perf_counter() - t)
        enrol_cpu.append(time.process_time() - c)
        written.append(sum(p.stat().st_size for p in rec.run_dir.iterdir() if files.get(p) != p.stat().st_size))
    given, whose = named_all(rec, people, n)
    hits = sum(a == b for a, b in zip(given, whose))
    misnamed = sum(a is not None and a != b for a, b in zip(given, whose))
    trained_after, _ = named_all(rec, trained)
    taken = sum(a == t and b != t for a, b, t in zip(trained_before, trained_after, truth))
    gained = sum(a != t and b == t for a, b, t in zip(trained_before, trained_after, truth))
    after = []
    for name, (e, f, _) in people.items():
        t = time.perf_counter()
        rec.forget(name)
        forget_s.append(time.perf_counter() - t)
        after += named(rec, e[n:], f[n:])
        rec.enroll_faces(name, e[:n], f[:n], [f"{name}-{k}" for k in range(n)])
    total = sum(len(e) - n for e, _, _ in people.values())
    return {
        "strangers_before": np.mean([who is None for who in before]),
        "recall": hits / total,
        "strangers_after": np.mean([who is None for who in after]),
        "n_photos": total,
        "misnamed": misnamed / total,
        "taken": taken,
        "gained": gained,
        "n_trained": len(truth),
        "enrol_s": np.median(enrol_s),
        "enrol_cpu_s": np.median(enrol_cpu),
        "forget_s": np.median(forget_s),
        "written_kb": np.median(written) / 1024,
    }


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024


def rss_growth(rec, people: dict, n: int, rounds: int = 50) -> tuple[float, float]:
    """MB that RSS and peak RSS grow by over ``rounds`` enrolments from photos, detection included (each
    followed by a forgetting), after 5 to warm up; every round enrols photos not seen before."""
    names = list(people)

    def cycle(k: int) -> None:
        name = names[k % len(names)]
        files = people[name][2]
        start = n + (k // len(names)) * n % max(1, len(files) - 2 * n)  # photos not enrolled before
        rec.enroll(f"{name} {k}", files[start : start + n])
        rec.forget(f"{name} {k}")

    for k in range(5):
        cycle(k)
    start, start_peak = rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for k in range(5, 5 + rounds):
        cycle(k)
    return rss_mb() - start, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_peak) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(PINS))
    parser.add_argument("--run", default="runs/enrol90")
    parser.add_argument("--photos", type=int, default=5)
    args = parser.parse_args()

    from pinsface.pipeline import train
    from pinsface.predict import Recognizer
    from pinsface.settings import Settings

    tmp = Path(tempfile.mkdtemp(prefix="pinsface-enrol-"))
    known, held = split_folders(Path(args.data), tmp / "data")
    run_dir = Path(args.run)
    if not (run_dir / "config.json").is_file():
        t = time.perf_counter()
        train(known, run_dir, Settings(), progress=False)
        print(f"trained on 90 identities in {time.perf_counter() - t:.0f} s")
    people = held_embeddings(run_dir, held)
    trained = held_embeddings(run_dir, known)
    print(f"held out: {len(people)} people, {sum(len(e) for e, _, _ in people.values())} usable photos")
    n = args.photos
    for mode in ("head", "gallery"):
        copy = shutil.copytree(run_dir, tmp / mode)
        rec = Recognizer.load(copy, mode=mode)
        m = measure(rec, people, n, trained)
        print(
            f"{mode:8s} strangers rejected before enrolment {100 * m['strangers_before']:.1f}%, "
            f"enrolled from {n} photos: other photos named {100 * m['recall']:.1f}% of {m['n_photos']}, "
            f"strangers rejected after enrolment {100 * m['strangers_after']:.1f}%"
        )
        print(
            f"{mode:8s} after the {len(people)} enrolments: their other photos given a wrong name "
            f"{100 * m['misnamed']:.2f}%; of the {m['n_trained']} trained people's photos, {m['taken']} named "
            f"rightly before are not any more, {m['gained']} are named rightly now"
        )
        print(
            f"{mode:8s} per enrolment (detection excluded): {m['enrol_s'] * 1000:.0f} ms wall, "
            f"{m['enrol_cpu_s'] * 1000:.0f} ms CPU, {m['written_kb']:.0f} KB written; "
            f"per forgetting {m['forget_s'] * 1000:.0f} ms wall (medians)"
        )
        if mode == "head":
            name = next(iter(people))
            rec.forget(name)
            t = time.perf_counter()
            rec.enroll(name, people[name][2][:n])
            print(f"head     one enrolment with detection of {n} photos: {time.perf_counter() - t:.2f} s wall")
            grew, peak = rss_growth(rec, people, n)
            print(
                f"head     50 enrolments from {n} photos (detection included) and forgettings: RSS grew "
                f"{grew:.1f} MB, peak RSS {peak:.1f} MB"
            )
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
