"""The run folder: the only code that knows its layout.

A run folder holds what training wrote once (settings, split, history, the prepare summary, the training log,
checkpoints, the report) and the *state* that enrolment and forgetting change: the model, the labels and the
gallery. The state is saved as a new generation of files, and ``manifest.json``, replaced last, names the
current one. So a save killed at any point leaves the previous state whole, a reader never sees half a save,
and every file is written under a temporary name in the same folder and renamed into place.

Writers (training, enrolment, forgetting) hold a lock on the folder; a second writer waits for a bounded time,
then fails with "run folder is busy (pid N)".
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pinsface import __version__
from pinsface.dataset import Split
from pinsface.errors import BusyError, RunFolderError
from pinsface.files import atomic_write, remove_stale_temporaries
from pinsface.settings import VERSION_KEY, Settings

MANIFEST = "manifest.json"
CONFIG = "config.json"
SPLIT = "split.json"
HISTORY = "history.json"
PREPARE_SUMMARY = "prepare_summary.json"
TRAIN_LOG = "train.log"
LOCK = ".lock"
STATE_FILES = {
    "model": ("model", ".keras"),
    "labels": ("labels", ".json"),
    "gallery": ("gallery", ".npz"),
    "index": ("faces", ".faiss"),  # the gallery's FAISS index, for large galleries only (Gallery.index_to_save)
    "head": ("head", ".npz"),  # the head's output columns after enrolment by imprinting (pinsface.head)
    "delta": ("gallery-delta", ".npz"),  # one enrolment or forgetting, replayed on the gallery (GalleryChange)
}
# Changes replayed on a saved gallery before a save writes the whole gallery again.
MAX_DELTAS = 64
# How long a writer waits for another to finish; PINSFACE_LOCK_TIMEOUT overrides it.
LOCK_TIMEOUT_SECONDS = 120.0
# Runs saved before config.json recorded the version.
UNVERSIONED = "0.1.0"


log = logging.getLogger(__name__)


class RunError(RunFolderError):
    """A run folder that cannot be loaded as it is, with what is wrong and what to do."""


class RunBusy(BusyError):
    """Another process holds the run folder's lock."""


