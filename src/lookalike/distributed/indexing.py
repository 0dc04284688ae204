"""Build a lookalike index from the Parquet shards of a Ray run: a FAISS folder, or a Milvus collection.

The shards already hold everything the catalog needs (path, attribute, sha256, size, mtime) and
the unit-length vectors, so no image is read again. Rows are committed in large groups; an
interrupted build resumes (the index is reopened and rows already catalogued are skipped).
The search index is built once at the end; for large sets the FAISS store picks HNSW or IVF-PQ and
trains it on a random sample of the vectors (`train_sample`), not on all of them.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import LookalikeError
from ..index.backends import IndexLocation, as_location
from ..progress import tqdm
from . import shards as sh


def build_index_from_shards(
    shards_dir: str,
    index: str | os.PathLike | IndexLocation,
    metric,
    kind: str = "auto",
    params: dict | None = None,
    run_dir: str | None = None,
    overwrite: bool = False,
    commit_rows: int = 50_000,
    progress: bool = True,
) -> dict:
    """Catalogue every shard's rows into a new index (a folder path, or an IndexLocation), then build its search index; returns its stats."""
    from ..index.catalog import NewImage

    shards_dir = str(shards_dir)
    info = sh.read_manifest(shards_dir)
    if metric.kind == "learned" and metric.weights is not None and metric.weights.size != info["dim"]:
        raise LookalikeError(f"the run's learned distance has {metric.weights.size} weights but the shards in {shards_dir} hold {info['dim']}-d vectors; use the run they were embedded with")
    index = as_location(index).create(info["dim"], metric, info["backbone_fingerprint"], kind, params, run_dir, overwrite)
    try:
        known = set(index.entries_by_path())
        images: list = []
        vectors: list[np.ndarray] = []
        bar = tqdm(total=info["n"], desc="Cataloguing shards", unit="img", disable=not progress)
        for table, _ in sh.iter_shards(shards_dir, info["shards"], info["backbone_fingerprint"]):
            cols = {name: table.column(name).to_pylist() for name in ("path", "attribute", "sha256", "size", "mtime")}
            fresh = [i for i, p in enumerate(cols["path"]) if p not in known]
            if fresh:
                images += [NewImage(cols["path"][i], cols["attribute"][i], cols["sha256"][i], cols["size"][i], cols["mtime"][i]) for i in fresh]
                vectors.append(sh.embeddings_of(table)[fresh])
            if len(images) >= commit_rows:
                index.add(images, np.concatenate(vectors))
                images, vectors = [], []
            bar.update(table.num_rows)
        if images:
            index.add(images, np.concatenate(vectors))
        bar.close()
        index.merge(force=True, progress=progress)
        index.finish_build()
        return index.stats()
    finally:
        index.close()


def featurize_and_index(
    source: str,
    index: str | os.PathLike | IndexLocation,
    spec,
    metric,
    shards_dir: str | None = None,
    backbone=None,
    address: str | None = None,
    shard_size: int = 256,
    kind: str = "auto",
    params: dict | None = None,
    run_dir: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """`lookalike index build --executor ray`: embed on Ray into shards, then index them.

    `index` is a FAISS index folder or an IndexLocation (a Milvus collection too). Shards asked for with
    `shards_dir` are kept; the default ones (beside the index: INDEX_DIR.shards, or for Milvus
    URI.COLLECTION.shards beside a Milvus Lite file and COLLECTION.shards here for a server) are removed once
    the index is built, and kept after a failure so that a re-run resumes.
    """
    from .pipeline import featurize_ray

    location = as_location(index)
    keep = shards_dir is not None
    shards_dir = str(shards_dir or default_shards_dir(location))
    info = featurize_ray(source, shards_dir, spec, backbone, address, shard_size, progress=progress)
    stats = build_index_from_shards(shards_dir, location, metric, kind, params, run_dir, overwrite, progress=progress)
    if not keep:
        sh.remove_shards(shards_dir)
    return {"index": stats, "embedded": info["n"], "failed": info["failed"]} | ({"shards": shards_dir} if keep else {})


def default_shards_dir(location: IndexLocation) -> str:
    """Where a build's shards wait for the index: beside the FAISS folder or the Milvus Lite file; here for a Milvus server."""
    if location.backend == "faiss":
        return f"{location.name.rstrip('/')}.shards"
    return f"{location.uri}.{location.name}.shards" if "://" not in location.uri else f"{location.name}.shards"
