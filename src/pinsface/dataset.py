"""Find a folder-per-person photo collection, list its images and split them deterministically."""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pinsface.errors import DataNotFoundError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".pgm", ".ppm"}
KAGGLE_DATASET = "hereisburak/pins-face-recognition"
PINS_FOLDER = "105_classes_pins_dataset"
SPLITS = ("train", "val", "test")


def default_data_dir() -> Path:
    """``$PINSFACE_DATA``, else the shared Pins copy beside the checkout, else a helpful error."""
    env = os.environ.get("PINSFACE_DATA")
    if env:
        return resolve_data_dir(env)
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = base.parent / "shared" / "data" / "pins" / PINS_FOLDER
        if candidate.is_dir():
            return candidate
    raise DataNotFoundError(
        "No dataset given. Point pinsface at a folder with one sub-folder of photos per person:\n"
        "  pinsface prepare /path/to/105_classes_pins_dataset   (or set PINSFACE_DATA)\n"
        f"or download the Kaggle dataset '{KAGGLE_DATASET}': with Kaggle credentials and kagglehub installed,\n"
        "  pinsface download\n"
        f"or by hand from https://www.kaggle.com/datasets/{KAGGLE_DATASET}"
    )


def resolve_data_dir(path: str | os.PathLike) -> Path:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataNotFoundError(
            f"dataset folder not found: {root}\n"
            f"Give a folder with one sub-folder per person, or download '{KAGGLE_DATASET}' from Kaggle "
            "(pinsface download)."
        )
    # Accept the Kaggle archive's outer folder too.
    inner = root / PINS_FOLDER
    return inner if inner.is_dir() else root


def download_dataset(dest: str | os.PathLike | None = None) -> Path:
    """Fetch the Pins dataset from Kaggle with kagglehub (needs the user's Kaggle credentials)."""
    try:
        import kagglehub
    except ImportError:
        raise RuntimeError(
            "pinsface download needs kagglehub: pip install kagglehub, and Kaggle credentials in "
            "~/.kaggle/kaggle.json or KAGGLE_USERNAME/KAGGLE_KEY. Or download "
            f"https://www.kaggle.com/datasets/{KAGGLE_DATASET} by hand and pass its folder."
        ) from None
    has_credentials = (Path.home() / ".kaggle" / "kaggle.json").is_file() or (
        os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY")
    )
    if not has_credentials:
        raise RuntimeError(
            "no Kaggle credentials: put kaggle.json in ~/.kaggle/ or set KAGGLE_USERNAME and KAGGLE_KEY, "
            f"or download https://www.kaggle.com/datasets/{KAGGLE_DATASET} by hand and pass its folder."
        )
    if dest:
        os.environ["KAGGLEHUB_CACHE"] = str(Path(dest).expanduser())
    return resolve_data_dir(kagglehub.dataset_download(KAGGLE_DATASET))


def identity_from_folder(folder_name: str) -> str:
    """'pins_Adriana Lima' -> 'Adriana Lima'; other names are kept as they are."""
    if folder_name.lower().startswith("pins_"):
        return folder_name[5:]
    return folder_name


def identity_key(name: str) -> str:
    """How identity names are matched across folders, the CLI and the server: case-insensitive, and with
    underscores, spaces and runs of them alike ('Richard_Gere' is 'richard gere'). Names are shown as given."""
    return " ".join(name.replace("_", " ").casefold().split())


