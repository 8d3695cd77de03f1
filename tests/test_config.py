import json
from pathlib import Path

import pytest

from recipe.pipeline import PipelineConfig
from recipe.sft import SFTConfig
from tests.helpers.schemas import schema_for_config
from training.config import ConfigError, config_changes, load_config, to_dict
from training.runlog import warn_changed_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted(ROOT.glob("configs/**/*.yaml")), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_yaml_loads(path):
    cfg = load_config(schema_for_config(path), path)
    assert to_dict(cfg)  # round-trips to plain data


def test_dotted_overrides_and_types(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 10\noptim:\n  lr: 1e-3\n")
    cfg = load_config(SFTConfig, f, ["optim.lr=5e-4", "batch_size=8", "eval_data=null"])
    assert cfg.steps == 10 and cfg.batch_size == 8 and cfg.optim.lr == 5e-4 and cfg.eval_data is None
    with pytest.raises(Exception):
        cfg.steps = 3  # frozen


def test_config_changes_lists_dotted_keys():
    old = {"steps": 40, "optim": {"lr": 1e-5, "warmup": 0}, "task_weights": {"spot": 2}}
    new = {"steps": 60, "optim": {"lr": 1e-5, "warmup": 0}, "task_weights": {"spot": 2, "video": 3}}
    assert config_changes(old, new) == ["steps: 40 -> 60", "task_weights.video: '(unset)' -> 3"]
    assert config_changes(old, old) == []


def test_a_resume_with_other_settings_says_which(tmp_path, capsys):
    cfg = SFTConfig(steps=10)
    assert warn_changed_config(tmp_path, cfg) == []   # no recorded config: nothing to compare
    (tmp_path / "config.json").write_text(json.dumps(to_dict(cfg)))
    assert warn_changed_config(tmp_path, cfg) == [] and capsys.readouterr().out == ""
    changed = SFTConfig(steps=20)
    assert warn_changed_config(tmp_path, changed) == ["steps: 10 -> 20"]
    assert "steps: 10 -> 20" in capsys.readouterr().out


@pytest.mark.parametrize("text,override,needle", [
    ("stepz: 3\n", None, "unknown key 'stepz'"),
    ("optim:\n  lrr: 1\n", None, "unknown key 'lrr'"),
    ("steps: many\n", None, "steps: expected an integer"),
    ("optim:\n  schedule: wavy\n", None, "optim.schedule: 'wavy' is not one of"),
    ("steps: 3\n", "optim.lr=fast", "optim.lr: expected a number"),
    ("[1, 2]\n", None, "top level must be a mapping"),
    ("optim:\n  lr_scale: {model.visual: -1}\n", None, "optim: lr_scale.model.visual: must be >= 0"),
    ("task_weights: {grounding: 0}\n", None, "task_weights must be integers >= 1"),
])
def test_bad_config_names_file_and_key(tmp_path, text, override, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, f, [override] if override else [])
    assert str(f) in str(e.value) and needle in str(e.value)


@pytest.mark.parametrize("text, needle", [
    ("round:\n  rl_replay: -1\n", "round: rl_replay: must be >= 0"),
    ("data:\n  tasks: [counting, juggling]\n", "data: tasks: unknown synthetic task(s) ['juggling']"),
])
def test_a_bad_pipeline_key_names_the_file_and_the_key(tmp_path, text, needle):
    f = tmp_path / "pipe.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(PipelineConfig, f)
    assert str(f) in str(e.value) and needle in str(e.value)
    assert load_config(PipelineConfig, None, ["data.tasks=[puzzle]"]).data.tasks == ("puzzle",)
