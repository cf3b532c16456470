"""Config loading (YAML + dotted overrides, unknown keys) and atomic outputs."""

from __future__ import annotations

import pytest

from dense_irl.config import ConfigError, load_config, parse_overrides, save_config
from dense_irl.io import atomic_dir, atomic_write_text
from dense_irl.offline.config import TrainRewardConfig


def test_defaults_file_and_overrides_merge(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("reward:\n  alpha: 0.5\nmodel:\n  hidden_size: 64\n")
    cfg = load_config(TrainRewardConfig, f, ["--reward.alpha=2", "--data.synthetic.seed=7", "--output_dir=x"])
    assert cfg.reward.alpha == 2.0 and isinstance(cfg.reward.alpha, float)
    assert cfg.model.hidden_size == 64 and cfg.model.num_layers == 4  # untouched keys keep defaults
    assert cfg.data.synthetic.seed == 7 and cfg.output_dir == "x"
    assert cfg.reward.level_weights["step"] == 1.0


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(TrainRewardConfig, None, ["--reward.objective=iq", "--data.max_demos=10"])
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(TrainRewardConfig, tmp_path / "saved.yaml") == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--reward.objectiv=iq"], "unknown config key reward.objectiv"),
        (["--nope=1"], "unknown config key nope"),
        (["--reward.lr=abc"], "reward.lr: expected float"),
        (["--sft.max_steps=1.5"], "sft.max_steps: expected int"),
        (["--reward.objective=ppo"], "'ppo' is not one of"),
        (["--reward=3"], "reward: expected a mapping"),
        (["reward.lr=1"], "must look like --key.sub=value"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(TrainRewardConfig, None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(TrainRewardConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("reward: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TrainRewardConfig, bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(TrainRewardConfig, lst)


def test_parse_overrides_types():
    assert parse_overrides(["--a.b=1", "--a.c=x", "--d=[1, 2]", "--e=true"]) == {
        "a": {"b": 1, "c": "x"}, "d": [1, 2], "e": True}


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "ckpt") as tmp:
            (tmp / "weights").write_text("partial")
            raise RuntimeError("crash mid-write")
    assert not (tmp_path / "ckpt").exists()
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_dir_replaces_whole_folder(tmp_path):
    with atomic_dir(tmp_path / "ckpt") as tmp:
        (tmp / "a").write_text("1")
    with atomic_dir(tmp_path / "ckpt") as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
