"""Build or grow an index with a trained run's model: the one library entry behind the CLI, the service and Ray."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import LookalikeError
from .backends import IndexLocation, IndexStore, as_location
from .ingest import IngestReport, check_embedder, ingest, source_paths
from .metric import IndexMetric

log = logging.getLogger(__name__)


class ModelEmbedder:
    """SimilarityModel seen as the index's Embedder."""

    def __init__(self, model, progress: bool = True):
        self.model = model
        self.fingerprint = model.backbone_fingerprint
        self.dim = model.embedding_dim
        self.progress = progress

    def embed(self, paths: list[str]):
        result = self.model.embedder_.embed(paths, progress=self.progress)
        return result.features, result.paths, result.skipped


def absolute(path: str | os.PathLike) -> str:
    """Absolute, with symlinks kept, the way the catalog stores paths."""
    return os.path.abspath(Path(path).expanduser())


def load_model(run: str | os.PathLike | None, index: IndexStore | None = None, progress: bool = True):
    """The SimilarityModel of a model or run folder and its embedder, checked against `index` when one is given."""
    from ..model import SimilarityModel

    run_dir = run or (index.manifest["run_dir"] if index is not None else None)
    if not run_dir:
        raise LookalikeError("this index does not record the model it was built with; name the model (or run) folder to embed with", param="model")
    if not Path(run_dir).is_dir():
        if run:
            raise LookalikeError(f"the model or run folder {run_dir} does not exist", param="model")
        raise LookalikeError(f"the model {run_dir} that {index.location} was built with does not exist (moved?); name the model (or run) folder it was built with", param="model")
    model = SimilarityModel.load(run_dir)
    embedder = ModelEmbedder(model, progress)
    if index is not None:
        check_model(index, model, run_dir)
    return model, embedder


def check_model(index: IndexStore, model, run_dir: str | os.PathLike) -> None:
    """Refuse a model whose vectors or learned distance are not those the index was built with."""
    check_embedder(index, ModelEmbedder(model, progress=False))
    if index.metric.kind == "learned" and IndexMetric.from_ranker(model.ranker_).fingerprint() != index.manifest["metric_fingerprint"]:
        raise LookalikeError(
            f"the learned distance of {run_dir} is not the one {index.location} was built with "
            "(was the metric retrained?); build the index again with `lookalike index build --overwrite`"
        )


def build_index(
    run: str | os.PathLike,
    images: str | os.PathLike,
    out_dir: str | os.PathLike | IndexLocation,
    kind: str = "auto",
    distance: str = "learned",
    overwrite: bool = False,
    chunk: int = 1024,
    progress: bool = True,
) -> tuple[IngestReport, dict]:
    """Embed every image below `images` into a new index at `out_dir` (a folder, or any backend's location); rerunning resumes an interrupted build."""
    model, embedder = load_model(run, progress=progress)
    try:  # before the index is made: a mistyped folder leaves no empty index behind
        source_paths(images)
    except LookalikeError as e:
        raise LookalikeError(str(e), param="images") from None
    metric = IndexMetric.from_ranker(model.ranker_, distance)
    with as_location(out_dir).create(embedder.dim, metric, embedder.fingerprint, kind, run_dir=absolute(run), overwrite=overwrite) as index:
        report = ingest(index, images, embedder, chunk_size=chunk)
        index.finish_build()
        stats = index.stats()
    if note := untrained_attributes_note(stats["attributes"], model.attributes_):
        log.warning(note)
    return report, stats


def untrained_attributes_note(catalog: dict[str, int], trained: list[str]) -> str | None:
    """What a user should know when the catalog's folders name attributes the model never learned (None when it did learn them all)."""
    new = {a: n for a, n in catalog.items() if a != "(none)" and a not in trained}
    if not new:
        return None
    listed = ", ".join(f"{a} ({n} images)" for a, n in sorted(new.items()))
    return (
        f"the model was trained on {', '.join(trained)}, not on {listed}: those photos are found by how they look, but "
        "P(same attribute) was never calibrated on them, so do not filter them by probability; train a model with them "
        "(`lookalike run`) to rank them by attribute too"
    )
