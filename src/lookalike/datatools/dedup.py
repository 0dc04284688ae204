"""Exact and near-duplicate images: find them, move the extras aside, and catch train/test leaks.

Exact duplicates have the same bytes (sha256). Near duplicates (resized, re-encoded, slightly
cropped copies) have difference hashes within `max_distance` differing bits (hashing.py holds the
hashes and the fast search).

Duplicates are never deleted: `quarantine` moves them into a separate folder that mirrors the
dataset's relative paths, next to a JSON report saying which file each one duplicated.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..errors import LookalikeError
from ..fileio import read_json, sha256_file, write_json
from ..hashing import DEFAULT_HASH_SIZE, default_max_distance, hamming, hash_images, near_pairs
from ..images import Skipped, iter_image_files, skipped_file
from ..progress import tqdm

REPORT_NAME = "dedup_report.json"


# --------------------------------------------------------------------------- train/test leaks


@dataclass(frozen=True)
class Leak:
    """An image in set A and one in set B that are (near) duplicates."""

    index_a: int
    index_b: int
    path_a: str
    path_b: str
    distance: int

    def to_dict(self) -> dict:
        return {"a": self.path_a, "b": self.path_b, "distance": self.distance}


def find_leaks(
    paths_a: Sequence[str | os.PathLike], paths_b: Sequence[str | os.PathLike], hash_size: int = DEFAULT_HASH_SIZE, max_distance: int | None = None, *, progress: bool = False
) -> list[Leak]:
    """Pairs (a, b), a from `paths_a` (e.g. train) and b from `paths_b` (e.g. test), whose dhashes
    differ in at most `max_distance` bits (default: default_max_distance(hash_size)).

    Sorted by distance, then indices. Unreadable images raise BadImageError. To resolve the leaks,
    drop (or move to A's side) every `index_b` in the result.
    """
    max_distance = default_max_distance(hash_size) if max_distance is None else _check_distance(max_distance, hash_size)
    ha, _ = hash_images(list(paths_a), hash_size, progress=progress)
    hb, _ = hash_images(list(paths_b), hash_size, progress=progress)
    i, j, d = near_pairs(ha, hb, max_distance)
    order = np.lexsort((j, i, d))
    return [Leak(int(i[k]), int(j[k]), str(paths_a[i[k]]), str(paths_b[j[k]]), int(d[k])) for k in order]


def _check_distance(max_distance: int, hash_size: int) -> int:
    bits = hash_size * hash_size
    if not 0 <= max_distance < bits:
        raise LookalikeError(f"max distance must be between 0 and {bits - 1} bits for hash size {hash_size}, not {max_distance}")
    return int(max_distance)


# --------------------------------------------------------------------------- duplicates inside a dataset


@dataclass
class DuplicateGroup:
    keep: str  # relative path of the copy that stays (largest picture, then largest file, then first by name)
    duplicates: list[dict]  # {"path", "kind": "exact" | "near", "distance"} — bits differing from `keep`

    @property
    def attributes(self) -> list[str]:
        """Top-level folders (attributes) the group spans; more than one means conflicting labels."""
        return sorted({_attribute(self.keep)} | {_attribute(d["path"]) for d in self.duplicates})

    @property
    def kind(self) -> str:
        return "exact" if all(d["kind"] == "exact" for d in self.duplicates) else "near"

    def to_dict(self) -> dict:
        d = {"keep": self.keep, "kind": self.kind, "attributes": self.attributes, "duplicates": self.duplicates}
        if len(self.attributes) > 1:
            d["warning"] = "copies are labelled with different attributes; check which label is right"
        return d


@dataclass
class DedupResult:
    root: str
    hash_size: int
    max_distance: int
    n_images: int
    groups: list[DuplicateGroup]
    unreadable: list[Skipped] = field(default_factory=list)
    moves: list[dict] = field(default_factory=list)  # filled by quarantine()
    dry_run: bool = True

    @property
    def n_duplicates(self) -> int:
        return sum(len(g.duplicates) for g in self.groups)

    def to_dict(self) -> dict:
        return {
            "root": self.root,
            "hash_size": self.hash_size,
            "max_distance": self.max_distance,
            "images": self.n_images,
            "groups": len(self.groups),
            "duplicates": self.n_duplicates,
            "exact_duplicates": sum(d["kind"] == "exact" for g in self.groups for d in g.duplicates),
            "near_duplicates": sum(d["kind"] == "near" for g in self.groups for d in g.duplicates),
            "dry_run": self.dry_run,
            "duplicate_groups": [g.to_dict() for g in self.groups],
            "moved": self.moves,
            "unreadable": self.unreadable,
        }


def list_images(root: str | os.PathLike) -> list[str]:
    """Relative paths (forward slashes, sorted) of the visible image files below `root` (hidden folders skipped)."""
    root = Path(root)
    return sorted(path.relative_to(root).as_posix() for path in iter_image_files(root))


def find_duplicates(
    root: str | os.PathLike, hash_size: int = DEFAULT_HASH_SIZE, max_distance: int | None = None, *, progress: bool = True
) -> DedupResult:
    """Group the exact and near-duplicate images below `root` (hidden files and folders are ignored).

    Within a group the largest picture stays; the others are its duplicates. Nothing is moved.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise LookalikeError(f"{root} is not a folder; pass the dataset folder (one sub-folder per attribute)")
    max_distance = default_max_distance(hash_size) if max_distance is None else _check_distance(max_distance, hash_size)
    rel_paths = list_images(root)
    unreadable: list[Skipped] = []

    # 1. exact duplicates: identical bytes
    by_digest: dict[str, list[int]] = {}
    for i, rel in enumerate(tqdm(rel_paths, desc="Checksums", unit="img", disable=not progress or not rel_paths, leave=False)):
        try:
            by_digest.setdefault(sha256_file(root / rel), []).append(i)
        except OSError as e:
            unreadable.append(skipped_file(rel, e))
    digest_of = {i: dg for dg, members in by_digest.items() for i in members}

    # 2. near duplicates among one representative per distinct content
    reps = [members[0] for members in by_digest.values()]
    hashes, problems = hash_images([root / rel_paths[r] for r in reps], hash_size, skip_unreadable=True, progress=progress)
    for k, reason in sorted(problems.items()):
        for i in by_digest[digest_of[reps[k]]]:
            unreadable.append(skipped_file(rel_paths[i], reason))
    good = np.array([k for k in range(len(reps)) if k not in problems], dtype=np.int64)
    parent = list(range(len(reps)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    if len(good):
        pi, pj, _ = near_pairs(hashes[good], None, max_distance)
        for a, b in zip(good[pi].tolist(), good[pj].tolist()):
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)

    components: dict[int, list[int]] = {}
    for k in good.tolist():
        components.setdefault(find(k), []).append(k)

    groups = []
    for members in components.values():
        files = [i for k in members for i in by_digest[digest_of[reps[k]]]]
        if len(files) < 2:
            continue
        rep_of = {i: k for k in members for i in by_digest[digest_of[reps[k]]]}
        keep = max(files, key=lambda i: (_pixels(root / rel_paths[i]), _size(root / rel_paths[i]), -i))
        dups = []
        for i in sorted(files):
            if i == keep:
                continue
            exact = digest_of[i] == digest_of[keep]
            distance = 0 if exact else hamming(hashes[rep_of[i]], hashes[rep_of[keep]])
            dups.append({"path": rel_paths[i], "kind": "exact" if exact else "near", "distance": distance})
        groups.append(DuplicateGroup(rel_paths[keep], dups))
    groups.sort(key=lambda g: g.keep)
    return DedupResult(str(root), hash_size, max_distance, len(rel_paths), groups, sorted(unreadable, key=lambda u: u["path"]))


def _pixels(path: Path) -> int:
    try:
        with Image.open(path) as im:
            return im.size[0] * im.size[1]
    except Exception:
        return 0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _attribute(rel: str) -> str:
    return rel.split("/", 1)[0] if "/" in rel else ""


def default_quarantine(root: str | os.PathLike) -> Path:
    """`<parent>/<dataset name>-duplicates`, beside the dataset so it is never read as an attribute."""
    root = Path(root).expanduser().resolve()
    return root.parent / f"{root.name}-duplicates"


def check_quarantine(root: str | os.PathLike, quarantine_dir: str | os.PathLike) -> Path:
    """The quarantine folder must not be a visible folder inside the dataset (it would become an attribute)."""
    root = Path(root).expanduser().resolve()
    q = Path(quarantine_dir).expanduser().resolve()
    if q == root:
        raise LookalikeError("the quarantine folder cannot be the dataset folder itself")
    try:
        inside = q.relative_to(root)
    except ValueError:
        return q
    if not any(part.startswith(".") for part in inside.parts):
        raise LookalikeError(
            f"quarantine folder {q} is inside the dataset {root}, where it would be read as an attribute; "
            f"put it beside the dataset (the default is {default_quarantine(root)}) or give it a name starting with '.'"
        )
    return q


def quarantine(result: DedupResult, quarantine_dir: str | os.PathLike, *, dry_run: bool = False, report_path: str | os.PathLike | None = None) -> DedupResult:
    """Move every duplicate to `quarantine_dir/<its relative path>` (never delete; never overwrite).

    Writes the report to `report_path`, by default `quarantine_dir/dedup_report.json` (only when
    something was moved or a path was given). With `dry_run` nothing is moved and `moves` lists
    what would be.
    """
    root = Path(result.root)
    q = check_quarantine(root, quarantine_dir)
    result.dry_run = dry_run
    result.moves = []
    planned: set[Path] = set()
    for group in result.groups:
        for dup in group.duplicates:
            target = _free_path(q / dup["path"], planned)
            planned.add(target)
            move = {"from": dup["path"], "to": target.relative_to(q).as_posix(), "duplicate_of": group.keep, "kind": dup["kind"], "distance": dup["distance"]}
            if not dry_run:
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(root / dup["path"], target)  # a rename, or copy-then-remove across file systems
                except OSError as e:
                    move["error"] = f"not moved ({e.strerror or e})"
            result.moves.append(move)
    if report_path is None and not dry_run and result.moves:
        report_path = q / REPORT_NAME
    if report_path is not None:
        report = result.to_dict() | {"quarantine": str(q)}
        if earlier := _earlier_moves(Path(report_path)):
            report["earlier_moves"] = earlier
        write_json(report_path, report)
    return result


def _earlier_moves(report_path: Path) -> list[dict]:
    """The moves an earlier report at `report_path` records (its own and those it kept), each with the dataset and
    quarantine folders its paths are relative to, so that a later run's report still says where every quarantined
    file came from; a dry run's planned moves are not kept."""
    try:
        earlier = read_json(report_path)
    except (OSError, ValueError):
        return []
    if not isinstance(earlier, dict) or earlier.get("dry_run"):
        return list(earlier.get("earlier_moves", [])) if isinstance(earlier, dict) else []
    where = {"root": earlier.get("root"), "quarantine": earlier.get("quarantine")}
    return list(earlier.get("earlier_moves", [])) + [where | m for m in earlier.get("moved", []) if "error" not in m]


def _free_path(target: Path, planned: set[Path]) -> Path:
    """`target`, or `name.1.ext`, `name.2.ext`, ... when a file (or a planned move) is already there."""
    candidate, n = target, 0
    while candidate in planned or candidate.exists():
        n += 1
        candidate = target.with_name(f"{target.stem}.{n}{target.suffix}")
    return candidate