@dataclass
class RunState:
    """What enrolment and forgetting change: the labels, the model and (embedding runs) the gallery."""

    labels: list[str]
    model: object
    gallery: object | None
    generation: int
    head: object | None = None  # pinsface.head.ArrayHead: what names faces (None without a model)


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def sha256_of(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _read_saved(path: Path, read):
    """``read(path)``; a file that cannot be read as saved is a ``RunError`` (a missing one stays a
    ``FileNotFoundError``: a reader racing a writer's clean-up tries again)."""
    try:
        return read(path)
    except FileNotFoundError:
        raise
    except Exception as exc:  # a damaged npz can fail in many ways inside numpy or zipfile
        raise RunError(
            f"{path.name} is damaged ({type(exc).__name__}: {exc}); restore the folder or train the run again"
        ) from None


def _json_text(data) -> str:
    return json.dumps(data, indent=1, ensure_ascii=False) + "\n"


class Run:
    """One run folder. ``Run(path)`` reads and writes it; nothing else knows its file names."""

    def __init__(self, path: str | os.PathLike, lock_timeout: float | None = None):
        self.path = Path(path)
        if lock_timeout is None:
            lock_timeout = float(os.environ.get("PINSFACE_LOCK_TIMEOUT", LOCK_TIMEOUT_SECONDS))
        self.lock_timeout = lock_timeout
        self._lock = None

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    # Paths a caller may hand to others (the report goes to a folder, training logs to a file).
    @property
    def report_dir(self) -> Path:
        return self.path / "report"

    @property
    def log_path(self) -> Path:
        return self.path / TRAIN_LOG

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    def create(self) -> Run:
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    # --- locking -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, timeout: float | None = None) -> Iterator[Run]:
        """Hold the folder's writer lock (re-entrant within this object)."""
        from filelock import FileLock, Timeout

        self.path.mkdir(parents=True, exist_ok=True)
        if self._lock is None:
            self._lock = FileLock(self.path / LOCK)
        owner = self.path / (LOCK + ".pid")
        try:
            self._lock.acquire(timeout=self.lock_timeout if timeout is None else timeout)
        except Timeout:
            try:
                pid = owner.read_text(encoding="utf-8").strip() or "unknown"
            except OSError:
                pid = "unknown"
            raise RunBusy(
                f"run folder is busy (pid {pid}): {self.path} is being written by another process; "
                "try again when it has finished"
            ) from None
        try:
            if self._lock.lock_counter == 1:
                owner.write_text(str(os.getpid()), encoding="utf-8")
                remove_stale_temporaries(self.path, ".*.tmp*")
            yield self
        finally:
            self._lock.release()

    # --- what training writes once --------------------------------------------------------------------------
    def settings(self) -> Settings:
        path = self.path / CONFIG
        if not path.is_file():
            raise RunError(
                f"{self.path} is not a pinsface run folder: {CONFIG} is missing "
                "(train one with: pinsface train DATA --out RUN_DIR)"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RunError(f"{path} cannot be read ({exc}); train the run again") from None
        if not isinstance(data, dict):
            raise RunError(f"{path} does not hold a JSON object; train the run again")
        written_by = str(data.get(VERSION_KEY, UNVERSIONED))
        if _version_tuple(written_by)[:2] > _version_tuple(__version__)[:2]:
            raise RunError(
                f"{self.path} was written by pinsface {written_by}, newer than this pinsface "
                f"{__version__}: upgrade pinsface to use it"
            )
        try:
            return Settings.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise RunError(f"{path} holds settings this pinsface cannot use ({exc}); train the run again") from None

    def written_by(self) -> str:
        """The pinsface version that trained the run (``UNVERSIONED`` for runs from before versions were recorded)."""
        data = json.loads((self.path / CONFIG).read_text(encoding="utf-8"))
        return str(data.get(VERSION_KEY, UNVERSIONED))

    def save_settings(self, settings: Settings) -> None:
        atomic_write(self.path / CONFIG, _json_text({VERSION_KEY: __version__, **settings.to_dict()}))

    def split(self) -> Split:
        return Split.load(self.path / SPLIT)

    def save_split(self, split: Split) -> None:
        atomic_write(self.path / SPLIT, split.save)

    def history(self) -> dict:
        path = self.path / HISTORY
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def save_history(self, history: dict) -> None:
        atomic_write(self.path / HISTORY, _json_text(history))

    def prepare_summary(self) -> dict:
        path = self.path / PREPARE_SUMMARY
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def save_prepare_summary(self, summary: dict) -> None:
        atomic_write(self.path / PREPARE_SUMMARY, _json_text(summary))

    def start_log(self) -> None:
        self.log_path.write_text("", encoding="utf-8")

    def log(self, line: str) -> None:
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(line.rstrip("\n") + "\n")

    # --- the state: model, labels, gallery -------------------------------------------------------------------
    def manifest(self) -> dict | None:
        path = self.path / MANIFEST
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            int(manifest["generation"])
            dict(manifest["files"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RunError(f"{path} is damaged ({exc}); restore the folder or train the run again") from None
        return manifest

    def generation(self) -> int:
        """The generation of the saved state: 0 for runs saved before manifests."""
        manifest = self.manifest()
        return int(manifest["generation"]) if manifest else 0

    @staticmethod
    def state_names(generation: int) -> dict[str, str]:
        """File names of one generation: the first keeps the plain names (``model.keras`` ...)."""
        return {
            key: stem + (f".g{generation}" if generation > 1 else "") + suffix
            for key, (stem, suffix) in STATE_FILES.items()
        }

    def load_state(self, settings: Settings | None = None, model: bool = True) -> RunState:
        """The current labels, model and gallery, checked against each other and the manifest. A reader that
        races a writer's clean-up of old generations reads the new manifest and tries again."""
        for attempt in range(3):
            manifest = self.manifest()
            files = manifest["files"] if manifest else {**self.state_names(1), "head": None, "delta": None}
            try:
                return self._load_state(manifest, files, settings or self.settings(), model)
            except FileNotFoundError as exc:
                newer = self.manifest()
                if attempt == 2 or (newer or {}).get("generation") == (manifest or {}).get("generation"):
                    raise RunError(
                        f"{self.path}: {Path(exc.filename).name} is missing; restore the folder or train the run again"
                    ) from None
        raise AssertionError("unreachable")

    def _load_state(self, manifest: dict | None, files: dict, settings: Settings, load_model: bool) -> RunState:
        from pinsface.gallery import Gallery

        labels_path = self.path / files["labels"]
        try:
            labels = json.loads(labels_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as exc:
            raise RunError(f"{labels_path.name} is damaged ({exc}); restore the folder or train again") from None
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise RunError(f"{labels_path.name} must be a list of names")
        model = self._load_model(self.path / files["model"]) if load_model else None
        gallery = None
        if files.get("gallery"):
            gallery_path = self.path / files["gallery"]
            if gallery_path.exists() or settings.model == "embedding":
                gallery = _read_saved(gallery_path, Gallery.load)
        if gallery is not None and manifest and files.get("index"):
            self._use_saved_index(gallery, files["index"], manifest.get("index"))
        if gallery is not None:
            self._replay(gallery, (manifest or {}).get("deltas") or [])
        head = (
            self._load_head(model, files.get("head")) if model is not None and settings.model == "embedding" else None
        )
        self._check(manifest, labels, model, gallery, files, head)
        if gallery is not None and gallery.stale and model is not None:
            # Galleries saved before nearest-face distances hold thresholds for centroid distances.
            gallery.calibrate(model.get_layer("head"), settings.target_far)
        return RunState(labels, model, gallery, int(manifest["generation"]) if manifest else 0, head)

    def _replay(self, gallery, deltas: list[str]) -> None:
        """Apply the enrolments and forgettings saved since the gallery file was written, in order."""
        from pinsface.gallery import GalleryChange

        for name in deltas:
            gallery.apply(_read_saved(self.path / name, GalleryChange.load))

    def _load_head(self, model, name: str | None):
        """The head as arrays: the model's, with the output columns saved in ``name`` after imprinting."""
        from pinsface.head import ArrayHead

        head = ArrayHead.from_keras(model.get_layer("head"))
        if not name:
            return head
        path = self.path / name
        if not path.is_file():
            raise FileNotFoundError(2, "missing", str(path))

        def read(path):
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in ("kernel", "bias", "centre", "whiten") if k in data.files}

        arrays = _read_saved(path, read)
        kernel, bias, centre, whiten = (arrays.get(k) for k in ("kernel", "bias", "centre", "whiten"))
        if kernel is None:
            raise RunError(f"{name} holds no head columns; restore the folder")
        if kernel.ndim != 2 or kernel.shape[0] != head.kernel.shape[0]:
            raise RunError(f"{name} does not fit the model's head ({kernel.shape}); restore the folder")
        head = head.with_kernel(kernel, bias)
        if centre is None or whiten is None:
            return head
        if centre.shape != (kernel.shape[0],) or whiten.shape != (kernel.shape[0],) * 2:
            raise RunError(f"{name} does not fit the model's head (imprinting reference); restore the folder")
        return dataclasses.replace(head, centre=centre.astype(np.float32), whiten=whiten.astype(np.float32))

    @staticmethod
    def _save_head(path: Path, head) -> None:
        arrays = {"kernel": head.kernel}
        if head.bias is not None:
            arrays["bias"] = head.bias
        if head.centre is not None:
            arrays["centre"], arrays["whiten"] = head.centre, head.whiten
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)

    def _use_saved_index(self, gallery, name: str, entry) -> None:
        """Give the gallery its saved FAISS index, if the file is the one written (size and sha256 as the manifest
        records: FAISS's reader is not made to read hostile files) and holds the gallery's faces. Otherwise the
        gallery builds its index anew when first searched, as for runs saved without one."""
        path = self.path / name
        problem = None
        try:
            if not isinstance(entry, dict):
                problem = "is not described in manifest.json"
            elif not path.is_file():
                problem = "is missing"
            elif path.stat().st_size != entry.get("bytes"):
                problem = "is not the file that was saved (its size differs)"
            else:
                data = path.read_bytes()  # checked and read from one copy in memory
                if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
                    problem = "is not the file that was saved (its sha256 differs)"
                else:
                    gallery.use_saved_index(data, entry["validation"], source=str(path))
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            problem = f"cannot be used ({type(exc).__name__}: {exc})"
        if problem:
            log.warning("%s: %s %s; the index is rebuilt from the gallery's faces", self.path, name, problem)

    def _load_model(self, path: Path):
        import keras

        import pinsface.layers  # noqa: F401  (registers the custom layers for safe loading)

        if not path.is_file():
            raise FileNotFoundError(2, "missing", str(path))
        try:
            return keras.saving.load_model(path, safe_mode=True, compile=False)
        except Exception as exc:  # a truncated or edited archive fails inside zipfile, h5py or Keras
            raise RunError(
                f"{path.name} is damaged and cannot be loaded ({type(exc).__name__}: {exc}); "
                "restore the folder or train the run again"
            ) from None

    def _check(self, manifest: dict | None, labels: list[str], model, gallery, files: dict, head=None) -> None:
        """One clear error naming what disagrees, rather than an IndexError or a wrong name later."""
        problems = []
        outputs = head.n_classes if head is not None else int(model.output_shape[-1]) if model is not None else None
        # People enrolled in gallery mode have no output in the head (pinsface.scoring): the head then knows
        # the first identities only, as the manifest records.
        head_covers_all = not manifest or manifest.get("model_outputs") == manifest.get("labels")
        if outputs is not None and (outputs > len(labels) or (head_covers_all and outputs != len(labels))):
            problems.append(f"model has {outputs} outputs but {files['labels']} has {len(labels)} names")
        if gallery is not None and list(gallery.labels) != list(labels):
            problems.append(
                f"the gallery knows {len(gallery.labels)} identities but {files['labels']} has {len(labels)} names"
                if len(gallery.labels) != len(labels)
                else f"the gallery's names differ from {files['labels']}"
            )
        if manifest:
            if manifest.get("labels") != len(labels):
                problems.append(
                    f"manifest.json says {manifest.get('labels')} names but {files['labels']} has {len(labels)}"
                )
            if outputs is not None and manifest.get("model_outputs") != outputs:
                problems.append(
                    f"manifest.json says the model has {manifest.get('model_outputs')} outputs but "
                    f"{files['model']} has {outputs}"
                )
            if gallery is not None and manifest.get("gallery_faces") != gallery.size:
                problems.append(
                    f"manifest.json says the gallery holds {manifest.get('gallery_faces')} faces but "
                    f"{files['gallery']} holds {gallery.size}"
                )
        if problems:
            raise RunError(
                f"{self.path} is inconsistent: "
                + "; ".join(problems)
                + ". It was edited by hand or left half-saved by an older pinsface; restore it or train "
                "the run again"
            )

    def save_state(
        self, labels: list[str], model, gallery=None, model_changed: bool = True, head=None, change=None
    ) -> int:
        """Save a new generation of the state and return its number. Holds the lock while it writes.
        Without ``model_changed`` the new generation keeps the current model file. ``head`` (an ``ArrayHead``)
        saves the head's output columns beside it (enrolment by imprinting). ``change`` (a ``GalleryChange``
        that made ``gallery`` from the saved one): only that change is written, replayed on load, until
        ``MAX_DELTAS`` of them have piled up and the whole gallery is written again."""
        with self.lock():
            previous = self.manifest()
            generation = (int(previous["generation"]) if previous else 0) + 1
            names = self.state_names(generation)
            if not model_changed and previous:
                names["model"] = previous["files"]["model"]
            else:
                atomic_write(self.path / names["model"], lambda tmp: model.save(tmp))
            atomic_write(self.path / names["labels"], _json_text(list(labels)))
            if head is not None:
                atomic_write(self.path / names["head"], lambda tmp: self._save_head(tmp, head))
            else:
                names["head"] = None
            deltas = list((previous or {}).get("deltas") or [])
            index_entry = None
            if change is not None and previous and previous["files"].get("gallery") and len(deltas) < MAX_DELTAS:
                atomic_write(self.path / names["delta"], change.save)
                deltas.append(names["delta"])
                names["gallery"], names["index"] = previous["files"]["gallery"], previous["files"].get("index")
                index_entry = previous.get("index")
            else:
                deltas, index_entry = [], self._save_gallery(gallery, names)
            names["delta"] = None
            manifest = {
                "pinsface_version": __version__,
                "generation": generation,
                "files": names,
                "deltas": deltas,
                "labels": len(labels),
                "model_outputs": head.n_classes if head is not None else int(model.output_shape[-1]),
                "gallery_identities": len(gallery.labels) if gallery is not None else None,
                "gallery_faces": gallery.size if gallery is not None else None,
                "index": index_entry,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            atomic_write(self.path / MANIFEST, _json_text(manifest))
            in_use = {*names.values(), *deltas, *((previous or {}).get("files") or {}).values()}
            in_use.update((previous or {}).get("deltas") or [])
            self._remove_generations_before(generation - 1, in_use)
            return generation

    def _save_gallery(self, gallery, names: dict) -> dict | None:
        """Write the whole gallery (and its FAISS index, when worth saving) under ``names``; the index's entry."""
        if gallery is None:
            names["gallery"] = names["index"] = None
            return None
        atomic_write(self.path / names["gallery"], gallery.save)
        face_index = gallery.index_to_save()
        if face_index is None:
            names["index"] = None
            return None
        path = self.path / names["index"]
        atomic_write(path, face_index.write)
        return {
            "sha256": sha256_of(path),
            "bytes": path.stat().st_size,
            "faces": face_index.n,
            "validation": list(face_index.validation),
        }

    def _remove_generations_before(self, keep_from: int, in_use: set) -> None:
        """Old generations' files, except those ``in_use``: the current and previous manifests' (the previous
        stays for readers that loaded its manifest a moment ago)."""
        for generation in range(1, keep_from):
            for name in self.state_names(generation).values():
                if name not in in_use:
                    (self.path / name).unlink(missing_ok=True)
