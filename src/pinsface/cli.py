"""The ``pinsface`` command: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _prepare(args) -> int:
    from pinsface.prepare import format_summary, prepare
    from pinsface.settings import FaceSettings

    result = prepare(args.data_dir, args.cache, FaceSettings(), batch_size=args.batch_size,
                     progress=not args.no_progress)
    if args.json:
        print(json.dumps(result.summary, ensure_ascii=False))
    else:
        print(format_summary(result.summary))
    return 0


def _download(args) -> int:
    from pinsface.dataset import download_dataset

    print(download_dataset(args.dest))
    return 0


def _settings_from(args):
    from pinsface.settings import Settings

    settings = Settings()
    for key in ("model", "epochs", "seed"):
        value = getattr(args, key, None)
        if value is not None:
            setattr(settings, key, value)
    if getattr(args, "fine_tune", None) is not None:
        settings.fine_tune = args.fine_tune
    return settings


def _train(args) -> int:
    from pinsface.train import train

    result = train(args.data_dir, args.out, _settings_from(args), cache_dir=args.cache,
                   progress=not args.no_progress)
    print(f"saved {args.out}: validation top-1 {result['val_top1']:.4f}")
    return 0


def _run(args) -> int:
    from pinsface.train import run

    report = run(args.data_dir, args.out, _settings_from(args), cache_dir=args.cache,
                 progress=not args.no_progress)
    print(f"test split: {_headline(report)}")
    print(f"report: {os.path.join(args.out, 'report', 'report.html')}")
    return 0


def _evaluate(args) -> int:
    from pinsface.evaluate import evaluate

    metrics = evaluate(args.run_dir, data=args.data, out=args.out, progress=not args.no_progress,
                       compare=args.compare)
    print(_headline(metrics))
    if metrics.get("unknown_identities"):
        print("not known to this run (reported, not scored): "
              + ", ".join(f"{k} ({v} images)" for k, v in metrics["unknown_identities"].items()))
    return 0


def _headline(m: dict) -> str:
    return (f"top-1 {m['top1']:.4f}  top-5 {m['top5']:.4f}  macro-F1 {m['macro_f1']:.4f}  "
            f"({m['n_images']} images, {m['n_no_face']} without a detected face, {m['n_unreadable']} unreadable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pinsface", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, data=True):
        if data:
            p.add_argument("data_dir", nargs="?", help="folder with one sub-folder per person "
                           "(default: $PINSFACE_DATA, else ../shared/data/pins/105_classes_pins_dataset)")
        p.add_argument("--cache", help="cache folder (default: $PINSFACE_CACHE or ~/.cache/pinsface)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("prepare", help="detect, align and cache every face of a dataset")
    common(p)
    p.add_argument("--batch-size", type=int, default=64, help="images per MTCNN batch")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("download", help="fetch the Pins dataset from Kaggle (needs credentials + kagglehub)")
    p.add_argument("--dest", help="where kagglehub stores it")
    p.set_defaults(func=_download)

    for name, func, help_text in (("train", _train, "prepare if needed, then train a model into RUN_DIR"),
                                  ("run", _run, "prepare, train, then evaluate on the test split")):
        p = sub.add_parser(name, help=help_text)
        common(p)
        p.add_argument("--out", required=True, help="run folder to write")
        p.add_argument("--model", choices=["embedding", "pixels-mlp"], help="default: embedding")
        p.add_argument("--epochs", type=int, help="maximum epochs (early stopping usually ends sooner)")
        p.add_argument("--seed", type=int, help="split and training seed")
        p.add_argument("--fine-tune", action=argparse.BooleanOptionalAction, default=None,
                       help="unfreeze the top backbone blocks after the head converges")
        p.set_defaults(func=func)

    p = sub.add_parser("evaluate", help="score a trained run and write its report (RUN_DIR/report/)")
    p.add_argument("run_dir", help="a folder written by pinsface train or run")
    p.add_argument("--data", help="a labelled folder (one sub-folder per person) instead of the run's test split")
    p.add_argument("--out", help="report folder (default RUN_DIR/report)")
    p.add_argument("--compare", help="another run (e.g. the pixels-mlp baseline) to compare against")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"pinsface: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
