"""Featurize throughput: the Ray engine against the single-process path, on the same images and model.

Both paths start cold (an empty feature cache, no shards) and produce the same Parquet output.
The model is loaded before the clock starts; Ray's own start-up (a local instance) is timed apart
and reported, since a real cluster is started once and then serves many jobs.

    .venv/bin/python benchmarks/ray_featurize.py                        # the 557 fashionTexture photos, 2 CPUs
    .venv/bin/python benchmarks/ray_featurize.py --shard-size 32 --num-cpus 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "fashionTexture"


def read_embeddings(path: Path) -> tuple[list[str], np.ndarray]:
    table = pq.read_table(path)
    return table.column("path").to_pylist(), np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--shard-size", type=int, default=64, help="images per shard (Ray's unit of work)")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs given to the local Ray instance")
    args = parser.parse_args()

    from lookalike.backbones import create_backbone
    from lookalike.distributed import ModelSpec, connect, featurize_dir_ray
    from lookalike.distributed.shards import export, read_manifest
    from lookalike.model import ImageEmbedder
    from lookalike.retrieval import featurize_dir

    backbone = create_backbone(args.backbone)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lookalike-ray-bench-") as tmp:
        tmp = Path(tmp)
        os.environ["LOOKALIKE_CACHE_DIR"] = str(tmp / "cache")  # cold cache for the single-process path; Ray workers inherit it
        start = time.perf_counter()
        single = featurize_dir(args.data, tmp / "single.parquet", ImageEmbedder(backbone), progress=False)
        rows.append(("single process", single["n"], time.perf_counter() - start))

        start = time.perf_counter()
        ray, _ = connect(num_cpus=args.num_cpus, object_store_memory=500 * 1024**2)
        startup = time.perf_counter() - start
        shards = str(tmp / "ray-shards")  # a folder output keeps its shards, so the re-run finds every one
        try:
            start = time.perf_counter()
            on_ray = featurize_dir_ray(args.data, shards, ModelSpec.of(args.backbone), backbone, shard_size=args.shard_size, progress=False)
            rows.append((f"ray, cold ({args.num_cpus} CPUs, shards of {args.shard_size})", on_ray["n"], time.perf_counter() - start))
            start = time.perf_counter()
            featurize_dir_ray(args.data, shards, ModelSpec.of(args.backbone), backbone, shard_size=args.shard_size, progress=False)
            rerun = time.perf_counter() - start
        finally:
            ray.shutdown()
        export(shards, tmp / "ray.parquet", read_manifest(shards), on_ray["skipped"])
        paths, X = read_embeddings(tmp / "single.parquet")
        ray_paths, Y = read_embeddings(tmp / "ray.parquet")

    print(f"{len(paths)} images of {args.data} with {args.backbone}; {os.cpu_count()} CPUs on this machine")
    print(f"{'engine':<40} {'images':>7} {'seconds':>8} {'images/s':>9}")
    for name, n, seconds in rows:
        print(f"{name:<40} {n:>7} {seconds:>8.1f} {n / seconds:>9.1f}")
    print(f"{'ray start-up (local instance, once)':<40} {'':>7} {startup:>8.1f}")
    print(f"{'ray re-run (every shard present)':<40} {'':>7} {rerun:>8.1f}")
    same = ray_paths == paths
    print(f"same paths: {same}; max |difference| of embeddings: {np.abs(X - Y).max() if same else float('nan'):.2e}")


if __name__ == "__main__":
    main()
