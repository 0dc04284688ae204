"""Featurize images on a Ray cluster: list files -> decode in tasks -> model in an actor pool -> write shards.

The driver lists the images and cuts them into blocks (one block = one shard). Blocks whose shard
already exists are skipped, so an interrupted run resumes. Each remaining block flows through a
Ray Data pipeline: a decode task reads and hashes the files and decodes them exactly as the
single-process path does (same `open_image` decoder with JPEG draft, same `Preprocessor` resize),
an actor holding one copy of the model (on a GPU when the cluster has them) embeds them, and a
small task writes the block's Parquet shard. Unreadable images are reported, never fatal.
Ray is imported only here, and only when this path runs.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import BadImageError, LookalikeError
from ..images import LOOKED_FOR
from ..progress import tqdm
from . import shards as sh
from .sources import is_remote, list_images, read_bytes

#: Ray reads this when it is imported; "0" makes a locally started instance use and bind only 127.0.0.1.
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
#: Resident memory of a decode worker before it holds any pixels (Python, numpy, Pillow, torch imported): ~370 MB measured, plus headroom.
DECODE_WORKER_BYTES = 512 << 20


@dataclass(frozen=True)
class ModelSpec:
    """How every actor rebuilds the driver's model: a run's (refined) backbone, or a named backbone and weights file.

    Workers load it themselves (the run folder or weights file must be readable on every node),
    so no model object is ever serialised; the fingerprint check proves they all got the same one.
    """

    backbone: str = "efficientnet-lite0"
    weights: str | None = None
    run: str | None = None
    split: int = 0
    inference: str = "auto"  # the inference engine (features.engine): auto, torch or onnx

    @classmethod
    def of(cls, backbone: str | None = None, weights=None, run=None, split: int = 0, inference: str = "auto") -> "ModelSpec":
        """Absolute paths, so the spec means the same file on every node."""
        return cls(backbone or "efficientnet-lite0", str(Path(weights).resolve()) if weights else None, str(Path(run).resolve()) if run else None, split, inference)

    def load(self):
        if self.run:
            from ..model import SimilarityModel

            return SimilarityModel.load(self.run, self.split).backbone_
        from ..backbones import create_backbone

        return create_backbone(self.backbone, self.weights)


@contextmanager
def native_stderr_silenced():
    """Send what native code writes straight to file descriptor 2 to /dev/null; Python's sys.stderr keeps the terminal.

    Ray's C++ core writes notes meant for Ray's developers there, at ERROR level and with no setting to turn
    them off (e.g. that a Ray Data actor's constructor arguments sit in the object store, ray-project/ray#53727);
    Ray's own log files (python-core-driver-*.log) keep them. Progress bars, lookalike's messages, Python
    warnings and Ray's Python logging all write through sys.stderr and still reach the user.
    """
    sys.stderr.flush()
    terminal_fd = os.dup(2)
    stderr = sys.stderr
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    if _writes_to_fd_2(stderr):
        sys.stderr = os.fdopen(os.dup(terminal_fd), "w", buffering=1, encoding=getattr(stderr, "encoding", None), errors=getattr(stderr, "errors", None))
    try:
        yield
    finally:
        if sys.stderr is not stderr:
            sys.stderr.close()
            sys.stderr = stderr
        os.dup2(terminal_fd, 2)
        os.close(terminal_fd)


def _writes_to_fd_2(stream) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a stream that stands in for stderr (a test runner's capture)
        return False


def connect(address: str | None = None, **init_kwargs):
    """(ray, started): join the cluster at `address` ("auto", "ray://host:10001"), or start a private local instance.

    A local instance gets no dashboard and listens on 127.0.0.1 only. Returns started=True when
    this call started Ray, so the caller knows to shut it down; an already initialised Ray is reused.
    """
    if address is None:
        os.environ.setdefault(LOCAL_ONLY_ENV, "0")
    try:
        import ray
    except ImportError:
        raise LookalikeError("running on Ray needs Ray; install it with: pip install 'lookalike[ray]'", param="executor") from None
    if ray.is_initialized():
        return ray, False
    # Workers' output stays in Ray's log files; the driver shows Ray's errors, not its warnings and notes.
    kwargs = {"log_to_driver": False, "logging_level": logging.ERROR}
    if address is None:
        kwargs["include_dashboard"] = False
    try:
        ray.init(address=address, **kwargs, **init_kwargs)
    except (ConnectionError, ValueError, RuntimeError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise LookalikeError(f"cannot start or reach {where}: {e}. Start a cluster with `ray start --head` and pass --address auto, or omit --address") from None
    return ray, True


def decode_block(row: dict, config: dict) -> dict:
    """Read, hash and decode one block's images into (n, S, S, 3) uint8 pixels, already resized and cropped.

    The model actor applies `Preprocessor.normalize`, the rest of `Preprocessor.array`, so its input is bit-for-bit
    what the single-process path feeds the network.
    """
    import hashlib

    from ..backbones import BackboneConfig, Preprocessor
    from ..images import open_image_bytes, skipped_file

    pre = Preprocessor(BackboneConfig(**config))
    keep, digests, pixels, failed = [], [], [], []
    for i, uri in enumerate(row["paths"]):
        try:
            data = read_bytes(uri)
            img = pre.resize(open_image_bytes(data, uri, draft_size=pre.size))
        except (BadImageError, OSError) as e:
            failed.append(skipped_file(uri, e))
            continue
        keep.append(i)
        digests.append(hashlib.sha256(data).hexdigest())
        pixels.append(np.asarray(img, dtype=np.uint8))
    kept = {name: [row[name][i] for i in keep] for name in ("paths", "attributes", "sizes", "mtimes")}
    return {
        "block": row["block"],
        "shard": row["shard"],
        **kept,
        "sha256": digests,
        "pixels": np.stack(pixels) if pixels else np.zeros((0, pre.size, pre.size, 3), np.uint8),
        "failed": json.dumps(failed),
    }


class BlockEmbedder:
    """A Ray Data actor: one model, loaded once, turning a block's pixels into unit-length embeddings.

    It runs the same inference engine the single-process path picks (`create_engine`, "auto":
    ONNX Runtime on CPU, PyTorch on a GPU), on `threads` cores.
    """

    def __init__(self, spec: ModelSpec, fingerprint: str, batch_size: int, threads: int, use_gpu: bool):
        import torch

        from ..backbones import Preprocessor
        from ..features import create_engine

        torch.set_num_threads(max(1, threads))
        backbone = spec.load()
        if use_gpu and torch.cuda.is_available():
            backbone.to("cuda")
        self.engine = create_engine(backbone, spec.inference, threads=max(1, threads))
        if self.engine.fingerprint != fingerprint:
            raise LookalikeError(
                f"a Ray worker loaded a different model (fingerprint {self.engine.fingerprint}, driver {fingerprint}); "
                "give every node the same weights file or run folder at the same path"
            )
        self.pre = Preprocessor(backbone.config)
        self.dim = backbone.config.embedding_dim
        self.batch_size = batch_size

    def __call__(self, row: dict) -> dict:
        from ..features.extract import l2_normalize

        pixels = row.pop("pixels")
        out = np.zeros((len(pixels), self.dim), dtype=np.float32)
        for start in range(0, len(pixels), self.batch_size):
            batch = np.stack([self.pre.normalize(p) for p in pixels[start : start + self.batch_size]])
            out[start : start + len(batch)] = self.engine(batch)
        row["embedding"] = l2_normalize(out)
        return row


def write_block(row: dict, shards_dir: str, fingerprint: str, dim: int) -> dict:
    """Write one block's shard (atomically) and pass on only its counts."""
    failed = json.loads(row["failed"])
    table = sh.shard_table(row["paths"], row["attributes"], row["sha256"], row["sizes"], row["mtimes"], row["embedding"], failed, row["block"], fingerprint, dim)
    sh.write_shard(table, shards_dir, row["shard"])
    return {"block": row["block"], "embedded": len(row["paths"]), "failed": len(failed)}


def featurize_ray(
    source: str,
    shards_dir: str,
    spec: ModelSpec,
    backbone=None,
    address: str | None = None,
    shard_size: int = 256,
    batch_size: int = 32,
    actors: int | None = None,
    actor_cpus: int = 1,
    progress: bool = True,
) -> dict:
    """Embed every image below `source` into Parquet shards in `shards_dir`; returns the manifest (+ failed images).

    `backbone` is the driver's copy of `spec`'s model when the caller has one loaded already.
    `actors` defaults to one per GPU, or on CPU-only clusters to three quarters of the CPUs
    (`actor_cpus` each), leaving the rest for decoding.
    """
    backbone = backbone if backbone is not None else spec.load()
    fingerprint, dim = backbone.fingerprint, backbone.config.embedding_dim
    source, shards_dir = str(source), str(shards_dir)
    images = list_images(source)
    if not images:
        raise LookalikeError(f"no images below {source} ({LOOKED_FOR})")
    plan = sh.plan_blocks(images, shard_size, fingerprint, shards_dir)
    if plan.todo:
        with native_stderr_silenced():
            ray, started = connect(address)
            try:
                _run(ray, plan, spec, backbone, shards_dir, batch_size, actors, actor_cpus, progress)
            finally:
                if started:
                    ray.shutdown()
    n, failed = 0, []
    for block in plan.blocks:
        rows, meta = sh.shard_summary(shards_dir, block.shard)
        n += rows
        failed.extend(meta["failed"])
    info = {
        "format": sh.FORMAT,
        "source": source if is_remote(source) else str(Path(source).resolve()),
        "backbone": backbone.config.name,
        "backbone_fingerprint": fingerprint,
        "dim": dim,
        "n": n,
        "n_failed": len(failed),
        "shard_size": shard_size,
        "shards": [b.shard for b in plan.blocks],
        "blocks_embedded": len(plan.todo),
        "blocks_resumed": len(plan.done),
    }
    sh.write_manifest(shards_dir, info, failed)
    return info | {"failed": failed}


def _quiet_console(logger_name: str) -> None:
    """Show only errors of `logger_name` on the terminal; its log files (Ray Data keeps one per session) keep everything."""
    for handler in logging.getLogger(logger_name).handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR)


