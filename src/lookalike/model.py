"""The similarity model: images -> embeddings -> a learned distance and a calibrated P(same attribute).

`SimilarityModel` is the library's front door for training and using a model (scikit-learn style:
parameters in `__init__`, `fit` returns self, learned attributes end in `_`). `ImageEmbedder` is the
part that turns images into unit vectors with one backbone; the index, the service and Ray use it.

A saved model is a self-contained folder (`save` / `load`):
    model.json            the model card: format, attributes, data summary, config, fingerprint, evaluation
    README.md             the same card for people
    backbone.safetensors  backbone (and head) weights; backbone.json its config
    ranker.json           the learned weighted-L2 distance and its Platt calibration
    training/             history.json, curves.png, train_metric.json, calibration.png of the fit
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

import numpy as np
from PIL import Image
from pydantic import BaseModel, ValidationError

from .backbones import SavedBackbone
from .config import LookalikeConfig, format_validation_error, stored_config
from .errors import BadImageError, ConfigError, LookalikeError
from .features import Engine, FeatureCache, configured_cache_dir, create_engine, default_cache_dir, embed_paths
from .features.extract import EmbeddingResult, embed_images, l2_normalize
from .fileio import read_json, write_json, write_text
from .images import to_rgb
from .metric import WeightedL2Ranker
from .results import shown_distance
from .rundir import RunDir, fingerprint

if TYPE_CHECKING:
    from .backbones import Backbone

MODEL_FORMAT = "lookalike.model/1"
CARD, RANKER = "model.json", "ranker.json"
TRAINING_RECORDS = ("refined/history.json", "refined/curves.png", "train_metric.json", "calibration.png")

#: What `embed` and `compare` take: a file path, a PIL image, or an (H, W, 3) uint8 array.
ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]


@dataclass(frozen=True)
class Comparison:
    """How alike two images are: the learned distance (lower = more alike) and the calibrated P(same attribute)."""

    distance: float
    probability: float


class ImageEmbedder:
    """Images -> unit-length embeddings with one backbone: its engine (ONNX / INT8 / PyTorch) and its feature cache."""

    def __init__(self, backbone: Backbone | SavedBackbone, cache_dir: str | os.PathLike | None = None, engine: str = "auto", quantize: bool = False):
        self.backbone = backbone
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.engine_kind = engine
        self.quantize = quantize
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()

    def engine(self, calibration_paths: Sequence[str | os.PathLike] = ()) -> Engine:
        """The inference engine, built on first use (ONNX export and INT8 calibration are cached on disk)."""
        with self._engine_lock:
            if self._engine is None:
                self._engine = create_engine(self.backbone, self.engine_kind, self.quantize, self.cache_dir, calibration_paths)
            return self._engine

    @property
    def backbone_fingerprint(self) -> str:
        """Names the vectors this model makes: the backbone's, plus an INT8 suffix when quantised."""
        return self.engine().fingerprint if self.quantize else self.backbone.fingerprint

    @property
    def embedding_dim(self) -> int:
        return self.backbone.config.embedding_dim

    def embed(self, paths: Sequence[str | os.PathLike], progress: bool = True, batch_size: int = 32) -> EmbeddingResult:
        """Unit-length embeddings of the readable files, with their paths, content hashes and the skipped files."""
        engine = self.engine(calibration_paths=paths)
        with FeatureCache(self.cache_dir, engine.fingerprint, self.embedding_dim) as cache:
            result = embed_paths(engine, paths, batch_size, cache=cache, progress=progress)
        return replace(result, features=l2_normalize(result.features))

    def embed_image(self, img: Image.Image) -> np.ndarray:
        """Unit-length embedding of an image already in memory (e.g. an upload)."""
        return self.embed_images([img])[0]

    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """Unit-length embeddings of images already in memory, a batch at a time."""
        return embed_images(self.engine(), images, batch_size)


