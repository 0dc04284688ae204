"""Scan a folder-per-attribute dataset: which images are usable, which are skipped and why."""

from __future__ import annotations

import os
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence


from ..errors import BadImageError, LookalikeError
from ..fileio import sha256_file
from ..hashing import dhash_bits
from ..images import Skipped, is_image_file, iter_image_files, skipped_file
from ..progress import tqdm


@dataclass(frozen=True)
class ImageRecord:
    path: str  # relative to the dataset root, with forward slashes
    attribute: str
    group: str  # the sub-folder below the attribute folder ("" for files directly inside it)
    sha256: str
    dhash: str = ""  # 16x16 difference hash (hex), to find near-duplicates across parts


@dataclass
class Dataset:
    root: str
    images: list[ImageRecord]
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def attributes(self) -> list[str]:
        return sorted({im.attribute for im in self.images})

    def absolute_path(self, index: int) -> Path:
        return Path(self.root) / self.images[index].path

    def to_dict(self) -> dict:
        return {
            "root": self.root,
            "attributes": self.attributes,
            "n_images": len(self.images),
            "images": [asdict(im) for im in self.images],
            "skipped": self.skipped,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Dataset":
        return cls(root=d["root"], images=[ImageRecord(**im) for im in d["images"]], skipped=list(d.get("skipped", [])))


def scan_dataset(root: str | os.PathLike, min_images_per_attribute: int = 4, progress: bool = True) -> Dataset:
    """Find every usable image below `root`, one sub-folder per attribute value.

    Hidden files and folders are ignored. Non-images, corrupt files, exact duplicates and attributes
    with too few images are skipped and listed in `Dataset.skipped`. Fails with a clear message when
    fewer than two attributes remain.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise LookalikeError(f"dataset folder {root} does not exist; give a folder with one sub-folder per attribute", param="data")
    if not root.is_dir():
        raise LookalikeError(f"{root} is a file; give a folder with one sub-folder per attribute", param="data")
    root = root.resolve()  # before the walk, so every path it yields lies below `root` as written here
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except PermissionError:
        raise LookalikeError(f"cannot read dataset folder {root} (permission denied); fix its permissions") from None
    spelled: dict[str, str] = {}
    for entry in entries:  # macOS writes decomposed accents, Linux keeps what it is given: "léopard" can be two folders
        if entry.is_dir() and not entry.name.startswith(".") and (twin := spelled.setdefault(unicodedata.normalize("NFC", entry.name), entry.name)) != entry.name:
            raise LookalikeError(
                f"{root} has two attribute folders that read the same, {twin!r} and {entry.name!r}, spelled with different Unicode "
                "accents (composed and decomposed); move one's photos into the other and delete it",
                param="data",
            )
    skipped: list[Skipped] = []
    candidates: list[tuple[str, str, str]] = []  # (relative path, attribute, group)
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_file():
            if is_image_file(entry.name):
                skipped.append(skipped_file(entry.name, "not inside an attribute folder"))
            continue
        if not entry.is_dir():
            continue
        passed_over: list[tuple[Path, str]] = []
        for path in iter_image_files(entry.path, passed_over):
            rel_dir = path.parent.relative_to(root / entry.name).as_posix()
            candidates.append((_rel(root, str(path)), entry.name, "" if rel_dir == "." else rel_dir))
        skipped += [skipped_file(_rel(root, str(path)), reason) for path, reason in passed_over]
    if not candidates and not any(e.is_dir() and not e.name.startswith(".") for e in entries):
        raise LookalikeError(f"{root} has no attribute sub-folders; expected e.g. {root}/striped/*.jpg, {root}/dotted/*.jpg")

    attributes = {c[1] for c in candidates} | {e.name for e in entries if e.is_dir() and not e.name.startswith(".")}
    return _checked_dataset(root, candidates, attributes, skipped, min_images_per_attribute, progress)


def dataset_from_files(
    paths: Sequence[str | os.PathLike], labels: Sequence[str], min_images_per_attribute: int = 4, progress: bool = True
) -> Dataset:
    """A dataset from image files and their attribute labels, for photos not laid out one folder per attribute."""
    if len(paths) != len(labels):
        raise LookalikeError(f"got {len(paths)} image paths but {len(labels)} labels; give one label per image")
    if not paths:
        raise LookalikeError("no images given; pass image paths and one attribute label per image")
    absolute = [Path(p).expanduser().resolve() for p in paths]
    root = Path(os.path.commonpath([str(p.parent) for p in absolute]))
    candidates = [(p.relative_to(root).as_posix(), str(label), "") for p, label in zip(absolute, labels)]
    return _checked_dataset(root, candidates, {str(label) for label in labels}, [], min_images_per_attribute, progress)


def _checked_dataset(
    root: Path, candidates: list[tuple[str, str, str]], attributes: set[str], skipped: list[Skipped], min_images_per_attribute: int, progress: bool
) -> Dataset:
    """Decode and hash each candidate (relative path, attribute, group); skip unusable files, duplicates and small attributes.

    A photo whose identical copy sits under another attribute has no single label: every copy is left out,
    rather than the first folder's label silently winning.
    """
    images: list[ImageRecord] = []
    seen: dict[str, ImageRecord] = {}
    conflicting: dict[str, list[str]] = {}  # content hash -> paths of the copies under other attributes
    for rel, attribute, group in tqdm(candidates, desc="Checking images", unit="img", disable=not progress or not candidates, leave=False):
        path = root / rel
        try:
            near_hash = dhash_bits(path).tobytes().hex()  # decodes the image, so unusable files fail here
            digest = sha256_file(path)
        except (BadImageError, OSError) as e:
            skipped.append(skipped_file(rel, e))
            continue
        if digest in seen:
            first = seen[digest]
            if first.attribute != attribute:
                conflicting.setdefault(digest, []).append(rel)
            else:
                skipped.append(skipped_file(rel, f"identical content to {first.path}"))
            continue
        record = ImageRecord(rel, attribute, group, digest, near_hash)
        seen[digest] = record
        images.append(record)
    for digest, others in conflicting.items():
        first = seen[digest]
        for rel in [first.path, *others]:
            copies = [p for p in [first.path, *others] if p != rel]
            skipped.append(
                skipped_file(rel, f"the same photo is also under another attribute ({', '.join(copies)}), so its label is unknown and no copy is used; keep it in one attribute's folder")
            )
    images = [im for im in images if im.sha256 not in conflicting]

    counts = {a: 0 for a in sorted(attributes)}
    for im in images:
        counts[im.attribute] += 1
    too_small = {a for a, n in counts.items() if n < min_images_per_attribute}
    for a in sorted(too_small):
        skipped.append(skipped_file(a + "/", f"attribute has {counts[a]} usable image(s); at least {min_images_per_attribute} are needed, so it is left out"))
    images = [im for im in images if im.attribute not in too_small]
    kept = sorted(set(counts) - too_small)
    if len(kept) < 2:
        detail = ", ".join(f"{a}: {n}" for a, n in counts.items()) or "none"
        raise LookalikeError(
            f"{root} needs at least 2 attributes with {min_images_per_attribute}+ usable images each "
            f"(found {detail}); a ranker learns what separates attributes, so add images of another attribute (another sub-folder, or another label)"
        )
    return Dataset(root=str(root), images=images, skipped=skipped)


def _rel(root: Path, path: str) -> str:
    """A path found by walking `root`, relative to it; a linked photo keeps its name in the dataset, not its target's."""
    return Path(path).relative_to(root).as_posix()
