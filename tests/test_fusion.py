"""Combining rankers of several attribute families: average calibrated probabilities, never raw scores."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from lookalike.cli.datatools import register
from lookalike.datatools.fusion import combine_score_files, fuse_probabilities, ranker_names, read_score_file
from lookalike.errors import LookalikeError

# The tutorial's worked example: one query, two reference images, three rankers (texture, neck style, sleeve length).
# Image 1 does NOT share the query's attributes, image 2 does.
RAW = {"image 1": (0.2, 1.9, 0.3), "image 2": (0.7, 0.8, 0.7)}
PROBABILITIES = {"image 1": (0.15, 0.99, 0.20), "image 2": (0.78, 0.85, 0.78)}


def test_tutorial_example_raw_scores_pick_the_wrong_image_probabilities_the_right_one():
    raw_mean = {k: float(np.mean(v)) for k, v in RAW.items()}
    assert raw_mean["image 1"] == pytest.approx(0.80)
    assert raw_mean["image 2"] == pytest.approx(0.733, abs=1e-3)
    assert max(raw_mean, key=raw_mean.get) == "image 1"  # wrong

    # rankers along the first axis, reference images along the second
    per_ranker = np.array([PROBABILITIES["image 1"], PROBABILITIES["image 2"]]).T
    fused = fuse_probabilities(per_ranker)
    assert fused.shape == (2,)
    assert round(float(fused[0]), 2) == 0.45
    assert round(float(fused[1]), 2) == 0.80
    assert int(np.argmax(fused)) == 1  # right

    # raw scores are refused outright: 1.9 is not a probability
    with pytest.raises(LookalikeError, match="calibrated probabilities.*never raw scores"):
        fuse_probabilities(np.array([RAW["image 1"], RAW["image 2"]]).T)


def test_weights_and_mappings():
    p = {"texture": [0.9, 0.1], "sleeve": [0.2, 0.6]}
    assert fuse_probabilities(p) == pytest.approx([0.55, 0.35])
    assert fuse_probabilities(p, {"texture": 3, "sleeve": 1}) == pytest.approx([0.725, 0.225])
    assert fuse_probabilities(list(p.values()), [3, 1]) == pytest.approx([0.725, 0.225])
    assert fuse_probabilities(p, {"texture": 1, "sleeve": 0}) == pytest.approx([0.9, 0.1])
    assert fuse_probabilities([0.4, 0.8]) == pytest.approx(0.6)  # one pair, scalars per ranker
    # scaling all weights changes nothing
    assert fuse_probabilities(p, {"texture": 30, "sleeve": 10}) == pytest.approx(fuse_probabilities(p, {"texture": 3, "sleeve": 1}))


@pytest.mark.parametrize(
    "probabilities, weights, message",
    [
        ([], None, "no rankers"),
        ([[0.1, 0.2], [0.3]], None, "shapes differ"),
        ([[0.1, float("nan")]], None, "non-finite"),
        ([[0.1, -0.2]], None, "outside \\[0, 1\\]"),
        ([[0.1], [0.2]], [1], "1 weight\\(s\\) for 2 ranker"),
        ([[0.1], [0.2]], [1, -1], "non-negative"),
        ([[0.1], [0.2]], [0, 0], "above zero"),
        ({"a": [0.1]}, {"b": 1}, "unknown"),
        ([[0.1]], {"a": 1}, "mapping"),
        ([["x"]], None, "numbers"),
    ],
)
def test_bad_inputs_are_clear_errors(probabilities, weights, message):
    with pytest.raises(LookalikeError, match=message):
        fuse_probabilities(probabilities, weights)


def _score_file(path, rows, header=("query", "reference", "probability")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_combine_score_files_ranks_by_fused_probability(tmp_path):
    # the tutorial's example as three rankers' score files, plus a second query
    names = ("texture", "neck", "sleeve")
    files = []
    for k, name in enumerate(names):
        rows = [("q1.jpg", "image1.jpg", PROBABILITIES["image 1"][k]), ("q1.jpg", "image2.jpg", PROBABILITIES["image 2"][k]),
                ("q2.jpg", "image1.jpg", 0.5), ("q2.jpg", "image2.jpg", 0.4)]
        if name == "neck":
            rows = rows[::-1]  # order within a file does not matter
        files.append(_score_file(tmp_path / f"{name}.csv", rows))
    got_names, pairs = combine_score_files(files)
    assert got_names == list(names)
    assert [(p.query, p.reference, p.rank) for p in pairs] == [
        ("q1.jpg", "image2.jpg", 1), ("q1.jpg", "image1.jpg", 2), ("q2.jpg", "image1.jpg", 1), ("q2.jpg", "image2.jpg", 2),
    ]
    assert pairs[0].probability == pytest.approx(0.8033, abs=1e-4)
    assert pairs[1].probability == pytest.approx(0.4467, abs=1e-4)
    assert pairs[0].per_ranker == PROBABILITIES["image 2"]

    # weights change the fused value: all weight on neck style lets image 1 win
    _, weighted = combine_score_files(files, [0, 1, 0])
    assert (weighted[0].reference, weighted[0].probability) == ("image1.jpg", pytest.approx(0.99))


def test_score_file_problems(tmp_path):
    with pytest.raises(LookalikeError, match="lacks the column"):
        read_score_file(_score_file(tmp_path / "a.csv", [("q", "r", 0.5)], header=("query", "reference", "score")))
    with pytest.raises(LookalikeError, match="line 2.*outside \\[0, 1\\].*not raw scores"):
        read_score_file(_score_file(tmp_path / "b.csv", [("q", "r", 1.9)]))
    with pytest.raises(LookalikeError, match="line 3.*appears twice"):
        read_score_file(_score_file(tmp_path / "c.csv", [("q", "r", 0.5), ("q", "r", 0.6)]))
    with pytest.raises(LookalikeError, match="not a number"):
        read_score_file(_score_file(tmp_path / "d.csv", [("q", "r", "high")]))
    with pytest.raises(LookalikeError, match="does not exist"):
        read_score_file(tmp_path / "none.csv")
    one = _score_file(tmp_path / "one.csv", [("q", "r1", 0.5), ("q", "r2", 0.5)])
    other = _score_file(tmp_path / "other.csv", [("q", "r1", 0.5), ("q", "r3", 0.5)])
    with pytest.raises(LookalikeError, match="same pairs.*missing.*r2.*extra.*r3"):
        combine_score_files([one, other])


def test_cli_combine(tmp_path):
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    a = _score_file(tmp_path / "texture.csv", [("q", "r1", 0.9), ("q", "r2", 0.1)])
    b = _score_file(tmp_path / "sleeve.csv", [("q", "r1", 0.2), ("q", "r2", 0.6)])
    out = tmp_path / "fused.csv"
    result = runner.invoke(app, ["combine", str(a), str(b), "--weight", "1", "--weight", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert [r["reference"] for r in rows] == ["r2", "r1"]
    assert list(rows[0]) == ["query", "reference", "rank", "probability", "probability_texture", "probability_sleeve"]
    assert float(rows[0]["probability"]) == pytest.approx(0.475)
    assert float(rows[1]["probability"]) == pytest.approx(0.375)

    result = runner.invoke(app, ["combine", str(a), str(b)])
    assert result.exit_code == 0 and result.output.splitlines()[1].startswith("q,r1,1,0.550000")

    result = runner.invoke(app, ["combine", str(a), str(b), "--weight", "1"])
    assert isinstance(result.exception, LookalikeError) and "one per file" in str(result.exception)


def test_combine_through_the_lookalike_command(tmp_path):
    """The real entry point registers the command and turns a user error into a one-line message."""
    a = _score_file(tmp_path / "texture.csv", [("q", "r1", 0.9), ("q", "r2", 0.1)])
    b = _score_file(tmp_path / "sleeve.csv", [("q", "r1", 0.2), ("q", "r2", 1.9)])
    env = os.environ | {"COLUMNS": "400"}  # so the message is not wrapped
    done = subprocess.run([sys.executable, "-m", "lookalike", "combine", str(a), str(b)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 1  # a runtime failure (bad input data), not a usage error
    assert "error" in done.stderr and "not raw scores" in done.stderr and "Traceback" not in done.stderr
    _score_file(b, [("q", "r1", 0.2), ("q", "r2", 0.6)])
    done = subprocess.run([sys.executable, "-m", "lookalike", "combine", str(a), str(b)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1:] == ["q,r1,1,0.550000,0.900000,0.200000", "q,r2,2,0.350000,0.100000,0.600000"]


def test_edges_of_the_probability_range_and_the_messages_name_what_is_wrong(tmp_path):
    np.testing.assert_allclose(fuse_probabilities([[0.0, 1.0], [0.0, 1.0]]), [0.0, 1.0])  # 0 and 1 are probabilities
    edges = read_score_file(_score_file(tmp_path / "edges.csv", [("q", "r0", 0.0), ("q", "r1", 1.0)]))
    assert sorted(edges.values()) == [0.0, 1.0]
    with pytest.raises(LookalikeError, match=r"rankers \['a', 'b'\]; missing: \['b'\]$"):
        fuse_probabilities({"a": [0.1], "b": [0.2]}, {"a": 1})
    with pytest.raises(LookalikeError, match=r"rankers \['a'\]; unknown: \['c'\]$"):
        fuse_probabilities({"a": [0.1]}, {"a": 1, "c": 1})
    with pytest.raises(LookalikeError, match=r"ranker 1: \(2,\), ranker 2: \(1,\)"):
        fuse_probabilities([[0.1, 0.2], [0.3]])
    with pytest.raises(LookalikeError, match=r"pair query='q', reference='r' appears twice"):
        read_score_file(_score_file(tmp_path / "twice.csv", [("q", "r", 0.5), ("q", "r", 0.6)]))
    one = _score_file(tmp_path / "one.csv", [("q", "r1", 0.5)])
    with pytest.raises(LookalikeError, match=rf"does not score the same pairs as {one}"):
        combine_score_files([one, _score_file(tmp_path / "two.csv", [("q", "r2", 0.5)])])
    with pytest.raises(LookalikeError, match="^give at least one score file$"):
        combine_score_files([])


def test_ranker_names_are_the_file_stems_made_unique():
    assert ranker_names(["a/texture.csv", "b/texture.csv", "c/texture.csv", "neck.csv"]) == ["texture", "texture_2", "texture_3", "neck"]
