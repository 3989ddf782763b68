"""The ``pinsface`` command: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _prepare(args) -> int:
    from pinsface.prepare import format_summary, prepare

    embed = None
    if args.engine == "ray":  # the workers embed the faces too, with the default backbone
        from pinsface.settings import Settings

        embed = Settings()
    result = prepare(
        args.data_dir,
        args.cache,
        _face_settings(args),
        batch_size=args.batch_size,
        progress=not args.no_progress,
        engine=args.engine,
        address=args.address,
        embed=embed,
    )
    if args.json:
        print(json.dumps(result.summary, ensure_ascii=False))
    else:
        print(format_summary(result.summary))
    return 0


def _download(args) -> int:
    from pinsface.dataset import download_dataset

    print(download_dataset(args.dest))
    return 0


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def _face_settings(args):
    from pinsface.settings import FaceSettings

    if args.min_face_fraction is None:
        return FaceSettings()
    return FaceSettings(min_face_fraction=args.min_face_fraction)


def _settings_from(args):
    from pinsface.settings import Settings

    keys = ("model", "epochs", "seed", "augment_views", "target_far", "fine_tune", "mode")
    values = {key: getattr(args, key) for key in keys if getattr(args, key, None) is not None}
    return Settings(faces=_face_settings(args), **values)


def _pipeline_options(args) -> dict:
    return {"cache_dir": args.cache, "progress": not args.no_progress, "engine": args.engine, "address": args.address}


def _train(args) -> int:
    from pinsface.pipeline import train

    result = train(args.data_dir, args.out, _settings_from(args), **_pipeline_options(args))
    print(f"saved {args.out}: validation top-1 {result['val_top1']:.4f}")
    return 0


def _run(args) -> int:
    from pinsface.pipeline import run

    report = run(args.data_dir, args.out, _settings_from(args), **_pipeline_options(args))
    print(f"test split: {_headline(report)}")
    print(f"report: {os.path.join(args.out, 'report', 'report.html')}")
    return 0


def _evaluate(args) -> int:
    from pinsface.evaluate import evaluate

    metrics = evaluate(
        args.run_dir,
        data=args.data,
        out=args.out,
        progress=not args.no_progress,
        compare=args.compare,
        mode=args.mode,
        engine=args.engine,
        address=args.address,
    )
    print(_headline(metrics))
    if args.unknown:
        from pinsface.evaluate import evaluate_open_set

        o = evaluate_open_set(
            args.run_dir,
            args.unknown,
            out=args.out,
            progress=not args.no_progress,
            mode=args.mode,
            engine=args.engine,
            address=args.address,
        )
        print(
            f"open set: {100 * o['strangers_rejected']:.2f}% of {o['n_strangers']} strangers rejected, "
            f"{100 * o['known_accepted_and_correct']:.2f}% of {o['n_known_test_images']} known test images "
            f"accepted and named correctly (thresholds: probability >= {o['threshold_probability']:.3f}, "
            f"distance <= {o['threshold_distance']:.3f})"
        )
    if metrics.get("unknown_identities"):
        print(
            "not known to this run (reported, not scored): "
            + ", ".join(f"{k} ({v} images)" for k, v in metrics["unknown_identities"].items())
        )
    return 0


def _predict(args) -> int:
    from pinsface.images import load_image
    from pinsface.predict import Recognizer, annotate, expand_inputs, format_table

    recognizer = Recognizer.load(args.run_dir, mode=args.mode)
    files = expand_inputs(args.paths)
    if not files:
        raise FileNotFoundError(f"no images found in {' '.join(args.paths)}")
    results = recognizer.identify_many(
        files,
        batch_size=args.batch_size,
        top_k=args.top_k,
        threshold=args.threshold,
        min_probability=args.min_probability,
        progress=not args.no_progress,
    )
    if args.json:
        for r in results:
            print(json.dumps(r.to_dict(), ensure_ascii=False))
    else:
        print(format_table(results))
    if args.annotate:
        from pathlib import Path

        used: set[str] = set()
        for r in results:
            if r.error:
                continue
            stem = Path(r.source).stem
            name = stem if stem not in used else f"{stem}_{len(used)}"
            used.add(name)
            annotate(load_image(r.source), r.faces, Path(args.annotate) / f"{name}.jpg")
    return 0


def _enroll(args) -> int:
    from pinsface.predict import Recognizer, expand_inputs

    recognizer = Recognizer.load(args.run_dir, mode=args.mode)
    summary = recognizer.enroll(args.name, expand_inputs(args.photos))
    print(
        f"enrolled {summary['identity']!r} from {summary['faces_used']} face(s) of {summary['photos']} photo(s); "
        f"{summary['identities']} identities known; thresholds: probability >= "
        f"{recognizer.gallery.threshold_probability:.3f}, distance <= {recognizer.gallery.threshold_distance:.3f}"
    )
    for s in summary["skipped"]:
        print(f"  skipped {s['source']}: {s['reason']}")
    return 0


def _forget(args) -> int:
    from pinsface.predict import Recognizer

    recognizer = Recognizer.load(args.run_dir)
    summary = recognizer.forget(args.name)
    print(f"forgot {summary['identity']!r}; {summary['identities']} identities known")
    return 0


def _serve(args) -> int:
    try:
        from pinsface.serve import ServeSettings, serve
    except ImportError as exc:
        raise RuntimeError(f"pinsface serve needs the serve extra (pip install 'pinsface[serve]'): {exc}") from exc

    if args.workers != 1:
        raise ValueError(
            "--workers: only 1 is supported; one process holds the run's enrolled state and batches "
            "every request into shared detector/embedder batches"
        )
    settings = ServeSettings(
        api_key_file=args.api_key_file,
        auth=args.auth,
        max_upload_mb=args.max_upload_mb,
        max_request_mb=args.max_request_mb,
        max_files=args.max_files,
        max_pending=args.max_pending,
    )
    serve(
        args.run_dir, host=args.host, port=args.port, settings=settings, log_level="info" if args.verbose else "warning"
    )
    return 0


def _headline(m: dict) -> str:
    return (
        f"top-1 {m['top1']:.4f}  top-5 {m['top5']:.4f}  macro-F1 {m['macro_f1']:.4f}  "
        f"({m['n_images']} images, {m['n_no_face']} without a detected face, {m['n_unreadable']} unreadable)"
    )


def build_parser() -> argparse.ArgumentParser:
    from pinsface.models import MODELS

    parser = argparse.ArgumentParser(prog="pinsface", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    def mode_option(p):
        p.add_argument(
            "--mode",
            choices=("auto", "head", "gallery"),
            help="name faces with the head (checked by the gallery) or with the gallery alone "
            "(no head; default auto: gallery for large galleries)",
        )

    def engine_options(p):
        p.add_argument(
            "--engine",
            choices=("local", "ray"),
            default="local",
            help="where faces are detected and embedded: this process, or a Ray cluster (pinsface[ray])",
        )
        p.add_argument("--address", help="the Ray cluster to use (e.g. ray://head:10001); default: a local instance")

    def common(p, data=True):
        if data:
            p.add_argument(
                "data_dir",
                nargs="?",
                help="folder with one sub-folder per person "
                "(default: $PINSFACE_DATA, else ../shared/data/pins/105_classes_pins_dataset)",
            )
        p.add_argument("--cache", help="cache folder (default: $PINSFACE_CACHE or ~/.cache/pinsface)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.add_argument(
            "--min-face-fraction",
            type=_fraction,
            metavar="F",
            help="smallest face counted in a photo, as a share of its shorter side (default 0.03); a larger "
            "share is faster on large photos",
        )

    p = sub.add_parser("prepare", help="detect, align and cache every face of a dataset")
    common(p)
    p.add_argument("--batch-size", type=int, default=64, help="images per MTCNN batch")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    engine_options(p)
    p.set_defaults(func=_prepare)

    p = sub.add_parser("download", help="fetch the Pins dataset from Kaggle (needs credentials + kagglehub)")
    p.add_argument("--dest", help="where kagglehub stores it")
    p.set_defaults(func=_download)

    for name, func, help_text in (
        ("train", _train, "prepare if needed, then train a model into RUN_DIR"),
        ("run", _run, "prepare, train, then evaluate on the test split"),
    ):
        p = sub.add_parser(name, help=help_text)
        common(p)
        p.add_argument("--out", required=True, help="run folder to write")
        p.add_argument("--model", choices=MODELS, help="default: embedding")
        p.add_argument("--epochs", type=int, help="maximum epochs (early stopping usually ends sooner)")
        p.add_argument("--seed", type=int, help="split and training seed")
        p.add_argument(
            "--fine-tune",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="unfreeze the top backbone blocks after the head converges (default: off)",
        )
        p.add_argument(
            "--augment-views",
            type=int,
            metavar="N",
            help="random flip/zoom/rotation views per training face pushed through the backbone "
            "(embedding model; default 0: the mirror-image twin only)",
        )
        p.add_argument(
            "--target-far",
            type=float,
            metavar="RATE",
            help="false-accept rate the 'unknown' threshold is calibrated for (default 0.07)",
        )
        mode_option(p)
        engine_options(p)
        p.set_defaults(func=func)

    p = sub.add_parser("evaluate", help="score a trained run and write its report (RUN_DIR/report/)")
    p.add_argument("run_dir", help="a folder written by pinsface train or run")
    p.add_argument("--data", help="a labelled folder (one sub-folder per person) instead of the run's test split")
    p.add_argument("--out", help="report folder (default RUN_DIR/report)")
    p.add_argument("--compare", help="another run (e.g. the pixels-mlp baseline) to compare against")
    p.add_argument("--unknown", help="a folder of people the run was not trained on: open-set evaluation")
    mode_option(p)
    engine_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("predict", help="name the faces in photos (files, folders, globs)")
    p.add_argument("run_dir")
    p.add_argument("paths", nargs="+", help="image files, folders (recursive) or glob patterns")
    p.add_argument("--json", action="store_true", help="JSON Lines: one record per image with a faces list")
    p.add_argument("--annotate", metavar="OUT_DIR", help="write copies with boxes and names drawn")
    p.add_argument("--top-k", type=int, default=3, help="alternatives listed per face")
    p.add_argument(
        "--threshold",
        type=float,
        metavar="DISTANCE",
        help="override the calibrated distance threshold (lower: stricter; dlib's own is 0.6)",
    )
    p.add_argument("--min-probability", type=float, metavar="P", help="override the calibrated probability threshold")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    mode_option(p)
    p.set_defaults(func=_predict)

    p = sub.add_parser("enroll", help="add a person from a few photos, without retraining the network")
    p.add_argument("run_dir")
    p.add_argument("--name", required=True)
    p.add_argument("photos", nargs="+", help="photos, folders or globs of that person")
    mode_option(p)
    p.set_defaults(func=_enroll)

    p = sub.add_parser("forget", help="remove a person from a run")
    p.add_argument("run_dir")
    p.add_argument("--name", required=True)
    p.set_defaults(func=_forget)

    p = sub.add_parser("serve", help="a REST API and a web page over a run (needs the serve extra)")
    p.add_argument("run_dir")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key-file",
        metavar="PATH",
        help="file holding the API key; created (mode 0600) when missing (default: RUN_DIR/api_key)",
    )
    p.add_argument(
        "--auth",
        choices=("write", "all"),
        default="write",
        help="endpoints that need the key: those that change state (default) or every API endpoint",
    )
    p.add_argument("--max-upload-mb", type=float, default=10.0, metavar="N", help="cap per uploaded file")
    p.add_argument("--max-request-mb", type=float, default=50.0, metavar="N", help="cap per request")
    p.add_argument("--max-files", type=int, default=32, metavar="N", help="photos per request")
    p.add_argument(
        "--max-pending",
        type=int,
        default=256,
        metavar="N",
        help="images waiting or being named; past it requests get 503 with Retry-After",
    )
    p.add_argument("--workers", type=int, default=1, help="server processes (only 1 is supported)")
    p.set_defaults(func=_serve)
    from pinsface.cli_library import add_library_commands

    add_library_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None:  # the command itself, not a caller in Python: this process is ours alone
        # Importing pinsface loads TensorFlow and Keras, whose many objects live as long as the process. Frozen,
        # full garbage collections no longer walk them all, which they did several times a run.
        gc.collect()
        gc.freeze()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"pinsface: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