class SimilarityModel:
    """Embeds images and says how alike two are: a learned distance and a calibrated P(same attribute).

    Parameters are the sections of `lookalike.toml` (each a dict of that section's keys), so
    ``SimilarityModel(**tomllib.load(f))`` and the CLI's ``--config`` train the same model.

    Parameters
    ----------
    backbone : str, optional
        Backbone name (``features.backbone``), e.g. ``"efficientnet-lite0"``; see ``lookalike backbones``.
    data, features, refine, metric, evaluate : dict, optional
        Keys of those sections of the configuration (``docs``: lookalike.toml), e.g. ``refine={"epochs": 10}``.

    Attributes
    ----------
    backbone_ : Backbone or SavedBackbone
        The (refined) network that embeds images; a loaded model's is built only if PyTorch must run it.
    ranker_ : WeightedL2Ranker
        The learned weighted-L2 distance and its Platt calibration.
    attributes_ : list of str
        The attribute values the model was trained on.
    card_ : dict
        The model card (what ``model.json`` holds).

    Examples
    --------
    >>> model = SimilarityModel(refine={"epochs": 10}).fit("data/")   # doctest: +SKIP
    >>> model.compare("a.jpg", "b.jpg").probability                  # doctest: +SKIP
    0.93
    """

    def __init__(
        self,
        backbone: str | None = None,
        data: dict | None = None,
        features: dict | None = None,
        refine: dict | None = None,
        metric: dict | None = None,
        evaluate: dict | None = None,
    ):
        self.backbone = backbone
        self.data = data
        self.features = features
        self.refine = refine
        self.metric = metric
        self.evaluate = evaluate

    # ---- parameters ----------------------------------------------------------------------------

    def get_params(self) -> dict[str, Any]:
        """The constructor's parameters, as scikit-learn's `get_params` gives them."""
        return {k: getattr(self, k) for k in ("backbone", "data", "features", "refine", "metric", "evaluate")}

    def config(self) -> LookalikeConfig:
        """The full, validated configuration these parameters mean; a ConfigError names any bad key."""
        sections = {k: _section(v) for k, v in self.get_params().items() if k != "backbone"}
        if self.backbone is not None:
            sections["features"] = sections.get("features", {}) | {"backbone": self.backbone}
        try:
            return LookalikeConfig.model_validate(sections)
        except ValidationError as e:
            raise ConfigError(f"invalid SimilarityModel parameters:\n{format_validation_error(e)}") from None

    @classmethod
    def from_config(cls, cfg: LookalikeConfig) -> "SimilarityModel":
        """The model these settings describe; only the values that differ from the defaults become parameters."""
        sections = cfg.model_dump(exclude_defaults=True, exclude={"features": {"backbone"}})
        return cls(backbone=cfg.features.backbone, **{name: keys for name, keys in sections.items() if keys})

    # ---- training ------------------------------------------------------------------------------

    def fit(self, data: str | os.PathLike | Sequence[str | os.PathLike], labels: Sequence[str] | None = None, *, work_dir: str | os.PathLike | None = None, progress: bool = True) -> "SimilarityModel":
        """Train on every labelled photo, keeping a validation slice for calibration.

        Parameters
        ----------
        data : path or list of paths
            A folder with one sub-folder per attribute value, or image paths (then give `labels`).
        labels : list of str, optional
            The attribute of each image in `data` when it is a list of paths.
        work_dir : path, optional
            Where the stages keep their outputs; a rerun with the same one skips finished work. Default: a temporary folder.
        progress : bool
            Show progress bars.

        Returns
        -------
        SimilarityModel
            self, fitted.
        """
        from .data import dataset_from_files
        from .pipeline import train_on_all

        cfg = self.config()
        if labels is not None:
            dataset = dataset_from_files(list(data), list(labels), progress=progress)
        elif isinstance(data, (str, os.PathLike)):
            dataset = Path(data)
        else:
            raise LookalikeError("fit takes a folder with one sub-folder per attribute, or a list of image paths and labels=[one attribute per image]")
        with tempfile.TemporaryDirectory(prefix="lookalike-fit-") as tmp:
            run = train_on_all(dataset, work_dir or tmp, cfg, progress=progress)
            backbone, ranker = _portable_backbone(run, cfg, Path(tmp) / "portable"), WeightedL2Ranker.load(run.split_dir(0) / "metric.json")
            self._set_fitted(backbone, ranker, cfg, _card(run, cfg, backbone, ranker))
            self._training = {name: (run.split_dir(0) / name).read_bytes() for name in TRAINING_RECORDS if (run.split_dir(0) / name).exists()}
        return self

    def _set_fitted(self, backbone: Backbone | SavedBackbone, ranker: WeightedL2Ranker, cfg: LookalikeConfig, card: dict | Callable[[], dict]) -> None:
        self.backbone_ = backbone
        self.ranker_ = ranker
        self._card = card
        self.embedder_ = ImageEmbedder(backbone, configured_cache_dir(cfg.features.cache_dir), cfg.features.engine, cfg.features.quantize)

    @property
    def card_(self) -> dict:
        """The model card (what `model.json` holds); a run's is made from its files on first use."""
        if callable(self._card):
            self._card = self._card()
        return self._card

    @property
    def attributes_(self) -> list[str]:
        return list(self.card_["attributes"])

    def _check_fitted(self) -> None:
        if not hasattr(self, "ranker_"):
            raise LookalikeError("this SimilarityModel is not trained yet; call fit(...) first or SimilarityModel.load(folder)")

    # ---- saving and loading --------------------------------------------------------------------

    def save(self, path: str | os.PathLike, evaluation: str | os.PathLike | None = None) -> Path:
        """Write the self-contained model folder (replacing an earlier model there, never anything else).

        Parameters
        ----------
        path : path
            The folder to write; it appears complete or not at all.
        evaluation : path, optional
            A run folder of `lookalike run` on the same data; its metrics go into the model card.

        Returns
        -------
        Path
            The model folder.
        """
        self._check_fitted()
        path = Path(path).expanduser()
        if not may_hold_model(path):
            raise LookalikeError(f"{path} exists and is not a lookalike model folder; choose another folder, or remove it first")
        card = dict(self.card_)
        if evaluation is not None:
            card["evaluation"] = _evaluation_summary(RunDir(evaluation))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            _save_backbone(self.backbone_, tmp)
            self.ranker_.save(tmp / RANKER)
            for name, content in getattr(self, "_training", {}).items():
                (tmp / "training").mkdir(exist_ok=True)
                (tmp / "training" / Path(name).name).write_bytes(content)
            write_json(tmp / CARD, card)
            write_text(tmp / "README.md", model_card_markdown(card))
            old = path.with_name(f".{path.name}.old") if path.exists() else None
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
                path.rename(old)
            tmp.rename(path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._card = card
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, split: int = 0) -> "SimilarityModel":
        """A trained model from a model folder (`lookalike fit`, `save`) or from split `split` of a run folder (`lookalike run`).

        Parameters
        ----------
        path : path
            The model folder or run folder.
        split : int
            Which split's model, for a run folder.

        Returns
        -------
        SimilarityModel
        """
        path = Path(path).expanduser()
        if (path / CARD).is_file():
            card = read_json(path / CARD)
            if card.get("format") != MODEL_FORMAT:
                raise LookalikeError(f"{path / CARD} is a model of format {card.get('format')!r}; this lookalike reads {MODEL_FORMAT}")
            cfg = stored_config(card["config"], str(path / CARD))
            backbone, ranker = SavedBackbone(path), WeightedL2Ranker.load(path / RANKER)
        elif (path / "config.json").is_file():
            run = RunDir(path)
            cfg = run.config()
            run.check_split(split, cfg)  # refuses a split folder left from another dataset, whose model is not this run's
            ranker = WeightedL2Ranker.load(run.require(run.split_dir(split) / "metric.json", "train-metric"))
            backbone = run.backbone(split, cfg)
            card = partial(_card, run, cfg, backbone, ranker, split)  # read from the run's files only when asked for
        else:
            raise LookalikeError(
                f"{path} is neither a model folder (with model.json, written by `lookalike fit`) nor a run folder "
                "(with config.json, written by `lookalike run`); pass one of those"
            )
        model = cls.from_config(cfg)
        model._set_fitted(backbone, ranker, cfg, card)
        model.source_ = str(path.resolve())
        return model

    # ---- using it ------------------------------------------------------------------------------

    def embed(self, images: ImageLike | Sequence[ImageLike], batch_size: int = 32, skipped: list | None = None) -> np.ndarray:
        """Unit-length embeddings, one row per image.

        Parameters
        ----------
        images : path, PIL image, (H, W, 3) uint8 array, or a list of them
            Files are decoded as the index decodes them; an unreadable one raises BadImageError naming it.
        batch_size : int
            Images per forward pass.
        skipped : list, optional
            Instead of raising, list each unreadable file here ({"path", "reason"}); its row stays zeros.

        Returns
        -------
        numpy.ndarray of shape (n_images, embedding_dim)
        """
        self._check_fitted()
        single = isinstance(images, (str, os.PathLike, Image.Image)) or (isinstance(images, np.ndarray) and images.ndim == 3)
        items = [images] if single else list(images)
        out = np.zeros((len(items), self.embedding_dim), np.float32)
        files = [i for i, x in enumerate(items) if isinstance(x, (str, os.PathLike))]
        if files:
            result = self.embedder_.embed([items[i] for i in files], progress=False, batch_size=batch_size)
            if result.skipped and skipped is None:
                raise BadImageError(result.skipped[0]["path"], result.skipped[0]["reason"])
            if skipped is not None:
                skipped.extend(result.skipped)
            row_of = {p: r for r, p in enumerate(result.paths)}
            readable = [i for i in files if str(items[i]) in row_of]
            out[readable] = result.features[[row_of[str(items[i])] for i in readable]]
        pictures = [i for i in range(len(items)) if i not in set(files)]
        if pictures:
            out[pictures] = self.embedder_.embed_images([_as_image(items[i], i) for i in pictures], batch_size)
        return out

    def compare(self, a: ImageLike, b: ImageLike) -> Comparison:
        """How alike two images are.

        Parameters
        ----------
        a, b : path, PIL image or (H, W, 3) uint8 array

        Returns
        -------
        Comparison
            ``.distance`` (learned, lower = more alike) and ``.probability`` (calibrated P(same attribute)).
        """
        va, vb = self.embed([a, b])
        d = shown_distance(self.distance(va, vb)[0])
        return Comparison(d, float(self.probability(d)))

    def distance(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Learned distance from embedding `a` to each row of `b`."""
        self._check_fitted()
        return self.ranker_.distance(a, np.atleast_2d(b))

    def probability(self, distances) -> np.ndarray:
        """Calibrated P(same attribute) of learned distances."""
        self._check_fitted()
        return self.ranker_.probability(distances)

    # the embedding plumbing the index, the service and Ray use
    @property
    def embedding_dim(self) -> int:
        return self.backbone_.config.embedding_dim

    @property
    def backbone_fingerprint(self) -> str:
        return self.embedder_.backbone_fingerprint

    def engine(self, calibration_paths: Sequence[str | os.PathLike] = ()) -> Engine:
        return self.embedder_.engine(calibration_paths)

    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        return self.embedder_.embed_images(images, batch_size)

    def embed_image(self, img: Image.Image) -> np.ndarray:
        return self.embedder_.embed_image(img)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items() if v is not None)
        return f"SimilarityModel({shown})"


def may_hold_model(path: Path) -> bool:
    """Whether `save` may write a model folder at `path`: nothing there, an empty folder, or an earlier model."""
    return not path.exists() or (path / CARD).is_file() or (path.is_dir() and not any(path.iterdir()))


def _section(value) -> dict:
    if value is None:
        return {}
    if isinstance(value, BaseModel):
        return value.model_dump()
    if isinstance(value, dict):
        return dict(value)
    raise ConfigError(f"a SimilarityModel section must be a dict of that section's keys, not {type(value).__name__}")


def _as_image(item, position: int) -> Image.Image:
    if isinstance(item, Image.Image):
        return to_rgb(item)
    if isinstance(item, np.ndarray) and item.ndim == 3 and item.shape[2] == 3 and item.dtype == np.uint8:
        return Image.fromarray(item, "RGB")
    raise LookalikeError(f"image {position}: expected a file path, a PIL image or an (H, W, 3) uint8 array, not {type(item).__name__}"
                         + (f" of shape {item.shape} and dtype {item.dtype}" if isinstance(item, np.ndarray) else ""))


def _portable_backbone(run: RunDir, cfg: LookalikeConfig, scratch: Path) -> Backbone:
    """The run's backbone as a saved file, so the model's fingerprint is the same before and after `save`.

    It is built now (its files may be in a temporary folder), so `save` writes it anew, to the same bytes.
    """
    from .backbones.registry import load_backbone, save_backbone

    refined = run.split_dir(0) / "refined"
    if not (refined / "backbone.json").exists():
        save_backbone(run.backbone(0, cfg), scratch)
        refined = scratch
    return load_backbone(refined)


def _save_backbone(backbone: Backbone | SavedBackbone, directory: Path) -> None:
    """A loaded model's files are copied byte for byte; a trained one is written (safetensors), to the same fingerprint."""
    from .backbones.registry import save_backbone

    if isinstance(backbone, SavedBackbone):
        backbone.copy_to(directory)
    else:
        save_backbone(backbone, directory)


def _card(run: RunDir, cfg: LookalikeConfig, backbone: Backbone | SavedBackbone, ranker: WeightedL2Ranker, split: int | None = None) -> dict:
    """What `model.json` says about a model trained in `run`."""
    from .version import __version__

    dataset = run.dataset()
    s = run.split(0 if split is None else split)
    counts = {a: sum(im.attribute == a for im in dataset.images) for a in dataset.attributes}
    return {
        "format": MODEL_FORMAT,
        "lookalike_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": fingerprint(backbone.fingerprint, ranker.to_dict()),
        "attributes": dataset.attributes,
        "data": {
            "root": dataset.root,
            "images": len(dataset.images),
            "per_attribute": counts,
            "skipped": len(dataset.skipped),
            "trained_on": len(s.parts["train"]),
            "calibrated_on": len(s.parts.get("validation", [])),
        },
        "backbone": {
            "name": backbone.config.name,
            "input_size": backbone.config.input_size,
            "embedding_dim": backbone.config.embedding_dim,
            "fingerprint": backbone.fingerprint,
            "head": backbone.head_description,
        },
        "source": {"run": str(run.root.resolve()), "split": split} if split is not None else {"trained_on": "all labelled images"},
        "config": cfg.model_dump(),
    }


def _evaluation_summary(run: RunDir) -> dict:
    """The metrics of a `lookalike run` evaluation, for the model card."""
    metrics = read_json(run.require(run.metrics, "run"))
    return {
        "run": str(run.root.resolve()),
        "splits": metrics["splits"],
        "n_test_queries": metrics["n_test_queries"],
        "distances": metrics["distances"],
        "gallery": metrics.get("gallery", {}),
        "lookalike_search": metrics.get("lookalike_search", {}),
    }


def model_card_markdown(card: dict) -> str:
    """README.md of a model folder: what it is, what it was trained on, how it scored, how to use it."""
    d, b = card["data"], card["backbone"]
    lines = [
        f"# lookalike model `{card['fingerprint']}`",
        "",
        f"An image similarity ranker for the attributes {', '.join(card['attributes'])}: a {b['name']} backbone "
        f"({b['input_size']} px input, {b['embedding_dim']}-d embedding) and a learned weighted-L2 distance with a calibrated P(same attribute).",
        "",
        "## Data",
        "",
        f"- {d['images']} images from `{d['root']}` ({', '.join(f'{a}: {n}' for a, n in d['per_attribute'].items())}); {d['skipped']} skipped",
        f"- trained on {d['trained_on']}, calibrated on {d['calibrated_on']} held-out images",
        "",
        "## Evaluation",
        "",
    ]
    ev = card.get("evaluation")
    if ev:
        lines += [f"From `{ev['run']}` ({ev['splits']} random splits, {ev['n_test_queries']} test queries each): rank of 1 positive among the negatives.", "",
                  "| distance | top-1 | top-5 | mean rank |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {m['top1']:.1%} | {m['top5']:.1%} | {m['mean_rank']:.2f} |" for name, m in ev["distances"].items()]
    else:
        lines.append("None attached. Run `lookalike run --data DATA --out RUN --splits 5` and save with `lookalike fit ... --evaluation RUN`.")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from lookalike import SimilarityModel",
        "model = SimilarityModel.load(\"this/folder\")",
        "model.compare(\"a.jpg\", \"b.jpg\")",
        "```",
        "",
        "or `lookalike index build --model this/folder --images CATALOG --out catalog.index`.",
        "",
    ]
    return "\n".join(lines)
