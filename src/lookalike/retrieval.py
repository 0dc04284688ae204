"""Query by example against a run's test images (tutorial script A1) and embed a whole folder (script A2)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from . import visualize
from .errors import LookalikeError
from .fileio import atomic_path, save_npy, write_json
from .images import iter_image_files
from .model import ImageEmbedder, SimilarityModel
from .pipeline import load_dataset, load_features, load_split
from .rundir import RunDir


def retrieve(run_dir: str | os.PathLike, image: str | os.PathLike, top: int = 15, split: int = 0, picture: str | os.PathLike | None = None) -> dict:
    """The `top` test images most alike to `image` under the learned distance, with probabilities."""
    run = RunDir(run_dir)
    model = SimilarityModel.load(run_dir, split)
    feats, ok, skipped = model.embed_paths([image], progress=False)
    if skipped:
        raise LookalikeError(f"{skipped[0]['path']}: {skipped[0]['reason']}")
    dataset = load_dataset(run)
    s = load_split(run, split)
    features, row_of = load_features(run, split)
    gallery = s.parts["test"]
    d = model.distance(feats[0], features[[row_of[i] for i in gallery]])
    p = model.probability(d)
    order = np.argsort(d, kind="stable")[:top]
    results = [
        {"rank": r + 1, "path": str(dataset.absolute_path(gallery[i])), "attribute": dataset.images[gallery[i]].attribute, "distance": float(d[i]), "probability": float(p[i])}
        for r, i in enumerate(order)
    ]
    if picture is None:
        picture = run.root / "retrieval" / f"{Path(image).stem}-top{top}.jpg"
    visualize.retrieval_grid(str(image), [(r["path"], r["distance"], r["attribute"]) for r in results], picture)
    return {"query": str(image), "split": split, "picture": str(picture), "results": results}


def featurize_dir(directory: str | os.PathLike, out: str | os.PathLike, embedder: ImageEmbedder, progress: bool = True) -> dict:
    """Embed every image below `directory`; write .npy (+ .json sidecar of paths) or .parquet by `out`'s suffix.

    `embedder` is a run's SimilarityModel (its backbone, engine and INT8 setting) or an ImageEmbedder of a pretrained backbone.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise LookalikeError(f"{directory} is not a folder; pass the folder of images to embed")
    out = Path(out)
    if out.suffix not in (".npy", ".parquet"):
        raise LookalikeError(f"--out {out}: use a .npy (with a .json list of paths beside it) or .parquet file name")
    paths = sorted(str(p) for p in iter_image_files(directory))  # FIFOs, devices and broken links too: they are reported as skipped
    if not paths:
        raise LookalikeError(f"no images below {directory} (looked for .jpg .jpeg .png .bmp .webp .tif)")
    result = embedder.embed(paths, progress=progress)
    feats = result.features
    rel = [os.path.relpath(p, directory) for p in result.paths]
    info = {"directory": str(directory.resolve()), "backbone": embedder.backbone.config.name, "backbone_fingerprint": embedder.backbone_fingerprint, "dim": int(feats.shape[1]), "n": len(rel), "skipped": result.skipped}
    if out.suffix == ".npy":
        save_npy(out, feats)
        write_json(out.with_suffix(".json"), info | {"paths": rel, "sha256": result.digests})
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"path": rel, "sha256": result.digests, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), feats.shape[1])})
        table = table.replace_schema_metadata({b"lookalike": json.dumps(info).encode()})
        with atomic_path(out, suffix=".parquet") as tmp:
            pq.write_table(table, tmp)
    return info
