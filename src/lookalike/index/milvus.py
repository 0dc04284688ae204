"""An image index in a Milvus collection: the FAISS index's catalog and exact ranking, past one machine.

One collection per index. A row is an image: `id` (assigned in order and never reused, as the
FAISS backend numbers its rows), `path`, `attribute` ("" for none), `sha256`, `size`, `mtime`,
`embedding` (the raw vector: exact re-ranking, reuse by content hash) and `search` (the vector in
the metric's L2 search space, `IndexMetric.data_space`), which Milvus indexes (FLAT is exact,
HNSW or DiskANN for large collections). The learned distance's exact reduction to L2 carries over
unchanged: Milvus searches `query_space(q)` by L2 for a shortlist, and every candidate is then
scored with the exact distance in float64 from its raw vector, as the FAISS backend does, so both
return the same matches.

The index's settings (distance, backbone fingerprint, run) and its state (next id, generation,
attribute counts, the update in flight) live in the collection's properties. Milvus has no
transaction spanning several calls, so an update first records its intent in the state (the ids
it inserts, the ids it replaces), then inserts, deletes what it replaces, and commits the state. A
writer that finds an intent left by a crash finishes it when every new row arrived, else deletes
the partial rows. Milvus itself keeps the rows durable (its write-ahead log).

pymilvus is imported only when a Milvus index is opened: the backend is the optional extra
`lookalike[milvus]`. A URI is a Milvus Lite file (`*.db`, embedded, no server, one process at a
time) or a server (`http://host:19530`); a server's token is read from $LOOKALIKE_MILVUS_TOKEN.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from pathlib import Path

import numpy as np

from ..errors import ConfigError, LookalikeError
from .catalog import ImageEntry, NewImage
from .metric import IndexMetric
from .store import merge_threshold
from .vectors import DEFAULT_PARAMS, EXACT_BELOW

FORMAT = "lookalike.milvus/1"
SETTINGS, STATE = "lookalike.settings", "lookalike.state"
#: lookalike's index kinds as Milvus index types (DiskANN needs a Milvus server).
INDEX_TYPES = {"flat": "FLAT", "hnsw": "HNSW", "diskann": "DISKANN"}
#: The index parameters Milvus uses (the others are FAISS's), with the FAISS backend's defaults.
PARAMS = {k: DEFAULT_PARAMS[k] for k in ("hnsw_m", "ef_construction", "ef_search", "rerank")}
ENTRY_FIELDS = ["id", "path", "attribute", "sha256", "size", "mtime"]
MAX_PATH_BYTES = 4096
#: Milvus answers at most this many rows per search or query.
MAX_RESULTS = 16_384
TOKEN_ENV = "LOOKALIKE_MILVUS_TOKEN"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")

_clients: dict[str, object] = {}
_clients_lock = threading.Lock()


def check_collection_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"{name!r} cannot name a Milvus collection; with --backend milvus the index is named by letters, digits and "
            "underscores, starting with a letter (e.g. `photos`)"
        )
    return name


def normalize_uri(uri: str) -> str:
    """A server URI as given; a Milvus Lite file made absolute (it must end in .db)."""
    if "://" in uri or uri.startswith("unix:"):
        return uri
    path = Path(uri).expanduser()
    if path.suffix != ".db":
        raise ConfigError(f"--uri {uri}: a Milvus Lite file must end in .db (e.g. catalog.db), or give a server as http://host:19530")
    return str(path.resolve())


def connect(uri: str):
    """The process's client for `uri`, shared: Milvus Lite releases a collection when any client of the file closes."""
    uri = normalize_uri(uri)
    with _clients_lock:
        if uri not in _clients:
            try:
                from pymilvus import MilvusClient
            except ImportError:
                raise LookalikeError("the Milvus backend needs its optional extra: pip install 'lookalike[milvus]'") from None
            for name in ("pymilvus", "milvus_lite", "grpc._server"):  # Lite's in-process server logs what becomes a LookalikeError
                logging.getLogger(name).setLevel(logging.CRITICAL)
            if "://" not in uri:
                Path(uri).parent.mkdir(parents=True, exist_ok=True)
            try:
                _clients[uri] = MilvusClient(uri, token=os.environ.get(TOKEN_ENV, ""))
            except Exception as e:  # noqa: BLE001 - pymilvus raises several types; each becomes one message
                if "://" not in uri:
                    raise LookalikeError(
                        f"cannot open the Milvus Lite file {uri} ({_reason(e)}); Milvus Lite serves one process at a time: "
                        "stop the other lookalike command or service using it, or run a Milvus server and pass --uri http://host:19530"
                    ) from None
                raise LookalikeError(f"cannot reach Milvus at {uri} ({_reason(e)}); is the server running, and is ${TOKEN_ENV} set if it needs a token?") from None
        return _clients[uri]


