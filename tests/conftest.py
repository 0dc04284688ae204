"""Shared fixtures: generated texture images, a small real-photo subset, a small trained run, and an isolated feature cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from lookalike.model import SimilarityModel
from lookalike.rundir import RunDir

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "fashionTexture"


CHROMIUM = Path("/usr/bin/chromium")


def require_playwright():
    """playwright.sync_api, with Debian's Chromium beside it; skips the test (fails it on CI) when either is missing."""
    playwright = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing; install Debian's chromium (apt-get install -y chromium)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    return playwright


def launch_chromium(p, profile: str, width: int = 1280, height: int = 900):
    """Headless Chromium on a fresh profile folder (no sandbox: the tests may run as root in a container)."""
    return p.chromium.launch_persistent_context(
        profile,
        executable_path=str(CHROMIUM),
        headless=True,
        args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        viewport={"width": width, "height": height},
    )


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own feature cache, so no test sees another's work."""
    monkeypatch.setenv("LOOKALIKE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


def texture(kind: str, size: int = 64, seed: int = 0) -> Image.Image:
    """A small synthetic texture: stripes, dots or checks, with random phase, scale and colour."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(6, 12)
    phase = rng.uniform(0, period)
    if kind == "stripes":
        mask = ((xx + phase) % period) < period / 2
    elif kind == "dots":
        mask = (((xx + phase) % period - period / 2) ** 2 + ((yy + phase) % period - period / 2) ** 2) < (period / 4) ** 2
    else:
        mask = (((xx + phase) // (period / 2)) + ((yy + phase) // (period / 2))) % 2 == 0
    fg = rng.integers(0, 256, 3)
    bg = (fg + 128) % 256  # strong contrast, so distinct textures never look like near-duplicates
    # a random low-frequency shading gives every image its own layout (distinct difference hashes)
    shading = np.asarray(Image.fromarray(rng.uniform(0.35, 1.0, (3, 3)).astype(np.float32), mode="F").resize((size, size), Image.BICUBIC))
    img = np.where(mask[..., None], fg, bg).astype(np.float32) * shading[..., None] + rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_dataset(root: Path, per_attribute: int = 8, kinds=("stripes", "dots", "checks"), size: int = 64) -> Path:
    for k, kind in enumerate(kinds):
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_attribute):
            texture(kind, size, seed=1000 * k + i).save(root / kind / f"{i:03d}.png")
    return root


@pytest.fixture
def synthetic_dataset(tmp_path) -> Path:
    return make_dataset(tmp_path / "textures")


@pytest.fixture
def real_subset(tmp_path) -> Path:
    """A few real photos per attribute, linked (not copied) from the shared dataset."""
    assert REAL_DATA.is_dir(), f"the example dataset is expected at {REAL_DATA}"
    root = tmp_path / "fashion"
    for attribute in ("dotted", "leopard", "striped"):
        (root / attribute).mkdir(parents=True)
        for src in sorted((REAL_DATA / attribute).glob("*.jpg"))[:14]:
            os.symlink(src, root / attribute / src.name)
    return root


@pytest.fixture(scope="session")
def small_run(tmp_path_factory) -> SimpleNamespace:
    """`lookalike run` on 14 real photos per attribute, 1 split (trained once per session; its cache in ROOT/cache)."""
    root = tmp_path_factory.mktemp("small-run")
    data = root / "photos"
    for attribute in ("dotted", "leopard", "striped"):
        (data / attribute).mkdir(parents=True)
        for src in sorted((REAL_DATA / attribute).glob("*.jpg"))[:14]:
            os.symlink(src, data / attribute / src.name)
    config = root / "small.toml"
    config.write_text("[data]\ntrain_queries_per_attribute = 10\ntest_queries_per_attribute = 4\n[evaluate]\nquery_pictures = 3\n")
    lookalike_cli("run", "--data", data, "--out", root / "run", "--splits", "1", "--config", config, env=os.environ | {"LOOKALIKE_CACHE_DIR": str(root / "cache")})
    return SimpleNamespace(root=root, data=data, run=root / "run")


def lookalike_cli(*args, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m lookalike ARGS` as a user would; with `check`, a non-zero exit fails the test with its output."""
    proc = subprocess.run([sys.executable, "-m", "lookalike", *map(str, args)], capture_output=True, text=True, env=env)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def held_out_reliability(run: Path, splits=(0,), bins: int = 5) -> tuple[float, int]:
    """Calibration on every pair of each split's test photos: the gap between the probability the model gives and how
    often such pairs share an attribute, per probability bin, weighted by pairs (the expected calibration error).

    Platt scaling is fit as if negatives were `platt_negative_ratio` times as many as positives, so the observed
    frequency weighs the test negatives to that ratio too."""
    probabilities, same = [], []
    for k in splits:
        rd = RunDir(run)
        model = SimilarityModel.load(run, split=k)
        features, row_of = rd.features(k)
        dataset, split = rd.dataset(), rd.split(k)
        test = list(split.parts["test"])
        for a in range(len(test)):
            for b in range(a + 1, len(test)):
                u, v = features[row_of[test[a]]], features[row_of[test[b]]]
                probabilities.append(float(model.probability(model.distance(u, v[None]))[0]))
                same.append(dataset.images[test[a]].attribute == dataset.images[test[b]].attribute)
    p, y = np.array(probabilities), np.array(same)
    weight = np.where(y, 1.0, model.ranker_.platt_negative_ratio * y.sum() / (~y).sum())
    which = np.minimum((p * bins).astype(int), bins - 1)
    gap = sum(abs(np.average(p[which == b], weights=weight[which == b]) - np.average(y[which == b], weights=weight[which == b])) * weight[which == b].sum() for b in range(bins) if (which == b).any())
    return gap / weight.sum(), len(p)
