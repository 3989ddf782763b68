"""The photo library's commands: ``index``, ``cluster``, ``name``, ``find``, ``people``, ``train --db`` and
``forget --db``.

``add_library_commands`` adds them to ``pinsface``'s parser (``cli.build_parser``)."""

from __future__ import annotations

import json
import sys


def _box(face: dict) -> list[float]:
    x1, y1, x2, y2 = face["box"]
    return [round(x1, 1), round(y1, 1), round(x2 - x1, 1), round(y2 - y1, 1)]


def _index(args) -> int:
    from pinsface.console import show_progress
    from pinsface.library_index import index_library
    from pinsface.settings import Settings

    settings = Settings(cache_dir=args.cache or "")
    summary = index_library(
        args.library,
        args.db,
        run_dir=args.run,
        engine=args.engine,
        settings=settings,
        progress=show_progress(args.json),
        chunk=args.chunk,
    )
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"{summary['photos']} photos: {summary['read']} read, {summary['unchanged']} unchanged, "
            f"{summary['gone']} gone; {summary['faces_added']} faces added ({summary['named']} named by the run), "
            f"{summary['faces_in_library']} in the library; {summary['seconds']:.1f} s"
        )
        for reason, count in sorted(summary["skipped"].items()):
            print(f"  skipped {count}: {reason}")
        if summary["made_stale"]:
            print(
                f"  {summary['made_stale']} faces were described otherwise (an older pinsface, another run or chip "
                "framing): their photos were read again to describe them as now"
            )
    return 0


def _cluster(args) -> int:
    from pinsface.library_cluster import cluster_library
    from pinsface.library_db import LibraryDB

    with LibraryDB.open(args.db) as db:
        summary = cluster_library(db)
        faces = db.face_list() if args.json else []
    if args.json:
        for f in faces:
            print(json.dumps({"source": f["source"], "box": _box(f), "cluster": f["cluster"], "person": f["person"]}))
    else:
        print(
            f"{summary['faces']} faces: {summary['new_faces']} new, {summary['joined_existing']} joined existing "
            f"clusters, {summary['new_clusters']} new clusters; {summary['clusters']} clusters in all"
        )
    if summary["stale_left"]:
        print(
            f"{summary['stale_left']} faces were left out: their descriptors were made otherwise (an older "
            "pinsface, another run or chip framing); run `pinsface index` on the library to describe them again",
            file=sys.stderr,
        )
    return 0


def _name(args) -> int:
    from pinsface.library_db import LibraryDB

    words = list(args.words)
    args.cluster = args.name = None
    if args.split is None and args.unassign is None and words:
        try:
            args.cluster = int(words.pop(0))
        except ValueError as exc:
            raise ValueError(f"CLUSTER must be a cluster number, not {exc}") from exc
    if len(words) > 1:
        raise ValueError("give one name (quote a name with spaces)")
    args.name = words[0] if words else None
    with LibraryDB.open(args.db) as db:
        if args.unassign is not None:
            db.unassign(args.unassign)
            print(f"face {args.unassign} unassigned")
            return 0
        if args.split is not None:
            cid = db.split_face(args.split, args.name)
            print(f"face {args.split} is now cluster {cid}" + (f", {args.name!r}" if args.name else ""))
            return 0
        if args.cluster is None:
            raise ValueError("give a CLUSTER (or --split FACE / --unassign FACE)")
        for other in args.merge or []:
            db.merge_clusters(args.cluster, other)
        if args.name:
            db.name_cluster(args.cluster, args.name)
        faces = db.face_list(cluster=args.cluster)
        print(f"cluster {args.cluster}: {len(faces)} faces" + (f", named {args.name!r}" if args.name else ""))
        if args.run and args.name:
            _enrol(args.run, args.name, faces)
    return 0


def _enrol(run_dir, name: str, faces: list[dict]) -> None:
    """Enrol a named cluster's faces into a run: each cut again from its photo and embedded by the run."""
    from pinsface.library_export import enrol_chips, face_chips
    from pinsface.predict import Recognizer

    recognizer = Recognizer.load(run_dir)
    chips, hashes, skipped = face_chips(faces, recognizer.face_settings)
    for s in skipped:
        print(f"  skipped {s['source']}: {s['reason']}")
    summary = enrol_chips(recognizer, name, chips, hashes)
    if not summary["faces_used"]:
        print(f"every face of {name!r} is enrolled in {run_dir} already")
    else:
        print(f"enrolled {summary['identity']!r} into {run_dir} from {summary['faces_used']} face(s)")


def _find(args) -> int:
    from pinsface.library_db import LibraryDB

    with LibraryDB.open(args.db) as db:
        photos = db.find_photos([args.name, *(args.with_ or [])])
    hits = [
        {"source": p["source"], "faces": [{"person": f["person"], "box": _box(f)} for f in p["faces"]]} for p in photos
    ]
    for hit in hits:
        if args.json:
            print(json.dumps(hit))
        else:
            print(hit["source"] + "  " + "  ".join(f"{f['person']} {f['box']}" for f in hit["faces"]))
    if not args.json:
        print(f"{len(hits)} photo(s)")
    return 0


