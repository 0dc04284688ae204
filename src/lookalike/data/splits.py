"""Train / validation / test assignment and the comparative sets (1 positive + N negatives per query)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np

from ..config import DataConfig
from ..errors import LookalikeError
from .dataset import Dataset

PARTS = ("train", "validation", "test")


@dataclass(frozen=True)
class ComparativeSet:
    """A query image, one image of the same attribute, and images of other attributes (indices into the dataset)."""

    query: int
    positive: int
    negatives: tuple[int, ...]


@dataclass
class Split:
    seed: int
    parts: dict[str, list[int]]
    sets: dict[str, list[ComparativeSet]]

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "parts": self.parts,
            "sets": {p: [asdict(s) | {"negatives": list(s.negatives)} for s in sets] for p, sets in self.sets.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Split":
        return cls(
            seed=d["seed"],
            parts={p: list(v) for p, v in d["parts"].items()},
            sets={p: [ComparativeSet(s["query"], s["positive"], tuple(s["negatives"])) for s in v] for p, v in d["sets"].items()},
        )


def make_split(dataset: Dataset, cfg: DataConfig, seed: int) -> Split:
    """Assign each attribute's images (or whole sub-folders) to parts, then draw the comparative sets.

    Deterministic for a given dataset, config and seed.
    """
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {p: [] for p in PARTS}
    for attribute in dataset.attributes:
        units = _units(dataset, attribute, cfg.split_by_subfolder)
        n = len(units)
        if cfg.split_by_subfolder and n < 3:
            raise LookalikeError(
                f"attribute '{attribute}' has {n} sub-folder(s); splitting by sub-folder needs at least 3 "
                "(train, validation, test). Add sub-folders or turn off data.split_by_subfolder"
            )
        order = rng.permutation(n)
        n_train = int(round(cfg.train_ratio * n))
        n_train = min(max(n_train, 2), n - 1)
        n_val = int(round(cfg.validation_ratio * n_train)) if cfg.validation_ratio > 0 else 0
        if cfg.validation_ratio > 0:
            n_val = min(max(n_val, 1), n_train - 1)
        assigned = {"validation": order[:n_val], "train": order[n_val:n_train], "test": order[n_train:]}
        for part, unit_ids in assigned.items():
            for u in sorted(unit_ids):
                parts[part].extend(units[u])
    for part in PARTS:
        parts[part].sort()
    verify_disjoint(dataset, parts)
    queries = {
        "train": cfg.train_queries_per_attribute,
        "validation": cfg.validation_queries_per_attribute,
        "test": cfg.test_queries_per_attribute,
    }
    sets = {part: comparative_sets(dataset, parts[part], queries[part], cfg.negatives_per_query, rng) for part in PARTS}
    return Split(seed=seed, parts=parts, sets=sets)


def comparative_sets(dataset: Dataset, members: list[int], queries_per_attribute: int, n_negatives: int, rng: np.random.Generator) -> list[ComparativeSet]:
    """Up to `queries_per_attribute` queries per attribute, each with 1 positive and up to `n_negatives` negatives."""
    by_attribute: dict[str, list[int]] = defaultdict(list)
    for i in members:
        by_attribute[dataset.images[i].attribute].append(i)
    out: list[ComparativeSet] = []
    for attribute in sorted(by_attribute):
        same = by_attribute[attribute]
        if len(same) < 2:
            continue
        others = np.array([i for i in members if dataset.images[i].attribute != attribute], dtype=np.int64)
        if len(others) == 0:
            continue
        chosen = rng.choice(len(same), size=min(queries_per_attribute, len(same)), replace=False)
        for q in sorted(chosen):
            query = same[q]
            positive = same[(q + 1 + rng.integers(len(same) - 1)) % len(same)]
            negatives = rng.choice(others, size=min(n_negatives, len(others)), replace=False)
            out.append(ComparativeSet(query, positive, tuple(int(n) for n in negatives)))
    return out


def verify_disjoint(dataset: Dataset, parts: dict[str, list[int]]) -> None:
    """Refuse to go on if any two parts share an image, by path or by content hash."""
    for i, a in enumerate(PARTS):
        for b in PARTS[i + 1 :]:
            for key in ("path", "sha256"):
                va = {getattr(dataset.images[j], key): j for j in parts.get(a, [])}
                shared = [va[getattr(dataset.images[j], key)] for j in parts.get(b, []) if getattr(dataset.images[j], key) in va]
                if shared:
                    example = dataset.images[shared[0]].path
                    raise LookalikeError(
                        f"{a} and {b} share {len(shared)} image(s) by {key} (e.g. {example}); "
                        "the evaluation would be dishonest. Remove duplicate files from the dataset and run prepare again"
                    )


def _units(dataset: Dataset, attribute: str, by_subfolder: bool) -> list[list[int]]:
    members = [i for i, im in enumerate(dataset.images) if im.attribute == attribute]
    if not by_subfolder:
        return [[i] for i in members]
    groups: dict[str, list[int]] = defaultdict(list)
    for i in members:
        groups[dataset.images[i].group].append(i)
    return [groups[g] for g in sorted(groups)]
