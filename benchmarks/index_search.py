"""Index benchmark: build time, memory, single-query latency and recall@15 per index kind and size.

Vectors are synthetic but derived from real image features: the EfficientNet-Lite0 embeddings
(1280-d, L2-normalised) of the fashionTexture photos are the seed of a smoothed bootstrap, i.e.
samples from a Gaussian kernel density estimate with the features' own covariance:

    x = clip(f_i + h * (F - mean)^T g / sqrt(n - 1), 0) / norm     (f_i a random real feature, g ~ N(0, I_n))

so every synthetic vector is a real image's embedding moved by noise shaped like the real spread
(h = --bandwidth), clipped at 0 like the post-ReLU features, and re-normalised. The distance is
the learned weighted L2 of a WeightedL2Ranker fitted on pairs of the real features (it has
negative weights, so the MIPS-to-L2 rewrite is exercised). Queries are fresh samples, not in the
index. Every search goes through the product path (lookalike.index.search.search_vectors):
FAISS candidates, exact re-rank from the memory-mapped raw vectors, catalog lookup.

    .venv/bin/python benchmarks/index_search.py --sizes 10000,100000            # minutes
    .venv/bin/python benchmarks/index_search.py --sizes 10000,100000,1000000    # about 45 minutes on 2 cores

"in RAM" is the FAISS index (its file size; the NumPy baseline's matrix); the raw vectors
(n x 1280 x 4 bytes) stay on disk, memory-mapped, and are read only for the re-ranked shortlist.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from lookalike.index.catalog import NewImage
from lookalike.index.metric import IndexMetric
from lookalike.index.search import search_vectors
from lookalike.index.store import ImageIndex
from lookalike.metric.pairs import pair_features
from lookalike.metric.ranker import WeightedL2Ranker

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "fashionTexture"


def real_features(data: Path, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised EfficientNet-Lite0 features of every photo in `data`, and their attribute labels."""
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        return z["features"], z["labels"]
    from lookalike.backbones import create_backbone
    from lookalike.features import embed_paths
    from lookalike.features.extract import l2_normalize

    paths = sorted(p for p in data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    backbone = create_backbone("efficientnet-lite0")
    result = embed_paths(backbone, paths, progress=True)
    names = [Path(p).parent.name for p in result.paths]
    labels = np.unique(names, return_inverse=True)[1]
    feats = l2_normalize(result.features)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, features=feats, labels=labels)
    return feats, labels


