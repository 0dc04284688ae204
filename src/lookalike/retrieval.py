"""Query by example against a gallery or a run's test images (tutorial script A1), and embed a whole folder (script A2)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .errors import LookalikeError
from .fileio import atomic_path, save_npy, write_json
from .images import LOOKED_FOR, iter_image_files, scan_images
from .model import ImageEmbedder, SimilarityModel
from .results import Match
from .rundir import RunDir


def retrieve(
    model_dir: str | os.PathLike,
    image: str | os.PathLike,
    top: int = 15,
    split: int = 0,
    picture: str | os.PathLike | None = None,
    gallery: str | os.PathLike | None = None,
    min_probability: float | None = None,
) -> list[Match]:
    """The `top` gallery images most alike to `image` under the learned distance, nearest first, with probabilities.

    The gallery is a folder of images (a top-level sub-folder name is taken as the attribute), or by default
    the test images of split `split` when `model_dir` is a run folder. Matches less likely than `min_probability`
    to share the query's attribute are left out. A grid picture is drawn when `picture` is given.
    """
    model = SimilarityModel.load(model_dir, split)
    query = model.embed(image)[0]
    if gallery is not None:
        features, paths, attributes = _gallery_folder(model, Path(gallery))
    elif (Path(model_dir) / "config.json").is_file():
        run = RunDir(model_dir)
        dataset, members = run.dataset(), run.current_split(split).parts["test"]
        all_features, row_of = run.features(split)
        features = all_features[[row_of[i] for i in members]]
        paths = [str(dataset.absolute_path(i)) for i in members]
        attributes = [dataset.images[i].attribute for i in members]
    else:
        raise LookalikeError(f"{model_dir} is a model folder, which holds no images to search; give a gallery folder of images", param="gallery")
    d = model.distance(query, features)
    p = model.probability(d)
    order = [i for i in np.argsort(d, kind="stable") if min_probability is None or p[i] >= min_probability][:top]
    matches = [Match(None, paths[i], attributes[i], float(d[i]), float(p[i])) for i in order]
    if picture is not None:
        from . import visualize

        visualize.retrieval_grid(str(image), [(m.path, m.distance, m.attribute or "") for m in matches], picture)
    return matches


def _gallery_folder(model: SimilarityModel, folder: Path) -> tuple[np.ndarray, list[str], list[str | None]]:
    """Embeddings (cached by content), paths and attributes (top-level sub-folder) of the images below `folder`."""
    if not folder.is_dir():
        raise LookalikeError(f"gallery {folder} is not a folder of images", param="gallery")
    found = dict(sorted(scan_images(folder)))
    if not found:
        raise LookalikeError(f"no images below the gallery {folder} ({LOOKED_FOR})")
    result = model.embedder_.embed(list(found), progress=len(found) > 50)
    return result.features, list(result.paths), [found[p] for p in result.paths]


def featurize_dir(directory: str | os.PathLike, out: str | os.PathLike, embedder: ImageEmbedder, progress: bool = True) -> dict:
    """Embed every image below `directory`; write .npy (+ .json sidecar of paths) or .parquet by `out`'s suffix.

    `embedder` is a run's SimilarityModel (its backbone, engine and INT8 setting) or an ImageEmbedder of a pretrained backbone.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise LookalikeError(f"{directory} is not a folder; give the folder of images to embed", param="directory")
    out = Path(out)
    if out.suffix not in (".npy", ".parquet"):
        raise LookalikeError(f"{out}: use a .npy (with a .json list of paths beside it) or .parquet file name", param="out")
    paths = sorted(str(p) for p in iter_image_files(directory))  # FIFOs, devices and broken links too: they are reported as skipped
    if not paths:
        raise LookalikeError(f"no images below {directory} ({LOOKED_FOR})")
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
