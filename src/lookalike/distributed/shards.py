"""Embedding shards: one Parquet file per block of input images, named so that a re-run can resume.

A shard holds catalog rows (path, attribute, sha256, size, mtime) and the unit-length embedding
of every image of its block that could be read; the block's failed images are kept in the file's
metadata. A shard's name is derived from the block's number and a digest of its image list and of
the model's fingerprint, so a shard that exists is the finished work of exactly that block under
exactly that model. Shards are written atomically (temporary name, then rename; object stores
publish a PUT whole), so an existing shard is always complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from ..errors import LookalikeError
from ..fileio import atomic_path, save_npy, write_json
from .sources import ListedImage, is_remote, resolve

SHARD_PREFIX = "part-"
MANIFEST = "manifest.json"
FAILED = "failed.json"
METADATA_KEY = b"lookalike.shard"
FORMAT = "lookalike.shards/1"


@dataclass
class Block:
    """The images one shard is made from."""

    number: int
    shard: str
    images: list[ListedImage]

    def to_row(self) -> dict:
        """A Ray Data row (plain lists, so Arrow can hold it)."""
        return {
            "block": self.number,
            "shard": self.shard,
            "paths": [im.uri for im in self.images],
            "attributes": [im.attribute or "" for im in self.images],
            "sizes": [im.size for im in self.images],
            "mtimes": [im.mtime for im in self.images],
        }


@dataclass
class Plan:
    """Every block of a listing, split into those still to embed and those already sharded."""

    blocks: list[Block]
    todo: list[Block] = field(default_factory=list)
    done: list[Block] = field(default_factory=list)


def shard_name(number: int, uris: list[str], fingerprint: str) -> str:
    digest = hashlib.sha256("\n".join([fingerprint, *uris]).encode()).hexdigest()[:16]
    return f"{SHARD_PREFIX}{number:06d}-{digest}.parquet"


def plan_blocks(images: list[ListedImage], shard_size: int, fingerprint: str, shards_dir: str, clean: bool = True) -> Plan:
    """Cut the listing into blocks and see which shards exist; stale shards and temporary files are removed."""
    if shard_size < 1:
        raise LookalikeError("--shard-size must be at least 1")
    blocks = []
    for number, start in enumerate(range(0, len(images), shard_size)):
        chunk = images[start : start + shard_size]
        blocks.append(Block(number, shard_name(number, [im.uri for im in chunk], fingerprint), chunk))
    fs, base = resolve(shards_dir)
    fs.create_dir(base, recursive=True)
    existing = _own_files(fs, base)
    wanted = {b.shard for b in blocks}
    if clean:
        for name in existing - wanted:
            fs.delete_file(f"{base}/{name}")
    plan = Plan(blocks)
    for b in blocks:
        (plan.done if b.shard in existing else plan.todo).append(b)
    return plan


def _own_files(fs, base: str) -> set[str]:
    """Names of shards and of temporary files left by an interrupted write, in `base`."""
    import pyarrow.fs as pafs

    names = set()
    for info in fs.get_file_info(pafs.FileSelector(base)):
        name = info.base_name
        if info.type == pafs.FileType.File and (name.startswith(SHARD_PREFIX) and name.endswith(".parquet") or name.startswith(f".{SHARD_PREFIX}") and ".tmp" in name):
            names.add(name)
    return names


def shard_table(paths, attributes, digests, sizes, mtimes, embeddings: np.ndarray, failed: list[dict], block: int, fingerprint: str, dim: int):
    """The Arrow table of one shard; embeddings as a fixed-size list of float32 (what FAISS and numpy read back without copying)."""
    import pyarrow as pa

    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1, dim)
    table = pa.table(
        {
            "path": pa.array(list(paths), pa.string()),
            "attribute": pa.array([a or None for a in attributes], pa.string()),
            "sha256": pa.array(list(digests), pa.string()),
            "size": pa.array(list(sizes), pa.int64()),
            "mtime": pa.array(list(mtimes), pa.float64()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1), pa.float32()), dim),
        }
    )
    meta = {"format": FORMAT, "block": int(block), "backbone_fingerprint": fingerprint, "dim": int(dim), "failed": failed}
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})


def write_shard(table, shards_dir: str, name: str) -> None:
    """Write atomically: a local file appears under its final name only once complete."""
    import pyarrow.parquet as pq

    fs, base = resolve(shards_dir)
    if is_remote(shards_dir):
        pq.write_table(table, f"{base}/{name}", filesystem=fs)
        return
    with atomic_path(f"{base}/{name}", suffix=".parquet") as tmp:
        pq.write_table(table, str(tmp))


def read_shard(shards_dir: str, name: str):
    """(table, metadata) of one shard; a damaged file is an error that says to delete it."""
    import pyarrow.parquet as pq

    fs, base = resolve(shards_dir)
    try:
        table = pq.read_table(f"{base}/{name}", filesystem=fs)
        meta = json.loads(table.schema.metadata[METADATA_KEY])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LookalikeError(f"shard {shards_dir}/{name} cannot be read ({e}); delete it and run the same command again to redo its block") from None
    return table, meta


def embeddings_of(table) -> np.ndarray:
    """The (n, dim) float32 embedding matrix of a shard table."""
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


def iter_shards(shards_dir: str, names: list[str], fingerprint: str) -> Iterator[tuple[object, dict]]:
    """(table, metadata) of each shard in order, refusing one made by another model."""
    for name in names:
        table, meta = read_shard(shards_dir, name)
        if meta.get("backbone_fingerprint") != fingerprint:
            raise LookalikeError(f"shard {shards_dir}/{name} was made by another model; delete {shards_dir} and run again")
        yield table, meta


def write_manifest(shards_dir: str, info: dict, failed: list[dict]) -> None:
    """The summary a reader starts from (shards in order, model, counts) and the failed-images report."""
    fs, base = resolve(shards_dir)
    for name, obj in ((FAILED, {"n_failed": len(failed), "failed": failed}), (MANIFEST, info)):
        data = (json.dumps(obj, indent=2) + "\n").encode()
        if is_remote(shards_dir):
            with fs.open_output_stream(f"{base}/{name}") as f:
                f.write(data)
        else:
            with atomic_path(f"{base}/{name}") as tmp:
                tmp.write_bytes(data)


def read_manifest(shards_dir: str) -> dict:
    fs, base = resolve(shards_dir)
    try:
        with fs.open_input_stream(f"{base}/{MANIFEST}") as f:
            info = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise LookalikeError(f"{shards_dir} holds no finished set of shards ({e}); run `lookalike featurize-dir DIR --executor ray --out {shards_dir}` first") from None
    if info.get("format") != FORMAT:
        raise LookalikeError(f"{shards_dir}/{MANIFEST} has format {info.get('format')!r}; this version of lookalike reads {FORMAT}")
    return info


def shard_summary(shards_dir: str, name: str) -> tuple[int, dict]:
    """(rows, metadata) of a shard from its Parquet footer alone, without reading the embeddings."""
    import pyarrow.parquet as pq

    fs, base = resolve(shards_dir)
    try:
        with fs.open_input_file(f"{base}/{name}") as f:
            footer = pq.ParquetFile(f).metadata
            return footer.num_rows, json.loads(footer.metadata[METADATA_KEY])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LookalikeError(f"shard {shards_dir}/{name} cannot be read ({e}); delete it and run the same command again to redo its block") from None


def remove_shards(shards_dir: str) -> None:
    """Delete a finished set of shards once what was made from them (FILE.npy, FILE.parquet, an index) is written."""
    fs, base = resolve(shards_dir)
    fs.delete_dir(base)


def export(shards_dir: str, out, info: dict, failed: list[dict]) -> dict:
    """Join the shards into the single-process `featurize-dir` output: FILE.npy + FILE.json, or FILE.parquet.

    Streams shard by shard, so memory stays at one shard whatever the number of images. Paths are
    written relative to the source folder, as the single-process path writes them.
    """
    from pathlib import Path, PurePosixPath

    out = Path(out)
    source = info["source"]
    names = info["shards"]
    summary = {
        "directory": source,
        "backbone": info["backbone"],
        "backbone_fingerprint": info["backbone_fingerprint"],
        "dim": info["dim"],
        "n": info["n"],
        "skipped": failed,
        "engine": "ray",
    }

    def rel(path: str) -> str:
        return str(PurePosixPath(path).relative_to(PurePosixPath(source))) if is_remote(source) else os.path.relpath(path, source)

    paths: list[str] = []
    digests: list[str] = []
    if out.suffix == ".npy" and info["n"] == 0:
        save_npy(out, np.zeros((0, info["dim"]), np.float32))
        write_json(out.with_suffix(".json"), summary | {"paths": [], "sha256": []})
        return summary
    if out.suffix == ".npy":
        with atomic_path(out, suffix=".npy") as tmp:
            matrix = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(info["n"], info["dim"]))
            row = 0
            for table, _ in iter_shards(shards_dir, names, info["backbone_fingerprint"]):
                matrix[row : row + table.num_rows] = embeddings_of(table)
                row += table.num_rows
                paths += [rel(p) for p in table.column("path").to_pylist()]
                digests += table.column("sha256").to_pylist()
            matrix.flush()
            del matrix
        write_json(out.with_suffix(".json"), summary | {"paths": paths, "sha256": digests})
        return summary
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("path", pa.string()), ("sha256", pa.string()), ("embedding", pa.list_(pa.float32(), info["dim"]))], metadata={b"lookalike": json.dumps(summary).encode()})
    with atomic_path(out, suffix=".parquet") as tmp:
        with pq.ParquetWriter(str(tmp), schema) as writer:
            for table, _ in iter_shards(shards_dir, names, info["backbone_fingerprint"]):
                part = pa.table({"path": [rel(p) for p in table.column("path").to_pylist()], "sha256": table.column("sha256"), "embedding": table.column("embedding")}, schema=schema)
                writer.write_table(part)
    return summary