def fit_learned_metric(feats: np.ndarray, labels: np.ndarray, seed: int = 0) -> IndexMetric:
    """A learned weighted L2 as the pipeline trains it: linear SVM on squared differences, Platt-calibrated."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, len(feats), 20_000)
    b = rng.integers(0, len(feats), 20_000)
    keep = a != b
    a, b = a[keep], b[keep]
    ranker = WeightedL2Ranker(C=0.1).fit(pair_features(feats[a], feats[b]), (labels[a] == labels[b]).astype(int))
    return IndexMetric.from_ranker(ranker)


class Synthesizer:
    """Samples of a Gaussian KDE around real features (see module docstring)."""

    def __init__(self, feats: np.ndarray, bandwidth: float, seed: int):
        self.feats = feats.astype(np.float32)
        self.centered = ((feats - feats.mean(0)) * (bandwidth / np.sqrt(len(feats) - 1))).astype(np.float32)
        self.rng = np.random.default_rng(seed)

    def sample(self, n: int) -> np.ndarray:
        base = self.feats[self.rng.integers(0, len(self.feats), n)]
        noise = self.rng.standard_normal((n, len(self.feats)), dtype=np.float32) @ self.centered
        x = np.maximum(base + noise, 0.0)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fill_index(directory: Path, metric: IndexMetric, synth: Synthesizer, n: int, chunk: int = 50_000) -> ImageIndex:
    ix = ImageIndex.create(directory, synth.feats.shape[1], metric, kind="flat", overwrite=True)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        images = [NewImage(f"/synthetic/{start + i}.jpg", None, f"{start + i:064x}", 0, 0.0) for i in range(m)]
        ix.add(images, synth.sample(m))
    return ix


class NumpyBruteForce:
    """The best plain-NumPy exact search: one float32 mat-vec per query via the expanded square."""

    def __init__(self, X: np.ndarray, metric: IndexMetric):
        self.X = X
        self.w = metric.weights.astype(np.float32)
        self.row_term = np.concatenate([(np.asarray(X[s : s + 100_000]) ** 2) @ self.w for s in range(0, len(X), 100_000)])

    def search(self, q: np.ndarray, k: int) -> np.ndarray:
        # -(sum w (q - x)^2) ordering = descending (-2 X (w q) + row_term), constant sum w q^2 dropped
        score = self.row_term - 2.0 * (self.X @ (self.w * q))
        top = np.argpartition(-score, k)[:k]
        return top[np.argsort(-score[top])]


def time_queries(fn, queries) -> tuple[np.ndarray, list]:
    out, times = [], []
    for q in queries:
        t = time.perf_counter()
        out.append(fn(q))
        times.append(time.perf_counter() - t)
    return np.asarray(times) * 1000, out


def recall(found: list, truth: list, k: int) -> float:
    return float(np.mean([len(set(map(int, f[:k])) & set(map(int, t[:k]))) / k for f, t in zip(found, truth)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000", help="comma-separated catalog sizes")
    ap.add_argument("--kinds", default="flat,hnsw,ivfpq")
    ap.add_argument("--queries", type=int, default=200, help="single queries timed per kind")
    ap.add_argument("--k", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bandwidth", type=float, default=0.5, help="KDE bandwidth h, as a fraction of the real features' spread")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lookalike-index-bench"))
    ap.add_argument("--params", default="{}", help="JSON index parameters, e.g. '{\"nprobe\": 64}'")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()

    faiss.omp_set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    feats, labels = real_features(args.data, args.workdir / "real_features.npz")
    metric = fit_learned_metric(feats, labels)
    print(f"seed: {len(feats)} real {feats.shape[1]}-d features; {metric.describe()}; bandwidth h={args.bandwidth}; threads={args.threads}")
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        synth = Synthesizer(feats, args.bandwidth, seed=n)
        queries = Synthesizer(feats, args.bandwidth, seed=n + 1).sample(args.queries)
        directory = args.workdir / f"index-{n}"
        t = time.perf_counter()
        ix = fill_index(directory, metric, synth, n)
        print(f"\nn={n:,}: vectors generated and stored in {time.perf_counter() - t:.1f}s")
        brute = NumpyBruteForce(ix.vectors(), metric)
        np_ms, truth = time_queries(lambda q: brute.search(q, args.k), queries)
        rows.append(_row(n, "numpy brute force", None, np_ms, 1.0, brute.X.nbytes))
        print(_fmt(rows[-1]))
        for kind in args.kinds.split(","):
            t = time.perf_counter()
            ix.reindex(kind, json.loads(args.params))
            build_s = time.perf_counter() - t
            ann_bytes = (directory / ix.manifest["ann"]["file"]).stat().st_size
            ms, found = time_queries(lambda q: [m.id for m in search_vectors(ix, q, args.k)[0]], queries)
            rows.append(_row(n, kind, build_s, ms, recall(found, truth, args.k), ann_bytes))
            print(_fmt(rows[-1]))
        ix.close()
        shutil.rmtree(directory)
    print("\n" + _table(rows))
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2))


def _row(n, kind, build_s, ms, rec, index_bytes) -> dict:
    return {
        "n": n,
        "kind": kind,
        "build_s": None if build_s is None else round(build_s, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "recall@15": round(rec, 4),
        "in_RAM_MB": round(index_bytes / 2**20, 1),
    }


def _fmt(r: dict) -> str:
    return "  " + "  ".join(f"{k}={v}" for k, v in r.items())


def _table(rows: list[dict]) -> str:
    head = "| n | kind | build s | p50 ms | p99 ms | recall@15 | in RAM MB |"
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['kind']} | {r['build_s'] if r['build_s'] is not None else '-'} | {r['p50_ms']} | {r['p99_ms']} "
            f"| {r['recall@15']:.3f} | {r['in_RAM_MB']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
