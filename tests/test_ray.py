"""The Ray engine: same embeddings and neighbours as the single-process path, failures reported, re-runs resume.

Ray runs as one local instance for the whole file (2 CPUs, no dashboard, bound to 127.0.0.1).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REAL_DATA, lookalike_cli, make_dataset

PER_ATTRIBUTE = 8
SHARD_SIZE = 8
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed (pip install 'lookalike[ray]')")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """The feature cache (and ONNX export) of both paths: exported once, shared by the driver and the Ray workers."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def ray_local(model_cache):
    """One local Ray for the file, started as lookalike starts one (bound to 127.0.0.1, no dashboard, quiet)."""
    from lookalike.distributed import connect

    ray, _ = connect(num_cpus=2, object_store_memory=500 * 1024**2, runtime_env={"env_vars": {"LOOKALIKE_CACHE_DIR": str(model_cache)}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Real photos (linked), plus an empty and a truncated JPEG that both engines must report, not crash on."""
    root = tmp_path_factory.mktemp("photos")
    for attribute in ("dotted", "leopard", "striped"):
        (root / attribute).mkdir()
        for src in sorted((REAL_DATA / attribute).glob("*.jpg"))[:PER_ATTRIBUTE]:
            os.symlink(src, root / attribute / src.name)
    (root / "broken").mkdir()
    (root / "broken" / "empty.jpg").write_bytes(b"")
    (root / "broken" / "truncated.jpg").write_bytes(next((REAL_DATA / "dotted").glob("*.jpg")).read_bytes()[:1500])
    return root


@pytest.fixture(scope="module")
def backbone():
    from lookalike.backbones import create_backbone

    return create_backbone("efficientnet-lite0")


@pytest.fixture(scope="module")
def single(photos, backbone, model_cache, tmp_path_factory):
    """The single-process `featurize-dir` output (computed: the cache holds no features of these photos yet)."""
    from lookalike.model import ImageEmbedder
    from lookalike.retrieval import featurize_dir

    out = tmp_path_factory.mktemp("single") / "emb.parquet"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOOKALIKE_CACHE_DIR", str(model_cache))
        info = featurize_dir(photos, out, ImageEmbedder(backbone), progress=False)
    return out, info


def featurize_on_ray(photos: Path, out: Path, backbone) -> dict:
    from lookalike.distributed import ModelSpec, featurize_dir_ray

    return featurize_dir_ray(photos, out, ModelSpec.of("efficientnet-lite0"), backbone, shard_size=SHARD_SIZE, progress=False)


@pytest.fixture(scope="module")
def ray_shards(ray_local, photos, backbone, tmp_path_factory) -> Path:
    """The photos embedded on Ray into a folder of shards (the output form that keeps them)."""
    out = tmp_path_factory.mktemp("ray") / "emb-shards"
    featurize_on_ray(photos, out, backbone)
    return out


def copy_of_shards(ray_shards: Path, out: Path) -> Path:
    """The shards an `--out OUT` run would have left after embedding every block, so that it only resumes."""
    return Path(shutil.copytree(ray_shards, f"{out}.shards"))


@pytest.fixture(scope="module")
def on_ray(ray_shards, photos, backbone, tmp_path_factory):
    """`featurize-dir --executor ray --out emb.parquet`, made from the Ray run's shards."""
    out = tmp_path_factory.mktemp("ray-parquet") / "emb.parquet"
    copy_of_shards(ray_shards, out)
    return out, featurize_on_ray(photos, out, backbone)


def _read(path: Path):
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return table.column("path").to_pylist(), table.column("sha256").to_pylist(), np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)


@needs_ray
def test_ray_embeddings_equal_single_process(single, on_ray, ray_shards):
    (single_out, single_info), (ray_out, ray_info) = single, on_ray
    paths, digests, X = _read(single_out)
    ray_paths, ray_digests, Y = _read(ray_out)
    assert len(paths) == 3 * PER_ATTRIBUTE
    assert ray_paths == paths and ray_digests == digests
    assert np.abs(X - Y).max() < 1e-5
    assert ray_info["n"] == single_info["n"] and ray_info["backbone_fingerprint"] == single_info["backbone_fingerprint"]
    ray_reasons, single_reasons = ({Path(s["path"]).name: s["reason"] for s in info["skipped"]} for info in (ray_info, single_info))
    assert ray_reasons == single_reasons
    assert set(ray_reasons) == {"empty.jpg", "truncated.jpg"}
    report = json.loads((ray_shards / "failed.json").read_text())
    assert report["n_failed"] == 2 and {Path(f["path"]).name for f in report["failed"]} == {"empty.jpg", "truncated.jpg"}


@needs_ray
def test_index_from_ray_shards_returns_same_neighbours(single, ray_shards, photos, tmp_path):
    from lookalike.distributed import build_index_from_shards
    from lookalike.index.backends import IndexLocation
    from lookalike.index.catalog import NewImage
    from lookalike.index.metric import IndexMetric
    from lookalike.index.search import search_vectors
    from lookalike.index.store import ImageIndex

    paths, digests, X = _read(single[0])
    stats = build_index_from_shards(ray_shards, tmp_path / "ray-index", IndexMetric("l2"), kind="flat", progress=False)
    assert stats["images"] == len(paths) and stats["kind"] == "flat"
    assert stats["attributes"] == {"dotted": PER_ATTRIBUTE, "leopard": PER_ATTRIBUTE, "striped": PER_ATTRIBUTE}
    with ImageIndex.create(tmp_path / "single-index", X.shape[1], IndexMetric("l2"), single[1]["backbone_fingerprint"], kind="flat") as ref:
        absolute = [str((photos / p).absolute()) for p in paths]
        ref.add([NewImage(p, Path(p).parent.name, d, 0, 0.0) for p, d in zip(absolute, digests)], X)
        ref.merge(force=True)
        ref.finish_build()
    # the same shards into a Milvus collection (Milvus Lite file): --executor ray --backend milvus
    milvus = IndexLocation("from_ray", "milvus", str(tmp_path / "catalog.db"))
    assert build_index_from_shards(ray_shards, milvus, IndexMetric("l2"), kind="flat", progress=False)["images"] == len(paths)
    with ImageIndex.open(tmp_path / "ray-index") as a, ImageIndex.open(tmp_path / "single-index") as b, milvus.open() as c:
        found_ray = [[m.path for m in ms] for ms in search_vectors(a, X, k=5)]
        found_single = [[m.path for m in ms] for ms in search_vectors(b, X, k=5)]
        in_milvus = search_vectors(c, X, k=5)
        assert [[m.path for m in ms] for ms in in_milvus] == found_single
        np.testing.assert_allclose([[m.distance for m in ms] for ms in in_milvus], [[m.distance for m in ms] for ms in search_vectors(b, X, k=5)], atol=1e-5)
    assert found_ray == found_single
    assert all(ms[0] == p for ms, p in zip(found_ray, absolute))


@needs_ray
def _embeddings_in(shards: Path) -> dict[str, np.ndarray]:
    rows = {}
    for part in sorted(shards.glob("part-*.parquet")):
        paths, _, X = _read(part)
        rows |= dict(zip(paths, X))
    return rows


@needs_ray
def test_rerun_resumes_from_shards(ray_shards, photos):
    """A re-run embeds nothing; after losing one shard (and leaving a half-written file) it redoes that block only."""
    from typer.testing import CliRunner

    from lookalike.cli import app

    parts = sorted(ray_shards.glob("part-*.parquet"))
    assert len(parts) == -(-(3 * PER_ATTRIBUTE + 2) // SHARD_SIZE)
    before = {p.name: p.stat().st_mtime_ns for p in parts}
    expected = _embeddings_in(ray_shards)
    parts[1].unlink()
    (ray_shards / f".{parts[2].name}.abc.tmp.parquet").write_bytes(b"half")
    result = CliRunner().invoke(app, ["featurize-dir", str(photos), "--out", str(ray_shards), "--executor", "ray", "--shard-size", str(SHARD_SIZE)])
    assert result.exit_code == 3 and "skipped 2" in result.output, result.output  # partial success: the two broken photos
    manifest = json.loads((ray_shards / "manifest.json").read_text())
    assert (manifest["blocks_embedded"], manifest["blocks_resumed"]) == (1, len(parts) - 1)
    after = {p.name: p.stat().st_mtime_ns for p in ray_shards.glob("part-*.parquet")}
    assert set(after) == set(before) and not list(ray_shards.glob(".*tmp*"))
    assert [n for n in before if after[n] != before[n]] == [parts[1].name]
    redone = _embeddings_in(ray_shards)
    assert redone.keys() == expected.keys() and max(np.abs(redone[p] - expected[p]).max() for p in expected) < 1e-6


@needs_ray
def test_file_output_removes_its_shards_only_after_success(ray_shards, photos, backbone, tmp_path):
    """OUT.npy is made from OUT.npy.shards/: a failed write keeps them (the re-run resumes), a finished one removes them."""
    out = tmp_path / "emb.npy"
    shards = copy_of_shards(ray_shards, out)
    out.mkdir()  # OUT cannot be written: the export fails after every block is embedded
    with pytest.raises(OSError):
        featurize_on_ray(photos, out, backbone)
    assert sorted(p.name for p in shards.glob("part-*.parquet")) == sorted(p.name for p in ray_shards.glob("part-*.parquet"))
    out.rmdir()
    info = featurize_on_ray(photos, out, backbone)
    assert not shards.exists() and info["n"] == 3 * PER_ATTRIBUTE
    assert np.load(out).shape == (3 * PER_ATTRIBUTE, 1280) and "shards" not in json.loads(out.with_suffix(".json").read_text())


@needs_ray
def test_index_build_removes_default_shards_keeps_named_ones(ray_shards, photos, backbone, tmp_path):
    from lookalike.distributed import ModelSpec, featurize_and_index
    from lookalike.index.metric import IndexMetric

    spec = ModelSpec.of("efficientnet-lite0")
    copy_of_shards(ray_shards, tmp_path / "index")
    built = featurize_and_index(photos, tmp_path / "index", spec, IndexMetric("l2"), backbone=backbone, shard_size=SHARD_SIZE, kind="flat", progress=False)
    assert built["index"]["images"] == 3 * PER_ATTRIBUTE and not (tmp_path / "index.shards").exists() and "shards" not in built
    named = copy_of_shards(ray_shards, tmp_path / "mine")
    kept = featurize_and_index(photos, tmp_path / "index-2", spec, IndexMetric("l2"), shards_dir=named, backbone=backbone, shard_size=SHARD_SIZE, kind="flat", progress=False)
    assert kept["shards"] == str(named) and len(list(named.glob("part-*.parquet"))) == len(list(ray_shards.glob("part-*.parquet")))


@needs_ray
def test_cli_prints_nothing_of_rays_own(model_cache, tmp_path):
    """A fresh process starting its own Ray: Ray's warnings and notes (token setup, Ray Data, the C++ core) stay in Ray's logs."""
    photos = tmp_path / "photos"
    for attribute in ("dotted", "striped"):
        (photos / attribute).mkdir(parents=True)
        for src in sorted((REAL_DATA / attribute).glob("*.jpg"))[:2]:
            os.symlink(src, photos / attribute / src.name)
    out = tmp_path / "emb.parquet"
    proc = lookalike_cli("featurize-dir", photos, "--out", out, "--executor", "ray", "--shard-size", 2, env=os.environ | {"LOOKALIKE_CACHE_DIR": str(model_cache), "COLUMNS": "200"})
    progress_bar = r"Embedding on Ray \(.*?\):\s+\d+%\|[^|]*\| \d+/\d+ \[[^\]]*\]"
    assert not re.sub(progress_bar, "", proc.stderr).strip(), proc.stderr
    assert out.is_file() and not Path(f"{out}.shards").exists()


def test_single_process_path_never_imports_ray(tmp_path):
    images = make_dataset(tmp_path / "textures", per_attribute=2)
    code = (
        "import sys\n"
        "from lookalike.cli.main import _register_plugins, app\n"
        "_register_plugins()\n"
        f"app(['featurize-dir', {str(images)!r}, '--out', {str(tmp_path / 'emb.npy')!r}], standalone_mode=False)\n"
        "import lookalike.distributed\n"
        "print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={**os.environ, "LOOKALIKE_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "NO_RAY"
    assert (tmp_path / "emb.npy").is_file()


def test_lists_and_reads_images_on_an_fsspec_filesystem():
    """Remote sources go through pyarrow/fsspec filesystems; fsspec's in-memory one stands in for s3:// here."""
    import io

    import fsspec

    from conftest import texture
    from lookalike.distributed.sources import list_images, read_bytes

    fs = fsspec.filesystem("memory")
    buf = io.BytesIO()
    texture("dots").save(buf, format="PNG")
    for name in ("photos/dotted/a.png", "photos/striped/b.PNG", "photos/.hidden/c.png", "photos/dotted/notes.txt"):
        fs.pipe(f"/lookalike-test/{name}", buf.getvalue())
    try:
        found = list_images("memory://lookalike-test/photos")
        assert [(im.uri, im.attribute) for im in found] == [("memory://lookalike-test/photos/dotted/a.png", "dotted"), ("memory://lookalike-test/photos/striped/b.PNG", "striped")]
        assert read_bytes(found[0].uri) == buf.getvalue() and found[0].size == len(buf.getvalue())
    finally:
        fs.rm("/lookalike-test", recursive=True)
