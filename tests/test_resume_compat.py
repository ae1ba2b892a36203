"""Checkpoints written before the config became typed (commit 8fdc865) still resume: the
settings they recorded are read under this version's keys (`compat.migrated`) and match what
the same command line records now. The fixture holds what 8fdc865 recorded for these command
lines (`checkpoint.settings` of its composed config)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_config

from dpo_cli import checkpoint
from dpo_cli.checkpoint.compat import migrated
from dpo_cli.checkpoint.store import STATE_FILE
from dpo_cli.config import validate
from dpo_cli.errors import UserError

RECORDED = json.loads((Path(__file__).parent / "fixtures" / "settings_8fdc865.json").read_text())


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_settings_recorded_before_the_typed_config_resume(name, tmp_path):
    old = RECORDED[name]
    (tmp_path / STATE_FILE).write_text(json.dumps(old["settings"]))
    now = checkpoint.settings(validate(make_config(old["overrides"])))
    checkpoint.check_compatible(tmp_path, now)  # raises on any difference


def test_a_changed_setting_is_still_refused(tmp_path):
    old = RECORDED["data=shp"]
    (tmp_path / STATE_FILE).write_text(json.dumps(old["settings"]))
    now = checkpoint.settings(validate(make_config([*old["overrides"], "data.format.max_pairs_per_post=3"])))
    with pytest.raises(UserError, match=r"data.format.max_pairs_per_post: 5 -> 3"):
        checkpoint.check_compatible(tmp_path, now)


def test_switching_a_metric_sink_or_the_end_benchmarks_on_or_off_resumes(tmp_path):
    """logger.tensorboard and logger.mlflow say where rows go, eval.harness what runs after the
    last step: not what is trained."""
    old = RECORDED["data=shp"]
    (tmp_path / STATE_FILE).write_text(json.dumps(old["settings"]))
    sinks = ["logger.tensorboard=true", "logger.mlflow.enabled=true", "logger.mlflow.experiment=other"]
    example = Path(__file__).resolve().parents[1] / "examples" / "harness"
    sinks += ["eval.harness.tasks=[sort_choice]", f"eval.harness.include_path={example}", "eval.harness.at_end=true"]
    now = checkpoint.settings(validate(make_config([*old["overrides"], *sinks])))
    checkpoint.check_compatible(tmp_path, now)  # raises on any difference


def test_old_keys_are_read_under_their_new_names():
    got = migrated({"data.format": "shp", "data.shp_max_pairs_per_post": 5, "data.columns.history": "post",
                    "data.synthetic.num_train": 8})  # fmt: skip
    assert got == {
        "data.format._target_": "dpo_cli.data.formats.shp.SHP",
        "data.format.max_pairs_per_post": 5,
        "data.format.columns.history": "post",
        "data.format.num_train": 8,
    }
    assert migrated({"data.format": "mix"}) == {"data.format": None}


def test_a_run_config_recorded_before_the_typed_config_reads_typed():
    """mode=eval rebuilds a run's initial policy and data from its recorded .hydra/config.yaml:
    one written by 8fdc865 (HH data, debug=default: it also recorded data.synthetic.*) reads as
    this version's typed config, the format by its class and without keys that format does not take."""
    from dpo_cli.data.formats import make_format
    from dpo_cli.data.formats.hh import HH
    from dpo_cli.recorded import saved_config
    from dpo_cli.schema import Config

    cfg = saved_config(Path(__file__).parent / "fixtures" / "run_config_8fdc865.yaml")
    assert isinstance(cfg, Config) and cfg.train.seed == 42 and cfg.model.random_init["model_type"] == "llama"
    assert cfg.data.format == {"_target_": "dpo_cli.data.formats.hh.HH"}
    assert isinstance(make_format(cfg.data.format), HH) and cfg.data.max_length == 128
