"""The Milvus backend beside the FAISS one: build time, single-query latency and agreement per size.

Both backends get the same vectors (index_search.py's smoothed bootstrap around the real
fashionTexture features, 1280-d) and the same learned weighted L2; every search goes through the
product path (lookalike.index.search.search_vectors: candidates, exact re-rank, catalog lookup).
"same top-15" is the share of queries whose 15 ids are identical in both backends, "max |d diff|"
the largest distance difference among them. The Milvus side is Milvus Lite (a file) by default;
pass --uri http://host:19530 to measure a server.

    .venv/bin/python benchmarks/milvus_index.py --sizes 10000 --json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from index_search import DEFAULT_DATA, Synthesizer, fit_learned_metric, real_features, time_queries  # noqa: E402

from lookalike.index.backends import IndexLocation  # noqa: E402
from lookalike.index.catalog import NewImage  # noqa: E402
from lookalike.index.milvus import disconnect  # noqa: E402
from lookalike.index.search import search_vectors  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000", help="comma-separated catalog sizes")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--uri", help="a Milvus server; default a Milvus Lite file in --workdir")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lookalike-milvus-bench"))
    ap.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    args = ap.parse_args()

    feats, labels = real_features(args.data, args.workdir / "real_features.npz")
    metric = fit_learned_metric(feats, labels)
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        X = Synthesizer(feats, 0.5, seed=n).sample(n)
        queries = Synthesizer(feats, 0.5, seed=n + 1).sample(args.queries)
        images = [NewImage(f"/synthetic/{i}.jpg", None, f"{i:064x}", 0, 0.0) for i in range(n)]
        uri = args.uri or str(args.workdir / f"milvus-{n}.db")
        answers = {}
        for location in (IndexLocation.parse(args.workdir / f"faiss-{n}"), IndexLocation.parse("bench", "milvus", uri)):
            start = time.perf_counter()
            with location.create(X.shape[1], metric, kind="flat", overwrite=True) as index:
                for first in range(0, n, 5000):
                    index.add(images[first : first + 5000], X[first : first + 5000])
                index.merge(force=True)
                build_s = time.perf_counter() - start
                ms, found = time_queries(lambda q: search_vectors(index, q, 15)[0], queries)
            answers[location.backend] = found
            rows.append({"n": n, "backend": location.backend, "build_s": round(build_s, 1), "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)})
        same = [[m.id for m in a] == [m.id for m in b] for a, b in zip(answers["faiss"], answers["milvus"])]
        diff = max(abs(x.distance - y.distance) for a, b in zip(answers["faiss"], answers["milvus"]) for x, y in zip(a, b))
        rows[-1].update(same_top15=round(float(np.mean(same)), 4), max_distance_diff=float(f"{diff:.2e}"))
        if args.uri is None:
            disconnect(uri)
            shutil.rmtree(uri, ignore_errors=True)
        shutil.rmtree(args.workdir / f"faiss-{n}", ignore_errors=True)
        if not args.json:
            print(*(json.dumps(r) for r in rows[-2:]), sep="\n")
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    sys.exit(main())