MAX_NAME_LENGTH = 100


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be an identity (a folder name, ``enroll --name`` or a name in the server's URL),
    or None when it can. The one rule for identity names."""
    if not name or not name.strip():
        return "the name is empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"the name is longer than {MAX_NAME_LENGTH} characters"
    if not name.strip(". "):
        return "the name is only dots"
    if "/" in name or "\\" in name:
        return "the name holds a slash"
    return text_problem(name)


def text_problem(text: str) -> str | None:
    """Why ``text`` (a name or a path) would break a terminal, JSON or CSV downstream, or None."""
    if text.isascii() and text.isprintable():  # the common case, without a look at every character
        return None
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in text) or "\ufffd" in text:
        return "the name is not valid UTF-8"
    if any(unicodedata.category(ch).startswith("C") or unicodedata.category(ch) in ("Zl", "Zp") for ch in text):
        return "the name holds control characters"
    return None


def check_identity_name(name: str) -> str:
    """``name`` if it can be an identity, else ValueError saying why (shown escaped, as the terminal should)."""
    problem = name_problem(name)
    if problem:
        raise ValueError(f"identity name {printable(name)}: {problem}")
    return name


def printable(text: str) -> str:
    """``text`` for a terminal or log: control characters and undecodable bytes escaped, quoted."""
    safe = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return repr(safe)


def spreadsheet_safe(text: str) -> str:
    """A CSV cell a spreadsheet shows as text: one starting like a formula (= + - @, tab, CR) gets a quote."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def check_trainable(dataset: Dataset) -> Dataset:
    """Refuse, before any work, a dataset that cannot train an identifier: it needs two people or more."""
    if len(dataset.identities) < 2:
        found = ", ".join(printable(name) for name in dataset.identities) or "none"
        raise ValueError(
            f"{dataset.root} holds {len(dataset.identities)} identity with images ({found}): training needs at "
            "least 2, one sub-folder of photos per person. To add one person to a trained run, use "
            "`pinsface enroll`."
        )
    return dataset


@dataclass(frozen=True)
class ImageItem:
    rel: str  # path relative to the dataset root, POSIX separators
    identity: str
    # The file's content hash (cache.content_hash) where the caller has just read it (index), so prepare does
    # not read and hash the file again; None: prepare hashes it.
    digest: str | None = None


@dataclass
class Dataset:
    root: Path
    items: list[ImageItem]
    identities: list[str]
    ignored: Counter = field(default_factory=Counter)  # reason -> count
    ignored_files: list[tuple[str, str]] = field(default_factory=list)
    empty_folders: list[str] = field(default_factory=list)

    def path(self, item: ImageItem) -> Path:
        return self.root / item.rel

    def counts(self) -> Counter:
        return Counter(item.identity for item in self.items)


def scan_dataset(root: str | os.PathLike) -> Dataset:
    """List every image under ``root/<person>/``, ignoring (and counting) hidden and non-image files."""
    root = resolve_data_dir(root)
    items: list[ImageItem] = []
    ignored: Counter = Counter()
    ignored_files: list[tuple[str, str]] = []
    empty: list[str] = []
    identities: list[str] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        identity = identity_from_folder(folder.name)
        bad_folder = name_problem(identity)
        found = 0
        prefix = len(os.fspath(root)) + 1
        for path in sorted(folder.rglob("*")):
            if path.is_dir():
                continue
            # FIFOs, devices and links to them are listed too, then skipped by the reader as "not_a_file".
            rel = os.fspath(path)[prefix:].replace(os.sep, "/")
            if rel.startswith(".") or "/." in rel:
                reason = "hidden"
            elif bad_folder or text_problem(rel):
                # Names that are not UTF-8 (zips from other systems) or hold control characters would break
                # the terminal, JSON and CSV files downstream: listed, escaped, and left out.
                reason = "bad_name"
                rel = printable(rel)[1:-1]
            elif path.suffix.lower() not in IMAGE_EXTENSIONS:
                reason = "not_image_extension"
            else:
                items.append(ImageItem(rel, identity))
                found += 1
                continue
            ignored[reason] += 1
            ignored_files.append((rel, reason))
        if found:
            identities.append(identity)
        else:
            empty.append(printable(folder.name)[1:-1] if bad_folder else folder.name)
    if not items:
        raise DataNotFoundError(
            f"no images found under {root}: expected one sub-folder of photos per person "
            f"(like the Kaggle dataset '{KAGGLE_DATASET}')"
        )
    return Dataset(root, items, sorted(set(identities)), ignored, ignored_files, empty)


def _unit_hash(text: str) -> float:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def assign_split(rel: str, seed: int, test_fraction: float, val_fraction: float) -> str:
    """Which split an image belongs to, from a hash of its relative path and the seed alone.

    Because each image's split depends on nothing else, adding images never moves existing ones,
    and within every identity the shares converge to the requested fractions (stratification).
    """
    u = _unit_hash(f"{seed}:{rel}")
    if u < test_fraction:
        return "test"
    if u < test_fraction + (1.0 - test_fraction) * val_fraction:
        return "val"
    return "train"


@dataclass
class Split:
    seed: int
    test_fraction: float
    val_fraction: float
    assignment: dict[str, str]  # rel -> split name

    def files(self, name: str) -> list[str]:
        return [rel for rel, split in self.assignment.items() if split == name]

    def save(self, path: Path) -> None:
        payload = {
            "seed": self.seed,
            "test_fraction": self.test_fraction,
            "val_fraction": self.val_fraction,
            **{name: sorted(self.files(name)) for name in SPLITS},
        }
        Path(path).write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Split:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        assignment = {rel: name for name in SPLITS for rel in data[name]}
        return cls(data["seed"], data["test_fraction"], data["val_fraction"], assignment)


def split_dataset(dataset: Dataset, seed: int = 1337, test_fraction: float = 0.15, val_fraction: float = 0.20) -> Split:
    assignment = {item.rel: assign_split(item.rel, seed, test_fraction, val_fraction) for item in dataset.items}
    return Split(seed, test_fraction, val_fraction, assignment)
