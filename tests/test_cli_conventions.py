"""What every command shares: --version, -h, -v/-q, no bars or wrapped lines in pipes, and the exit codes."""

from __future__ import annotations

import os
import re

import pytest

from conftest import lookalike_cli as lookalike, make_dataset
from lookalike.config import LookalikeConfig
from lookalike.errors import LookalikeError
from lookalike.pipeline import check_inputs


def test_version_and_short_help():
    from lookalike import __version__

    assert lookalike("--version").stdout.strip() == f"lookalike {__version__}"
    help_text = lookalike("retrieve", "-h", env=os.environ | {"COLUMNS": "200"}).stdout
    assert "Usage: lookalike retrieve" in help_text and "IMAGE" in help_text
    assert "<bool>" not in help_text and "{image}" not in help_text, "flags show no placeholder, arguments read as IMAGE"
    assert "--install-completion" in lookalike("-h").stdout
    # install hints keep their extras: rich markup would read [milvus] as a style and drop it
    assert "pip install 'lookalike[milvus]'" in lookalike("index", "build", "-h", env=os.environ | {"COLUMNS": "250"}).stdout


def test_piped_output_has_no_bars_and_no_wrapped_lines(real_subset, tmp_path):
    env = os.environ | {"COLUMNS": "60"}
    proc = lookalike("prepare", "--data", real_subset, "--out", tmp_path / "run", env=env)
    assert "\r" not in proc.stderr and "Checking images" not in proc.stderr, "no progress bar when stderr is a pipe"
    line = next(line for line in proc.stderr.splitlines() if "images in 3 attributes" in line)
    assert line.endswith("striped 14"), f"a log line is never wrapped in a pipe: {proc.stderr!r}"
    quiet = lookalike("-q", "prepare", "--data", real_subset, "--out", tmp_path / "quiet", env=env)
    assert "images in 3 attributes" not in quiet.stderr and "Scanning" not in quiet.stderr
    assert "split 0:" in quiet.stdout, "-q keeps the result, drops the log"


def test_exit_codes_say_usage_error_runtime_failure_or_partial_success(tmp_path):
    photos = make_dataset(tmp_path / "photos", per_attribute=2)
    (photos / "dots" / "broken.jpg").write_bytes(b"not a jpeg at all")
    partial = lookalike("featurize-dir", photos, "--out", tmp_path / "v.npy", check=False)
    assert partial.returncode == 3, partial.stderr
    assert "broken.jpg" in partial.stderr and (tmp_path / "v.npy").is_file(), "the readable images are still written"
    (photos / "dots" / "broken.jpg").unlink()
    assert lookalike("featurize-dir", photos, "--out", tmp_path / "w.npy", check=False).returncode == 0
    usage = lookalike("run", "--data", photos, "--out", tmp_path / "r", "--splits", "0", check=False)
    assert usage.returncode == 2 and "Traceback" not in usage.stderr
    flag = lookalike("featurize-dir", photos, "--out", tmp_path / "x.txt", check=False)
    assert flag.returncode == 2 and re.search(r"--out: .*x\.txt", flag.stderr), flag.stderr
    runtime = lookalike("evaluate", "--run", tmp_path / "nothing-here", check=False)
    assert runtime.returncode == 1 and "Traceback" not in runtime.stderr


def test_bad_arguments_fail_before_any_work_and_leave_nothing_behind(real_subset, tmp_path):
    for args, out, message in (
        (["--data", real_subset, "--backbone", "vgg16"], tmp_path / "run", "unknown backbone 'vgg16'"),
        (["--data", tmp_path / "nowhere"], tmp_path / "run", "--data: dataset folder"),
        (["--data", real_subset], real_subset / "runs" / "first", "--out: the run folder"),  # its pictures would become an attribute
    ):
        proc = lookalike("run", *args, "--out", out, check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert not out.exists(), f"{args}: the run folder must not be created"
        assert "Scanning" not in proc.stderr, "refused before the scan"


def test_a_run_folder_may_sit_in_a_hidden_folder_of_the_dataset(tmp_path):
    """The scan skips hidden folders, so only a visible run folder inside the dataset is refused."""
    photos = make_dataset(tmp_path / "photos", per_attribute=2)
    check_inputs(photos, LookalikeConfig(), photos / ".runs" / "first")
    check_inputs(photos, LookalikeConfig(), tmp_path / "run")
    with pytest.raises(LookalikeError, match="inside the dataset folder .*: its report pictures would be scanned as photos of its attributes"):
        check_inputs(photos, LookalikeConfig(), photos)
    with pytest.raises(LookalikeError, match="scanned as photos of an attribute 'runs'"):
        check_inputs(photos, LookalikeConfig(), photos / "runs" / "first")