def disconnect(uri: str) -> None:
    """Close the process's client for `uri`, and stop its Milvus Lite server: the file is then free for other processes."""
    uri = normalize_uri(uri)
    with _clients_lock:
        client = _clients.pop(uri, None)
    if client is not None:
        client.close()
        if "://" not in uri:
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(uri)


def committed_version(uri: str, name: str) -> tuple:
    """Changes whenever an update commits (or the collection is made again): the service reopens on a change."""
    client = connect(uri)
    try:
        info = client.describe_collection(name)
    except Exception:  # noqa: BLE001 - a missing collection is the message below
        raise LookalikeError(f"the Milvus collection {name} at {uri} has gone away; restart the service with a valid --index") from None
    state = json.loads(info.get("properties", {}).get(STATE, "{}"))
    return info.get("collection_id"), state.get("generation")


class MilvusIndex:
    """Open with `MilvusIndex.open(uri, name)`, or `create(...)`; the same surface as ImageIndex."""

    def __init__(self, uri: str, name: str, writable: bool):
        self.uri = normalize_uri(uri)
        self.name = check_collection_name(name)
        self.client = connect(self.uri)
        self.writable = writable
        props = self._properties()
        if SETTINGS not in props:
            raise LookalikeError(f"the Milvus collection {name} at {self.uri} was not made by lookalike; choose another name")
        self.settings = json.loads(props[SETTINGS])
        if self.settings.get("format") != FORMAT:
            raise LookalikeError(f"the Milvus collection {name} has format {self.settings.get('format')!r}, this version of lookalike reads {FORMAT}")
        self.state = json.loads(props[STATE])
        self.metric = IndexMetric.from_dict(self.settings["metric"])

    @property
    def location(self) -> str:
        """Where the index is, as messages name it."""
        return f"the Milvus collection {self.name} at {self.uri}"

    # ---- opening -------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        uri: str,
        name: str,
        dim: int,
        metric: IndexMetric,
        backbone_fingerprint: str | None = None,
        kind: str = "auto",
        params: dict | None = None,
        run_dir: str | None = None,
        overwrite: bool = False,
    ) -> "MilvusIndex":
        """A new, empty collection; an interrupted build with the same settings is resumed instead."""
        _check_options(kind, params)
        client = connect(uri)
        check_collection_name(name)
        if client.has_collection(name):
            old = cls(uri, name, writable=True)
            same = old.dim == dim and old.settings["metric_fingerprint"] == metric.fingerprint() and old.settings["backbone_fingerprint"] == backbone_fingerprint
            if old.state["building"] and same and old.settings["kind"] == kind and not overwrite:
                client.load_collection(name)
                old._recover()
                return old
            if not overwrite:
                raise LookalikeError(f"{old.location} already holds an index; use `lookalike index add` to update it, or pass --overwrite to rebuild it")
            client.drop_collection(name)
        settings = {
            "format": FORMAT,
            "dim": int(dim),
            "kind": kind,
            "params": {**PARAMS, **(params or {})},
            "metric": metric.to_dict(),
            "metric_fingerprint": metric.fingerprint(),
            "backbone_fingerprint": backbone_fingerprint,
            "run_dir": run_dir,
            "created": time.time(),
        }
        state = {"generation": 0, "next_id": 0, "images": 0, "attributes": {}, "index_kind": None, "unflushed": 0, "building": True, "pending": None, "updated": time.time()}
        client.create_collection(name, schema=_schema(client, dim, dim + metric.search_dim_extra), consistency_level="Strong")
        client.alter_collection_properties(name, properties={SETTINGS: json.dumps(settings), STATE: json.dumps(state)})
        index = cls(uri, name, writable=True)
        index._build_search_index(_kind_for(0) if kind == "auto" else kind)
        return index

    @classmethod
    def open(cls, uri: str, name: str, writable: bool = False) -> "MilvusIndex":
        """Open an index; a writer first finishes or undoes what a crashed writer left."""
        client = connect(uri)
        if not client.has_collection(check_collection_name(name)):
            raise LookalikeError(f"Milvus at {normalize_uri(uri)} has no collection {name}; create it with `lookalike index build --backend milvus --uri {uri} --out {name}`")
        client.load_collection(name)  # Milvus Lite releases a collection when a client of its file closes
        index = cls(uri, name, writable)
        if writable:
            index._recover()
        return index

    def close(self) -> None:
        """Nothing to release: the client is shared by the process (see `disconnect`)."""

    def __enter__(self) -> "MilvusIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- state ---------------------------------------------------------------------------------

    @property
    def manifest(self) -> dict:
        """Settings and state in the keys of the FAISS index's manifest."""
        return {**self.settings, **self.state}

    @property
    def dim(self) -> int:
        return int(self.settings["dim"])

    @property
    def generation(self) -> int:
        return int(self.state["generation"])

    @property
    def size(self) -> int:
        return int(self.state["images"])

    def _properties(self) -> dict:
        return self.client.describe_collection(self.name).get("properties", {})

    def _save_state(self, **changes) -> None:
        state = {**self.state, **changes, "updated": time.time()}
        self.client.alter_collection_properties(self.name, properties={STATE: json.dumps(state)})
        self.state = state

    def _commit(self, **changes) -> None:
        self._save_state(**changes, pending=None, generation=self.generation + 1)

    def _recover(self) -> None:
        """Finish an update whose new rows all arrived, or delete the rows of one that did not."""
        pending = self.state["pending"]
        if not pending:
            return
        first, n = pending["first"], pending["n"]
        arrived = self._count(f"id >= {first} and id < {first + n}")
        if arrived == n:
            if pending["replaced"]:
                self.client.delete(self.name, ids=pending["replaced"])
        else:
            self.client.delete(self.name, filter=f"id >= {first} and id < {first + n}")
            self.state["next_id"] = first
        counts: dict[str, int] = {}
        for entry in self._scan():
            key = entry.attribute or "(none)"
            counts[key] = counts.get(key, 0) + 1
        self._commit(images=sum(counts.values()), attributes=dict(sorted(counts.items())), next_id=self.state["next_id"])

    def _require_writer(self) -> None:
        if not self.writable:
            raise LookalikeError(f"{self.location} was opened read-only; open it with writable=True to change it")

    def _count(self, expr: str) -> int:
        return int(self.client.query(self.name, filter=expr, output_fields=["count(*)"])[0]["count(*)"])

    # ---- updates -------------------------------------------------------------------------------

    def add(self, images: list[NewImage], vectors: np.ndarray, replaced_ids=()) -> np.ndarray:
        """Catalogue `images` with their vectors (and retire `replaced_ids`) as one committed update."""
        self._require_writer()
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape != (len(images), self.dim):
            raise LookalikeError(f"got vectors of shape {vectors.shape} for {len(images)} images; this index stores {self.dim}-d vectors")
        for im in images:
            if len(im.path.encode()) > MAX_PATH_BYTES:
                raise LookalikeError(f"{im.path[:80]}...: paths longer than {MAX_PATH_BYTES} bytes cannot be stored in Milvus; move the image to a shorter path")
        space = self.metric.data_space(vectors)
        replaced = [int(i) for i in replaced_ids]
        old = self.entries(replaced)
        first = int(self.state["next_id"])
        self._save_state(pending={"first": first, "n": len(images), "replaced": replaced}, next_id=first + len(images))
        rows = [
            {
                "id": first + j,
                "path": im.path,
                "attribute": im.attribute or "",
                "sha256": im.sha256,
                "size": int(im.size),
                "mtime": float(im.mtime),
                "embedding": vectors[j],
                "search": space[j],
            }
            for j, im in enumerate(images)
        ]
        for start in range(0, len(rows), 1000):
            self.client.insert(self.name, rows[start : start + 1000])
        if replaced:
            self.client.delete(self.name, ids=replaced)
        counts = _counted(self.state["attributes"], [im.attribute for im in images], [e.attribute for e in old.values()])
        self._commit(images=self.size + len(images) - len(old), attributes=counts, unflushed=self.state["unflushed"] + len(images) + len(old))
        return np.arange(first, first + len(images), dtype=np.int64)

    def remove(self, ids) -> int:
        """Delete catalogue entries by id as one committed update; returns how many were live."""
        self._require_writer()
        live = self.entries(sorted({int(i) for i in ids}))
        if live:
            self.client.delete(self.name, ids=list(live))
            counts = _counted(self.state["attributes"], [], [e.attribute for e in live.values()])
            self._commit(images=self.size - len(live), attributes=counts, unflushed=self.state["unflushed"] + len(live))
        return len(live)

    def touch(self, entry_id: int, size: int, mtime: float) -> None:
        """Record a new size/mtime for a file whose content is unchanged (rewrites its row)."""
        self._require_writer()
        row = self.client.query(self.name, filter=f"id == {int(entry_id)}", output_fields=[*ENTRY_FIELDS, "embedding", "search"])
        if row:
            self.client.upsert(self.name, [{**row[0], "size": int(size), "mtime": float(mtime)}])

    def finish_build(self) -> None:
        """Mark a build complete: from now on `build` refuses to touch it and `add` updates it."""
        self._require_writer()
        if self.state["building"]:
            self.merge(force=True)
            self._commit(building=False)

    def merge(self, force: bool = False, rebuild: bool = False, progress: bool = False) -> bool:
        """Seal new rows into indexed segments once enough piled up, and switch the index type when `auto` calls for another.

        Milvus searches rows it has not sealed yet by brute force (slowly, in Milvus Lite), as the
        FAISS backend scans its tail; sealing (flush) is rate-limited on a cluster, so it waits as long.
        """
        self._require_writer()
        kind = self.settings["kind"]
        wanted = _kind_for(self.size) if kind == "auto" else kind
        if rebuild or wanted != self.state["index_kind"]:
            self._build_search_index(wanted)
        elif force or self.state["unflushed"] > merge_threshold(self.size):
            self.client.flush(self.name)
            self._commit(unflushed=0)
        else:
            return False
        return True

    def compact(self, above: float | None = None) -> bool:
        """Nothing to do: Milvus compacts its own segments, dropping deleted rows in the background."""
        return False

    def reindex(self, kind: str | None = None, params: dict | None = None, progress: bool = False) -> None:
        """Rebuild Milvus's index over the search vectors as another kind or with other parameters."""
        self._require_writer()
        kind = kind or self.settings["kind"]
        _check_options(kind, params)
        self.settings = {**self.settings, "kind": kind, "params": {**self.settings["params"], **(params or {})}}
        self.client.alter_collection_properties(self.name, properties={SETTINGS: json.dumps(self.settings)})
        self.merge(rebuild=True)

    def _build_search_index(self, kind: str) -> None:
        """(Re)build Milvus's index over the search vectors; the raw vectors keep a FLAT index Milvus needs to load them."""
        p = self.settings["params"]
        index_params = self.client.prepare_index_params()
        extra = {"M": int(p["hnsw_m"]), "efConstruction": int(p["ef_construction"])} if kind == "hnsw" else {}
        index_params.add_index(field_name="search", index_type=INDEX_TYPES[kind], metric_type="L2", params=extra)
        existing = set(self.client.list_indexes(self.name))
        if "embedding" not in existing:
            index_params.add_index(field_name="embedding", index_type="FLAT", metric_type="L2")
        try:
            self.client.flush(self.name)
            if "search" in existing:
                self.client.release_collection(self.name)
                self.client.drop_index(self.name, "search")
            self.client.create_index(self.name, index_params)
        except Exception as e:  # noqa: BLE001 - e.g. DiskANN on Milvus Lite
            raise LookalikeError(f"Milvus at {self.uri} cannot build a {INDEX_TYPES[kind]} index ({_reason(e)}); choose another --kind") from None
        self.client.load_collection(self.name)
        self._commit(index_kind=kind, unflushed=0)

    # ---- reading -------------------------------------------------------------------------------

    def shortlists(self, queries: np.ndarray, k: int, params: dict | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query, Milvus's nearest rows in the search space: (ids, raw vectors) to score exactly."""
        if self.size == 0:
            empty = (np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32))
            return [empty] * len(queries)
        p = {**self.settings["params"], **(params or {})}
        exact = self.state["index_kind"] == "flat"
        fetch = min(k + 8 if exact else max(int(p["rerank"]), k), self.size, MAX_RESULTS)
        search_params = {"metric_type": "L2", "params": {} if exact else {"ef": max(int(p["ef_search"]), fetch)}}
        hits = self.client.search(
            self.name, data=list(self.metric.query_space(queries)), anns_field="search", limit=fetch, output_fields=["embedding"], search_params=search_params
        )
        return [
            (np.array([h["id"] for h in found], dtype=np.int64), np.array([h["entity"]["embedding"] for h in found], dtype=np.float32).reshape(len(found), self.dim))
            for found in hits
        ]

    def entries(self, ids) -> dict[int, ImageEntry]:
        ids = [int(i) for i in ids]
        found: dict[int, ImageEntry] = {}
        for start in range(0, len(ids), 1000):
            chunk = ids[start : start + 1000]
            if chunk:
                found.update((e.id, e) for e in map(_entry, self.client.query(self.name, filter=f"id in {chunk}", output_fields=ENTRY_FIELDS)))
        return found

    def entries_by_path(self, prefix: str | None = None) -> dict[str, ImageEntry]:
        """Entries keyed by path, optionally only those at or below a path prefix."""
        if prefix is None:
            return {e.path: e for e in self._scan()}
        below = prefix.rstrip("/")
        expr = f"path == {_literal(prefix)} or (path >= {_literal(below + '/')} and path < {_literal(below + '0')})"  # '0' follows '/'
        return {e.path: e for e in self._scan(expr)}

    def _scan(self, expr: str = "") -> list[ImageEntry]:
        it = self.client.query_iterator(self.name, batch_size=MAX_RESULTS // 2, filter=expr, output_fields=ENTRY_FIELDS)
        found = []
        try:
            while batch := it.next():
                found += map(_entry, batch)
        finally:
            it.close()
        return found

    def vectors_of(self, ids) -> np.ndarray:
        """The raw vectors of live images, in the order of `ids`."""
        ids = [int(i) for i in ids]
        got: dict[int, list] = {}
        for start in range(0, len(ids), 1000):
            chunk = ids[start : start + 1000]
            got.update((r["id"], r["embedding"]) for r in self.client.query(self.name, filter=f"id in {chunk}", output_fields=["id", "embedding"]))
        missing = [i for i in ids if i not in got]
        if missing:
            raise LookalikeError(f"{self.location} has no image with id {missing[0]}")
        return np.array([got[i] for i in ids], dtype=np.float32).reshape(len(ids), self.dim)

    def is_live(self, image_id: int) -> bool:
        return bool(self.entries([image_id]))

    def reuse_vector(self, sha256: str) -> np.ndarray | None:
        """The stored vector of a live image with this content (the content-hash cache)."""
        rows = self.client.query(self.name, filter=f"sha256 == {_literal(sha256)}", output_fields=["embedding"], limit=1)
        return np.array(rows[0]["embedding"], dtype=np.float32) if rows else None

    def attribute_counts(self) -> dict[str, int]:
        """Images per attribute ("(none)": unlabelled), as the collection's state records them."""
        return dict(self.state["attributes"])

    @property
    def build_finished(self) -> bool:
        """False while a build that was interrupted has not been run again to its end."""
        return not self.state["building"]

    def stats(self) -> dict:
        """What the index holds and how Milvus indexes it, for `lookalike index stats`."""
        return {
            "location": self.location,
            "backend": "milvus",
            "images": self.size,
            "build_finished": self.build_finished,
            "attributes": self.attribute_counts(),
            "dim": self.dim,
            "distance": self.metric.describe(),
            "kind_requested": self.settings["kind"],
            "kind": self.state["index_kind"],
            "milvus_index": INDEX_TYPES.get(self.state["index_kind"]),
            "generation": self.generation,
            "backbone_fingerprint": self.settings["backbone_fingerprint"],
            "run_dir": self.settings["run_dir"],
            "params": self.settings["params"],
            "updated": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.state["updated"])),
        }