def _run(ray, plan: sh.Plan, spec: ModelSpec, backbone, shards_dir: str, batch_size: int, actors: int | None, actor_cpus: int, progress: bool) -> None:
    import ray.data

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Ray's own context defaults trip its deprecation checks
        ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    _quiet_console("ray.data")
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    if actors is None:
        actors = gpus or max(1, (cpus - max(1, cpus // 4)) // actor_cpus)
    size = backbone.config.input_size
    largest = max(len(b.images) for b in plan.todo)
    ds = ray.data.from_items([b.to_row() for b in plan.todo], override_num_blocks=len(plan.todo))
    # The memory hint (a worker with torch imported, plus the block's pixels) also keeps Ray from fusing decoding into the model actors.
    ds = ds.map(decode_block, fn_kwargs={"config": asdict(backbone.config)}, num_cpus=1, memory=DECODE_WORKER_BYTES + 2 * largest * size * size * 3)
    ds = ds.map(
        BlockEmbedder,
        fn_constructor_kwargs={"spec": spec, "fingerprint": backbone.fingerprint, "batch_size": batch_size, "threads": actor_cpus, "use_gpu": gpus > 0},
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=actor_cpus,
        num_gpus=1 if gpus else 0,
    )
    ds = ds.map(write_block, fn_kwargs={"shards_dir": shards_dir, "fingerprint": backbone.fingerprint, "dim": backbone.config.embedding_dim}, num_cpus=0.25)
    total = sum(len(b.images) for b in plan.todo)
    where = f"{gpus} GPU actor(s)" if gpus else f"{actors} CPU actor(s)"
    bar = tqdm(total=total, desc=f"Embedding on Ray ({backbone.config.name}, {where})", unit="img", disable=not progress)
    try:
        for row in ds.iter_rows():
            bar.update(row["embedded"] + row["failed"])
    except ray.exceptions.RayError as e:
        cause = next((line for line in reversed(str(e).splitlines()) if line.strip()), type(e).__name__)
        raise LookalikeError(f"the Ray pipeline failed: {cause}. Finished shards in {shards_dir} are kept; run the same command again to continue") from None
    finally:
        bar.close()


def featurize_dir_ray(directory, out, spec: ModelSpec, backbone=None, address: str | None = None, shard_size: int = 256, progress: bool = True, **options) -> dict:
    """`lookalike featurize-dir --executor ray`: the same output as the single-process path, computed on Ray.

    OUT.npy (+ OUT.json) or OUT.parquet hold what the single-process path writes; they are made from
    shards in OUT.npy.shards/ (or OUT.parquet.shards/), removed once OUT is written and kept after a
    failure, so that a re-run resumes. An OUT without a suffix (a folder or bucket prefix) receives
    only the shards, the form to use for millions of images.
    """
    from pathlib import PurePosixPath

    out = str(out)
    suffix = PurePosixPath(out).suffix
    if suffix and suffix not in (".npy", ".parquet"):
        raise LookalikeError(f"--out {out}: use FILE.npy, FILE.parquet, or a folder name (no suffix) to keep only the Parquet shards")
    if suffix and is_remote(out):
        raise LookalikeError(f"--out {out}: a .npy or .parquet output is written on this machine; give a local file, or a folder / bucket prefix for the shards alone")
    shards_dir = f"{out}.shards" if suffix else out
    info = featurize_ray(directory, shards_dir, spec, backbone, address, shard_size, progress=progress, **options)
    failed = info.pop("failed")
    if suffix:
        summary = sh.export(shards_dir, out, info, failed)
        sh.remove_shards(shards_dir)
        return summary
    return info | {"directory": info["source"], "skipped": failed, "shards": shards_dir, "engine": "ray"}
