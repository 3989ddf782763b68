"""The ``pinsface`` command: a thin layer over the Python API.

Exit codes: 0 done, 1 an error at run time (a bad file, a missing folder, a busy run), 2 a usage error (an
unknown option, an invalid setting), 130 interrupted with Ctrl-C.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys

from pinsface import __version__

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _progress(args) -> bool:
    from pinsface.console import show_progress

    return show_progress(getattr(args, "no_progress", False))


def _print_json(value) -> None:
    print(json.dumps(value, ensure_ascii=False, default=str))


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
        progress=_progress(args),
        engine=args.engine,
        address=args.address,
        embed=embed,
    )
    if args.json:
        _print_json(result.summary)
    else:
        print(format_summary(result.summary))
    return EXIT_OK


def _download(args) -> int:
    from pinsface.dataset import download_dataset

    path = download_dataset(args.dest)
    if args.json:
        _print_json({"path": str(path)})
    else:
        print(path)
    return EXIT_OK


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def _face_settings(args, base=None):
    from pinsface.settings import FaceSettings

    base = base or FaceSettings()
    if args.min_face_fraction is None:
        return base
    import dataclasses

    return dataclasses.replace(base, min_face_fraction=args.min_face_fraction)


def _config(args):
    """The settings of ``--config FILE`` (a run's config.json, or one written in that form), else the defaults."""
    from pinsface.settings import Settings

    return Settings.load(args.config) if getattr(args, "config", None) else Settings()


def _settings_from(args):
    import dataclasses

    base = _config(args)
    keys = ("model", "epochs", "seed", "augment_views", "target_far", "fine_tune", "mode")
    values = {key: getattr(args, key) for key in keys if getattr(args, key, None) is not None}
    return dataclasses.replace(base, faces=_face_settings(args, base.faces), **values)


def _pipeline_options(args, settings) -> dict:
    # A --config file names the data and cache it was trained with: used where the command line names none.
    return {
        "data_dir": args.data_dir or settings.data_dir or None,
        "cache_dir": args.cache or settings.cache_dir or None,
        "progress": _progress(args),
        "engine": args.engine,
        "address": args.address,
    }


def _train(args) -> int:
    from pinsface.pipeline import train

    settings = _settings_from(args)
    result = train(out_dir=args.out, settings=settings, **_pipeline_options(args, settings))
    if args.json:
        _print_json(result)
    else:
        print(f"saved {args.out}: validation top-1 {result['val_top1']:.4f}")
    return EXIT_OK


def _run(args) -> int:
    from pinsface.pipeline import run

    settings = _settings_from(args)
    report = run(out_dir=args.out, settings=settings, **_pipeline_options(args, settings))
    if args.json:
        _print_json(report)
        return EXIT_OK
    print(f"test split: {_headline(report)}")
    print(f"report: {os.path.join(args.out, 'report', 'report.html')}")
    return EXIT_OK


def _evaluate(args) -> int:
    from pinsface.evaluate import evaluate, evaluate_open_set

    where = {"progress": _progress(args), "mode": args.mode, "engine": args.engine, "address": args.address}
    metrics = evaluate(args.run_dir, data=args.data, out=args.out, compare=args.compare, **where)
    open_set = evaluate_open_set(args.run_dir, args.unknown, out=args.out, **where) if args.unknown else None
    if args.json:
        _print_json({**metrics, "open_set": open_set})
        return EXIT_OK
    print(_headline(metrics))
    if open_set:
        o = open_set
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
    return EXIT_OK


def _inputs(paths: list[str]) -> list[str]:
    from pinsface.errors import DataNotFoundError
    from pinsface.predict import expand_inputs

    files = expand_inputs(paths)
    if not files:
        raise DataNotFoundError(f"no images found in {' '.join(paths)}")
    return files


def _failed_exit(n_failed: int, n_total: int, strict: bool) -> int:
    """1 when every input failed, or any did with --strict; else 0. The failures themselves are in the output."""
    if n_failed and (strict or n_failed == n_total):
        print(f"pinsface: {n_failed} of {n_total} input(s) could not be used", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def _predict(args) -> int:
    from pinsface.predict import Recognizer, format_table

    recognizer = Recognizer.load(args.run_dir, mode=args.mode)
    files = _inputs(args.paths)
    results = recognizer.identify_many(
        files,
        batch_size=args.batch_size,
        top_k=args.top_k,
        threshold=args.threshold,
        min_probability=args.min_probability,
        progress=_progress(args),
    )
    if args.json:
        for r in results:
            _print_json(r.to_dict())
    else:
        print(format_table(results))
    if args.annotate:
        _annotate(results, args.annotate)
    return _failed_exit(sum(r.error is not None for r in results), len(results), args.strict)


def _annotate(results, out_dir: str) -> None:
    from pathlib import Path

    from pinsface.images import load_image
    from pinsface.predict import annotate

    used: set[str] = set()
    for r in results:
        if r.error:
            continue
        stem = Path(r.source).stem
        name = stem if stem not in used else f"{stem}_{len(used)}"
        used.add(name)
        annotate(load_image(r.source), r.faces, Path(out_dir) / f"{name}.jpg")


def _describe(args) -> int:
    import pinsface
    from pinsface.errors import BadImage

    files = _inputs(args.paths)
    failed = 0
    for path in files:
        try:
            faces = pinsface.describe(path) if args.descriptors else pinsface.detect(path)
            record = {"source": path, "faces": [f.to_dict() for f in faces]}
        except BadImage as exc:
            failed += 1
            record = {"source": path, "faces": [], "error": exc.reason}
        if args.json:
            _print_json(record)
        else:
            _print_described(record)
    return _failed_exit(failed, len(files), args.strict)


def _print_described(record: dict) -> None:
    if "error" in record:
        print(f"{record['source']}: {record['error']}")
        return
    print(f"{record['source']}: {len(record['faces'])} face(s)")
    for face in record["faces"]:
        x, y, w, h = face["box"]
        subject = "  subject" if face["subject"] else ""
        print(f"  box x={x:.0f} y={y:.0f} w={w:.0f} h={h:.0f}  score {face['score']:.3f}{subject}")


def _verify(args) -> int:
    import pinsface

    result = pinsface.verify(args.image_a, args.image_b, threshold=args.threshold)
    if args.json:
        _print_json({"a": args.image_a, "b": args.image_b, **result.to_dict()})
    else:
        verdict = "same person" if result.same else "different people"
        print(f"{verdict}: distance {result.distance:.4f} (threshold {result.threshold:.4f})")
    return EXIT_OK


def _enroll(args) -> int:
    from pinsface.predict import Recognizer, expand_inputs

    recognizer = Recognizer.load(args.run_dir, mode=args.mode)
    summary = recognizer.enroll(args.name, expand_inputs(args.photos))
    if args.json:
        _print_json(summary)
        return EXIT_OK
    print(
        f"enrolled {summary['identity']!r} from {summary['faces_used']} face(s) of {summary['photos']} photo(s); "
        f"{summary['identities']} identities known; thresholds: probability >= "
        f"{recognizer.gallery.threshold_probability:.3f}, distance <= {recognizer.gallery.threshold_distance:.3f}"
    )
    for s in summary["skipped"]:
        print(f"  skipped {s['source']}: {s['reason']}")
    for d in summary["duplicates"]:
        print(f"  already enrolled as {d['identity']!r}: {d['source']}")
    for w in summary["warnings"]:
        print(f"  warning: {w['message']}")
    return EXIT_OK


def _refit(args) -> int:
    from pinsface.predict import Recognizer

    recognizer = Recognizer.load(args.run_dir, mode="head")
    summary = recognizer.refit(epochs=args.epochs)
    if args.json:
        _print_json(summary)
        return EXIT_OK
    print(
        f"refitted the head on {summary['identities']} identities; thresholds: probability >= "
        f"{recognizer.gallery.threshold_probability:.3f}, distance <= {recognizer.gallery.threshold_distance:.3f}"
    )
    return EXIT_OK


def _forget(args) -> int:
    from pinsface.predict import Recognizer

    recognizer = Recognizer.load(args.run_dir)
    summary = recognizer.forget(args.name)
    if args.json:
        _print_json(summary)
    else:
        print(f"forgot {summary['identity']!r}; {summary['identities']} identities known")
    return EXIT_OK


def _serve(args) -> int:
    try:
        from pinsface.serve import ServeSettings, serve
    except ImportError as exc:
        raise RuntimeError(f"pinsface serve needs the serve extra (pip install 'pinsface[serve]'): {exc}") from exc

    settings = ServeSettings(
        api_key_file=args.api_key_file,
        auth="write" if args.public_read else args.auth,
        allowed_hosts=tuple(args.allowed_host or ()),
        max_upload_mb=args.max_upload_mb,
        max_request_mb=args.max_request_mb,
        max_files=args.max_files,
        max_pending=args.max_pending,
    )
    serve(
        args.run_dir,
        host=args.host,
        port=args.port,
        settings=settings,
        log_level="info" if args.verbose else "warning",
        db=args.db,
    )
    return EXIT_OK


def _headline(m: dict) -> str:
    return (
        f"top-1 {m['top1']:.4f}  top-5 {m['top5']:.4f}  macro-F1 {m['macro_f1']:.4f}  "
        f"({m['n_images']} images, {m['n_no_face']} without a detected face, {m['n_unreadable']} unreadable)"
    )


# --- the parser: one function per group of commands ------------------------------------------------------------


def _globals() -> argparse.ArgumentParser:
    """Options every command takes, before or after its name: ``pinsface -v predict`` = ``pinsface predict -v``."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log more")
    return parent


def _json_option(p, what: str = "print the result as JSON") -> None:
    p.add_argument("--json", action="store_true", help=what)


def _mode_option(p) -> None:
    from pinsface.settings import MODES

    p.add_argument(
        "--mode",
        choices=MODES,
        help="name faces with the head (checked by the gallery) or with the gallery alone "
        "(no head; default auto: gallery for large galleries)",
    )


def _engine_options(p) -> None:
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="where faces are detected and embedded: this process, or a Ray cluster (pinsface[ray])",
    )
    p.add_argument("--address", help="the Ray cluster to use (e.g. ray://head:10001); default: a local instance")


def _progress_option(p) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they are shown only on a terminal)")


def _data_options(p) -> None:
    p.add_argument(
        "data_dir",
        nargs="?",
        help="folder with one sub-folder per person "
        "(default: $PINSFACE_DATA, else ../shared/data/pins/105_classes_pins_dataset)",
    )
    p.add_argument("--cache", help="cache folder (default: $PINSFACE_CACHE or ~/.cache/pinsface)")
    _progress_option(p)
    p.add_argument(
        "--min-face-fraction",
        type=_fraction,
        metavar="F",
        help="smallest face counted in a photo, as a share of its shorter side (default 0.03); a larger "
        "share is faster on large photos",
    )


def _add_dataset_commands(sub, parents) -> None:
    p = sub.add_parser("prepare", parents=parents, help="detect, align and cache every face of a dataset")
    _data_options(p)
    p.add_argument("--batch-size", type=int, default=64, help="images per MTCNN batch")
    _json_option(p, "print the summary as one JSON object")
    _engine_options(p)
    p.set_defaults(func=_prepare, keeps_cache=True)

    p = sub.add_parser("download", parents=parents, help="fetch the Pins dataset from Kaggle (credentials, kagglehub)")
    p.add_argument("--dest", help="where kagglehub stores it")
    _json_option(p)
    p.set_defaults(func=_download)


def _add_training_commands(sub, parents) -> None:
    from pinsface.settings import MODELS

    for name, func, help_text in (
        ("train", _train, "prepare if needed, then train a model into a run folder"),
        ("run", _run, "prepare, train, then evaluate on the test split"),
    ):
        p = sub.add_parser(name, parents=parents, help=help_text)
        _data_options(p)
        p.add_argument("--out", required=True, help="run folder to write")
        p.add_argument(
            "--config",
            metavar="FILE",
            help="settings to start from: a run's config.json (options given here override it)",
        )
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
        _json_option(p)
        _mode_option(p)
        _engine_options(p)
        p.set_defaults(func=func, keeps_cache=True)

    p = sub.add_parser("evaluate", parents=parents, help="score a trained run and write its report (RUN_DIR/report/)")
    p.add_argument("run_dir", help="a folder written by pinsface train or run")
    p.add_argument("--data", help="a labelled folder (one sub-folder per person) instead of the run's test split")
    p.add_argument("--out", help="report folder (default RUN_DIR/report)")
    p.add_argument("--compare", help="another run (e.g. the pixels-mlp baseline) to compare against")
    p.add_argument("--unknown", help="a folder of people the run was not trained on: open-set evaluation")
    _json_option(p)
    _mode_option(p)
    _engine_options(p)
    _progress_option(p)
    p.set_defaults(func=_evaluate, keeps_cache=True)


def _add_face_commands(sub, parents) -> None:
    p = sub.add_parser("describe", parents=parents, help="find every face in photos, with its 128-d descriptor")
    p.add_argument("paths", nargs="+", help="image files, folders (recursive) or glob patterns")
    p.add_argument(
        "--no-descriptors",
        dest="descriptors",
        action="store_false",
        help="boxes, landmarks and scores only (faster: the embedding network is not loaded)",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 when any input could not be used")
    _json_option(p, "JSON Lines: one record per image, with a faces list (and an error for a file that failed)")
    p.set_defaults(func=_describe)

    p = sub.add_parser("verify", parents=parents, help="whether two photos show the same person")
    p.add_argument("image_a")
    p.add_argument("image_b")
    p.add_argument("--threshold", type=float, metavar="DISTANCE", help="largest distance called the same person")
    _json_option(p)
    p.set_defaults(func=_verify)

    p = sub.add_parser("predict", parents=parents, help="name the faces in photos (files, folders, globs)")
    p.add_argument("run_dir")
    p.add_argument("paths", nargs="+", help="image files, folders (recursive) or glob patterns")
    _json_option(p, "JSON Lines: one record per image with a faces list")
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
    p.add_argument("--strict", action="store_true", help="exit 1 when any input could not be used")
    _progress_option(p)
    _mode_option(p)
    p.set_defaults(func=_predict)


def _add_people_commands(sub, parents) -> None:
    p = sub.add_parser("enroll", parents=parents, help="add a person from a few photos, without retraining")
    p.add_argument("run_dir")
    p.add_argument("--name", required=True)
    p.add_argument("photos", nargs="+", help="photos, folders or globs of that person")
    _json_option(p)
    _mode_option(p)
    p.set_defaults(func=_enroll)

    p = sub.add_parser("forget", parents=parents, help="remove a person from a run")
    p.add_argument("run_dir")
    p.add_argument("--name", required=True)
    _json_option(p)
    p.set_defaults(func=_forget)

    p = sub.add_parser(
        "refit",
        parents=parents,
        help="retrain the head on every enrolled face and recalibrate (enrolment itself trains nothing)",
    )
    p.add_argument("run_dir")
    p.add_argument("--epochs", type=int, default=30, help="epochs of the output layer's training")
    _json_option(p)
    p.set_defaults(func=_refit)


def _add_serve_command(sub, parents) -> None:
    p = sub.add_parser("serve", parents=parents, help="a REST API and a web page over a run (needs the serve extra)")
    p.add_argument("run_dir")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key-file",
        metavar="PATH",
        help="file holding the API key; created (mode 0600) when missing (default: ~/.config/pinsface/api_key, "
        "outside the run folder)",
    )
    p.add_argument(
        "--auth",
        choices=("write", "all"),
        default="all",
        help="endpoints that need the key: every API endpoint (default) or those that change state",
    )
    p.add_argument(
        "--public-read",
        action="store_true",
        help="naming faces, listing people, health and metrics need no key (the same as --auth write)",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        metavar="NAME",
        help="a host name requests may use besides localhost and the bound address (repeatable)",
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
    p.add_argument(
        "--db",
        help="a photo library database (SQLite file or postgresql://...): the page gets its People view, and "
        "forgetting a person erases them from it too",
    )
    p.set_defaults(func=_serve)


def build_parser() -> argparse.ArgumentParser:
    parents = [_globals()]
    parser = argparse.ArgumentParser(
        prog="pinsface",
        description="Offline face identification: find, describe and name faces; train on folders of people.",
        epilog="Exit codes: 0 done, 1 error, 2 usage error, 130 interrupted. Docs: docs/cli.md",
        parents=parents,
    )
    parser.add_argument("--version", action="version", version=f"pinsface {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_face_commands(sub, parents)
    _add_dataset_commands(sub, parents)
    _add_training_commands(sub, parents)
    _add_people_commands(sub, parents)
    _add_serve_command(sub, parents)
    from pinsface.cli_library import add_library_commands

    add_library_commands(sub, parents)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help, --version (0) or a usage error (2)
        return int(exc.code or 0)
    args.verbose = getattr(args, "verbose", False)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if argv is None:  # the command itself, not a caller in Python: this process is ours alone
        # TensorFlow's and Keras's many objects live as long as the process: frozen, full garbage collections
        # no longer walk them all.
        gc.collect()
        gc.freeze()
    return _call(args)


def _call(args) -> int:
    from pinsface.errors import PinsfaceError, SettingsError

    try:
        return args.func(args)
    except KeyboardInterrupt:
        kept = (
            "; the face cache keeps every batch finished before the interrupt, and the next run starts from there"
            if getattr(args, "keeps_cache", False)
            else ""
        )
        print(f"pinsface: interrupted{kept}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SettingsError as exc:
        print(f"pinsface: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (PinsfaceError, OSError, RuntimeError, ValueError) as exc:
        print(f"pinsface: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