def _schema(client, dim: int, search_dim: int):
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("path", DataType.VARCHAR, max_length=MAX_PATH_BYTES)
    schema.add_field("attribute", DataType.VARCHAR, max_length=1024)
    schema.add_field("sha256", DataType.VARCHAR, max_length=64)
    schema.add_field("size", DataType.INT64)
    schema.add_field("mtime", DataType.DOUBLE)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("search", DataType.FLOAT_VECTOR, dim=search_dim)
    return schema


def _check_options(kind: str, params: dict | None) -> None:
    if kind != "auto" and kind not in INDEX_TYPES:
        raise LookalikeError(f"unknown Milvus index kind '{kind}'; choose one of: auto, {', '.join(INDEX_TYPES)}", param="kind")
    unknown = set(params or {}) - set(PARAMS)
    if unknown:
        raise LookalikeError(f"unknown Milvus index parameter(s) {sorted(unknown)}; known: {', '.join(PARAMS)}")


def _kind_for(n: int) -> str:
    """Exact while brute force is cheap, a graph beyond (as the FAISS backend chooses)."""
    return "flat" if n < EXACT_BELOW else "hnsw"


def _counted(counts: dict[str, int], added: list, removed: list) -> dict[str, int]:
    """Attribute counts after adding and removing images of these attributes."""
    out = dict(counts)
    for attribute, step in [(a, 1) for a in added] + [(a, -1) for a in removed]:
        key = attribute or "(none)"
        out[key] = out.get(key, 0) + step
    return {a: n for a, n in sorted(out.items()) if n > 0}


def _entry(row: dict) -> ImageEntry:
    return ImageEntry(int(row["id"]), row["path"], row["attribute"] or None, row["sha256"], int(row["size"]), float(row["mtime"]))


def _literal(text: str) -> str:
    """A string as a Milvus filter literal (JSON's escaping is the same)."""
    return json.dumps(text, ensure_ascii=False)


def _reason(e: Exception) -> str:
    return str(getattr(e, "message", None) or e).split("\n")[0]
