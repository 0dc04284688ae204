"""`lookalike index` end to end on real photos with a really trained run: build, search, add, remove, stats."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import REAL_DATA
from conftest import lookalike_cli as lookalike

pytestmark = pytest.mark.slow
ATTRIBUTES = ("dotted", "leopard", "striped")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained on 12 real photos per attribute; 4 more per attribute kept back to add later."""
    root = tmp_path_factory.mktemp("index-cli")
    for attribute in ATTRIBUTES:
        photos = sorted((REAL_DATA / attribute).glob("*.jpg"))
        for folder, chosen in (("photos", photos[:12]), ("later", photos[12:16])):
            (root / folder / attribute).mkdir(parents=True)
            for src in chosen:
                os.symlink(src, root / folder / attribute / src.name)
    (root / "small.toml").write_text("[data]\ntrain_queries_per_attribute = 10\ntest_queries_per_attribute = 4\n[evaluate]\nquery_pictures = 2\n[refine]\nepochs = 0\n")
    env = os.environ | {"LOOKALIKE_CACHE_DIR": str(root / "cache")}
    lookalike("run", "--data", root / "photos", "--out", root / "run", "--splits", "1", "--config", root / "small.toml", env=env)
    return root, env


def test_build_search_add_remove_stats_on_real_photos(trained):
    root, env = trained
    index = root / "index"
    built = json.loads(lookalike("index", "build", "--run", root / "run", "--images", root / "photos", "--out", index, "--json", env=env).stdout)
    assert (built["added"], built["embedded"], built["kind"]) == (36, 36, "flat")

    query = sorted((root / "photos" / "leopard").iterdir())[0]
    result = json.loads(lookalike("index", "search", index, query, "--top", "15", "--json", "--grid", root / "grid.png", env=env).stdout)
    assert set(result) == {"query", "attribute", "results", "took_ms"} and result["query"]["path"] == str(query)
    matches = result["results"]
    assert len(matches) == 15 and str(query) not in [m["path"] for m in matches]
    distances = [m["distance"] for m in matches]
    probabilities = [m["probability"] for m in matches]
    assert distances == sorted(distances) and probabilities == sorted(probabilities, reverse=True)
    assert all(0 <= p <= 1 for p in probabilities)
    assert sum(m["attribute"] == "leopard" for m in matches[:5]) >= 4  # measured 5 (chance: 5 x 11/35)
    with Image.open(root / "grid.png") as grid:
        width, height = grid.size  # the query + 15 matches: 4 rows of 4 tiles of 200 px
        assert 4 * 200 < width < 5 * 200 and 4 * 200 < height < 5 * 200

    # the same ranking as the run's own model, by brute force over every catalogued image
    from lookalike.index import ImageIndex, search_vectors
    from lookalike.model import SimilarityModel

    os.environ["LOOKALIKE_CACHE_DIR"] = env["LOOKALIKE_CACHE_DIR"]
    model = SimilarityModel.load(root / "run")
    with ImageIndex.open(index) as ix:
        entries = ix.entries_by_path()
        paths = sorted(p for p in entries if p != str(query))
        X = ix.vectors()[[entries[p].id for p in paths]]
        q = ix.vectors()[entries[str(query)].id]
    d = model.ranker.distance(q, X)
    assert [m["path"] for m in matches] == [paths[i] for i in np.argsort(d, kind="stable")[:15]]
    np.testing.assert_allclose(distances, np.sort(d)[:15], rtol=1e-6)
    feats, _, _ = model.embed_paths([str(query)], progress=False)
    np.testing.assert_allclose(q, feats[0], rtol=1e-5, atol=1e-6)
    # every catalogued photo as a query: its 5 nearest others are mostly of its attribute, even without refinement
    with ImageIndex.open(index) as ix:
        attribute = {e.id: e.attribute for e in ix.entries_by_path().values()}
        same = [np.mean([m.attribute == attribute[i] for m in search_vectors(ix, ix.vectors()[i], 5, exclude_ids=[i])[0]]) for i in attribute]
    assert np.mean(same) >= 0.6  # measured 0.76 (chance 0.31)

    added = json.loads(lookalike("index", "add", index, root / "later", "--json", env=env).stdout)
    assert (added["added"], added["embedded"], added["images"]) == (12, 12, 48)
    again = json.loads(lookalike("index", "add", index, root / "later", "--json", env=env).stdout)
    assert (again["added"], again["embedded"], again["unchanged"]) == (0, 0, 12)

    new_photo = next((root / "later" / "striped").iterdir())
    found = json.loads(lookalike("index", "search", index, new_photo, "--top", "3", "--keep-self", "--json", env=env).stdout)
    assert found["results"][0]["path"] == str(new_photo)

    removed = json.loads(lookalike("index", "remove", index, root / "later" / "striped", root / "nowhere.jpg", "--json", env=env).stdout)
    assert removed["removed"] == 4 and removed["images"] == 44 and removed["not_in_index"] == [str(root / "nowhere.jpg")]
    stats = json.loads(lookalike("index", "stats", index, "--json", env=env).stdout)
    assert stats["images"] == 44 and stats["attributes"] == {"dotted": 16, "leopard": 16, "striped": 12}
    assert stats["distance"].startswith("learned weighted L2")

    # reindex: the same stored vectors in another kind, the tail folded in, the same answers
    assert (stats["kind"], stats["tail_rows"]) == ("flat", 12)
    with ImageIndex.open(index) as ix:
        exact = [m.path for m in search_vectors(ix, q, 16)[0] if m.path != str(query)]
    rebuilt = json.loads(lookalike("index", "reindex", index, "--kind", "hnsw", "--json", env=env).stdout)
    assert (rebuilt["kind"], rebuilt["images"], rebuilt["tombstones"], rebuilt["tail_rows"]) == ("hnsw", 44, 0, 0)
    again = json.loads(lookalike("index", "search", index, query, "--top", "15", "--json", env=env).stdout)["results"]
    assert [m["path"] for m in again] == exact[:15]

    manifest = json.loads((index / "manifest.json").read_text())
    manifest["backbone_fingerprint"] = "some-other-backbone"
    (index / "manifest.json").write_text(json.dumps(manifest))
    wrong = lookalike("index", "add", index, root / "later", env=env, check=False)
    assert wrong.returncode == 2 and "is not the one the index" in " ".join(wrong.stderr.split()) and "Traceback" not in wrong.stderr
    missing = lookalike("index", "search", root / "nowhere", new_photo, env=env, check=False)
    assert missing.returncode == 2 and "is not a lookalike index" in " ".join(missing.stderr.split())
