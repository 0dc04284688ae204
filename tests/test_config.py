from pathlib import Path

import pytest

from lookalike.config import LookalikeConfig, load_config
from lookalike.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_shipped_toml_documents_the_defaults():
    """lookalike.toml must list every parameter with its default, so the two cannot drift apart."""
    assert load_config(REPO / "lookalike.toml") == LookalikeConfig()
    text = (REPO / "lookalike.toml").read_text()
    for section, model in LookalikeConfig.model_fields.items():
        assert f"[{section}]" in text
        for key in model.annotation.model_fields:
            line = next(line for line in text.splitlines() if line.startswith(f"{key} ="))
            assert "#" in line, f"{section}.{key} needs a one-line explanation"


def test_unknown_key_names_the_known_ones(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[metric]\nCC = 1.0\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "metric.CC" in str(e.value) and "unknown key" in str(e.value) and "hard_negative_iterations" in str(e.value)


def test_unknown_section(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[metrics]\nC = 1.0\n")
    with pytest.raises(ConfigError, match="metrics"):
        load_config(p)


def test_wrong_type_and_range(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[data]\ntrain_ratio = "most"\n')
    with pytest.raises(ConfigError, match="data.train_ratio.*most"):
        load_config(p)
    p.write_text("[data]\ntrain_ratio = 1.5\n")
    with pytest.raises(ConfigError, match="less than 1"):
        load_config(p)


def test_broken_toml_and_missing_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[data\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_overrides_win_over_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[metric]\nC = 2.0\n")
    assert load_config(p).metric.C == 2.0
    assert load_config(p, {"metric.C": 0.5}).metric.C == 0.5


def test_configurations_recorded_by_earlier_versions_still_load():
    from lookalike.config import stored_config
    from lookalike.errors import ConfigError

    old = {"features": {"resolution": 224}, "refine": {"epochs": 60, "resolution": 320}}
    assert stored_config(old, "run/config.json").features.resolution == 320, "the refined model's input size is kept"
    untrained = {"features": {"resolution": 224}, "refine": {"epochs": 0, "resolution": 320}}
    assert stored_config(untrained, "run/config.json").features.resolution == 224, "without refinement, featurize's size"
    with pytest.raises(ConfigError, match="run/config.json: the recorded configuration is not valid"):
        stored_config({"refine": {"epochs": -1}}, "run/config.json")