def _people(args) -> int:
    from pinsface.library_db import LibraryDB
    from pinsface.library_sheet import write_sheet

    with LibraryDB.open(args.db) as db:
        faces = db.face_list()
    out = write_sheet(faces, args.html, per_row=args.per_row)
    print(f"wrote {out}")
    return 0


def _forget_with_db(forget):
    def run(args) -> int:
        if args.db:
            from pinsface.library_db import LibraryDB

            with LibraryDB.open(args.db) as db:
                n = db.forget_person(args.name)
            print(f"removed {args.name!r} from the library: {n} face descriptor(s) erased")
        return forget(args) if args.run_dir else 0

    return run


def _train_with_db(train):
    def run(args) -> int:
        if args.db:
            from pinsface.library_db import LibraryDB
            from pinsface.library_export import export_named_faces

            if args.data_dir:
                raise ValueError("give a data folder or --db, not both")
            args.data_dir = str(args.out).rstrip("/\\") + ".faces"
            with LibraryDB.open(args.db) as db:
                counts = export_named_faces(db.face_list(), args.data_dir)
            print(f"{len(counts)} named people, {sum(counts.values())} faces, as a dataset in {args.data_dir}")
        return train(args)

    return run


def _extend(sub, command: str, help_text: str, wrap) -> None:
    """Add ``--db`` to an existing command, its positional folder made optional, its handler wrapped."""
    p = sub.choices.get(command)
    if p is None:
        return
    p.add_argument("--db", help=help_text)
    for action in p._actions:
        if action.dest in ("run_dir", "data_dir"):
            action.nargs = "?"
    p.set_defaults(func=wrap(p.get_default("func")))


def add_library_commands(sub, parents=()) -> None:
    """Add the library commands to ``pinsface``'s subparsers, and ``--db`` to ``forget``."""
    db_help = "library database: a SQLite file, or postgresql://user@host/db"
    p = sub.add_parser(
        "index", parents=list(parents), help="find every face of every photo under a folder, into a library database"
    )
    p.add_argument("library", help="folder of photos (searched recursively)")
    p.add_argument("--db", required=True, help=db_help)
    p.add_argument("--run", help="a trained run: name the faces it knows (others stay unknown)")
    p.add_argument("--engine", choices=("local", "ray"), default="local", help="detect here or on a Ray cluster")
    p.add_argument("--cache", help="cache folder (default: $PINSFACE_CACHE or ~/.cache/pinsface)")
    p.add_argument("--chunk", type=int, default=128, metavar="N", help="photos detected and stored together")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_index)

    p = sub.add_parser(
        "cluster", parents=list(parents), help="group the library's unnamed faces by person (incremental)"
    )
    p.add_argument("--db", required=True, help=db_help)
    p.add_argument("--json", action="store_true", help="one JSON line per face: source, box, cluster, person")
    p.set_defaults(func=_cluster)

    p = sub.add_parser(
        "name", parents=list(parents), help="name a cluster; merge clusters, split off or unassign a face"
    )
    p.add_argument(
        "words",
        nargs="*",
        metavar="[CLUSTER] [NAME]",
        help="the cluster (see cluster --json / people) and the person's name; with --split, only the name",
    )
    p.add_argument("--db", required=True, help=db_help)
    p.add_argument("--merge", type=int, nargs="+", metavar="CLUSTER", help="move these clusters' faces into it")
    p.add_argument("--split", type=int, metavar="FACE", help="take this face out into a cluster of its own")
    p.add_argument("--unassign", type=int, metavar="FACE", help="take this face out of its cluster and name")
    p.add_argument("--run", help="also enrol the named faces into this run")
    p.set_defaults(func=_name)

    p = sub.add_parser("find", parents=list(parents), help="the photos of a person (and others) in the library")
    p.add_argument("name")
    p.add_argument("--db", required=True, help=db_help)
    p.add_argument("--with", dest="with_", action="append", metavar="NAME", help="only photos with this person too")
    p.add_argument("--json", action="store_true", help="one JSON line per photo")
    p.set_defaults(func=_find)

    p = sub.add_parser(
        "people", parents=list(parents), help="a contact sheet of the library's people and clusters (HTML)"
    )
    p.add_argument("--db", required=True, help=db_help)
    p.add_argument("--html", required=True, help="the HTML file to write (self-contained)")
    p.add_argument("--per-row", type=int, default=12, help="thumbnails shown per person or cluster")
    p.set_defaults(func=_people)

    _extend(sub, "forget", "also erase the person's faces from this library database", _forget_with_db)
    _extend(sub, "train", "train from the people named in this library database", _train_with_db)
