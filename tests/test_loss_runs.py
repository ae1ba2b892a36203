"""Every loss as a user runs it: each conf/loss file trains the built-in task and lowers its
loss; combinations, KTO (paired and unpaired data) and reference-free runs from the CLI; bad
loss settings are one clear message before any weights load."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import FAST, QUIET, REPO, read_metrics, run_cli
from test_cli import assert_one_clear_error

from dpo_cli import cli, train
from dpo_cli.errors import ConfigError

LOSS_FILES = sorted(p.stem for p in (Path(cli.config_dir()) / "loss").glob("*.yaml"))
# What a file needs beyond `loss=NAME` to be a runnable loss: combo starts with no terms.
EXTRA = {"combo": ["+loss@loss.terms.dpo=dpo", "+loss@loss.terms.sft=sft", "+loss.weights.sft=0.5"]}
REFERENCE_FREE = {"simpo", "cpo", "orpo", "simper", "sft"}
KTO_FIXTURE = REPO / "tests" / "fixtures" / "kto_sample.jsonl"


def _train_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "loss" in r]


@pytest.fixture
def built_references(monkeypatch):
    """Every reference a run builds (None when it builds none)."""
    built = []

    real = train._reference

    def recording(cfg, loss_fn, tokenizer, policy, *rest):
        refs = real(cfg, loss_fn, tokenizer, policy, *rest)
        built.append((refs[0], sum(p.numel() for p in policy.parameters())))
        return refs

    monkeypatch.setattr(train, "_reference", recording)
    return built


@pytest.mark.parametrize("name", LOSS_FILES)
def test_every_loss_file_trains_and_lowers_its_loss(train_run, name, built_references, tmp_path):
    """A few dozen steps of the built-in task: every logged value is finite and the loss of
    the last steps is below that of the first ones. A reference model exists exactly when a
    term needs one."""
    args = [
        f"loss={name}",
        *EXTRA.get(name, []),
        "train.max_steps=24",
        "train.eval_every=null",
        "train.save_every=null",
    ]
    _, run_dir = train_run(args, tmp_path / name)
    rows = _train_rows(run_dir)
    assert len(rows) == 24
    for r in rows:
        for key, value in r.items():
            assert math.isfinite(value), (name, key, r)
    first = sum(r["loss"] for r in rows[:4]) / 4
    last = sum(r["loss"] for r in rows[-4:]) / 4
    assert last < first, (name, first, last)

    (ref, policy_params), *_ = built_references
    if name in REFERENCE_FREE:
        assert ref is None
    else:
        assert ref is not None and ref.num_parameters() == policy_params


def test_reference_free_run_holds_no_reference_and_says_so(train_run, built_references, caplog):
    caplog.set_level("INFO", logger="dpo_cli.train")
    train_run(["loss=simpo", "train.max_steps=2"])
    assert built_references[0][0] is None
    assert "reference: none (no loss term needs one)" in caplog.text


def test_combination_logs_each_term_and_weights_add_up(tmp_path):
    """loss = 1.0 * dpo + 0.5 * sft, from the documented command line; the first step's policy
    equals the reference, so loss/dpo is exactly log 2."""
    proc = run_cli(
        [
            "dpo-train",
            *QUIET,
            *FAST,
            "loss=combo",
            "+loss@loss.terms.dpo=dpo",
            "+loss@loss.terms.sft=sft",
            "+loss.weights.sft=0.5",
            "train.max_steps=3",
            f"hydra.run.dir={tmp_path}/r",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    rows = _train_rows(tmp_path / "r")
    assert abs(rows[0]["loss/dpo"] - math.log(2)) < 1e-6
    for r in rows:
        assert r["loss"] == pytest.approx(r["loss/dpo"] + 0.5 * r["loss/sft"], rel=1e-6)


def test_recipe_terms_and_weights_are_overridable(train_run):
    _, run_dir = train_run(["loss=mpo", "loss.weights.sft=0.25", "loss.terms.dpo.beta=0.05", "train.max_steps=2"])
    row = _train_rows(run_dir)[0]
    want = 0.8 * row["loss/dpo"] + 0.2 * row["loss/bco_pair"] + 0.25 * row["loss/sft"]
    assert row["loss"] == pytest.approx(want, rel=1e-6)


def test_rpo_is_dpo_plus_the_chosen_nll(train_run):
    _, run_dir = train_run(["loss=rpo", "loss.nll_weight=0.5", "train.max_steps=2"])
    row = _train_rows(run_dir)[0]
    assert row["loss"] == pytest.approx(math.log(2) + 0.5 * row["nll_loss"], rel=1e-5)  # step 1: DPO's log 2


def test_kto_trains_on_unpaired_and_on_paired_data_from_the_cli(tmp_path):
    unpaired = run_cli(
        [
            "dpo-train",
            "data=kto",
            f"data.path={KTO_FIXTURE}",
            "loss=kto",
            "train.max_steps=3",
            "train.batch_size=8",
            "train.micro_batch_size=4",
            *QUIET,
            f"hydra.run.dir={tmp_path}/unpaired",
        ],
        cwd=tmp_path,
    )
    assert unpaired.returncode == 0, unpaired.stderr
    rows = _train_rows(tmp_path / "unpaired")
    assert all(math.isfinite(r["loss"]) and r["kl"] >= 0 for r in rows)
    assert "rewards/accuracies" not in rows[-1]  # unpaired examples have no pair to compare

    paired = run_cli(
        ["dpo-train", *QUIET, *FAST, "loss=kto", "train.max_steps=3", f"hydra.run.dir={tmp_path}/paired"], cwd=tmp_path
    )
    assert paired.returncode == 0, paired.stderr
    rows = _train_rows(tmp_path / "paired")
    assert all(math.isfinite(r["loss"]) and r["kl"] >= 0 for r in rows)
    assert 0 <= rows[-1]["rewards/accuracies"] <= 1


BAD_SETTINGS = {
    "exo-eps": (["loss=exo_pair", "loss.epsilon=0"], "loss.epsilon=0 must be in (0, 1)"),
    "ld-alpha": (["loss.ld_alpha=1.5"], "loss.ld_alpha=1.5 must be in [0, 1]"),
    "robust-eps": (["loss=robust", "loss.label_smoothing=0.5"], "loss.label_smoothing=0.5 must be in [0, 0.5)"),
    "f-div": (["loss.f_divergence=kl"], "loss.f_divergence='kl' is not one of reverse_kl"),
    "weights": (
        ["loss=mpo", "+loss.weights.sfft=0.5"],
        "loss.weights.sfft=0.5 names no term; the terms are: dpo, bco_pair, sft",
    ),
    "term-beta": (["loss=mpo", "loss.terms.dpo.beta=0"], "loss.terms.dpo.beta=0 must be > 0"),
    "nll-weight": (["loss=rpo", "loss.nll_weight=-1"], "loss.nll_weight=-1 must be >= 0"),
    "no-terms": (["loss=combo"], "loss.terms is empty"),
    "kto-data": (
        ["data=kto", f"data.path={KTO_FIXTURE}", "loss=mpo"],
        "loss: dpo, bco_pair needs preference pairs, but data.format holds unpaired",
    ),
    "kto-micro": (["loss=kto", "train.micro_batch_size=1"], "train.micro_batch_size=1: KTO estimates its KL"),
}


@pytest.mark.parametrize("case", BAD_SETTINGS)
def test_bad_loss_settings_are_refused_by_validation(case):
    from conftest import make_config

    from dpo_cli.config import validate

    args, needle = BAD_SETTINGS[case]
    with pytest.raises(ConfigError) as e:
        validate(make_config(QUIET + args))
    assert any(needle in p for p in e.value.problems), e.value.problems


@pytest.mark.parametrize("case", ["weights", "kto-data", "exo-eps"])
def test_bad_loss_settings_are_one_clear_error_from_the_cli(tmp_path, case):
    args, needle = BAD_SETTINGS[case]
    proc = run_cli(["dpo-train", *args, *QUIET, f"hydra.run.dir={tmp_path}/r"], cwd=tmp_path)
    assert_one_clear_error(proc, "invalid config", needle)
    assert proc.returncode == 2
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_resume_from_a_checkpoint_written_before_new_loss_keys(train_run, tmp_path):
    """A checkpoint from before the loss modifiers existed (no loss.f_divergence, ld_alpha, ...
    in its state) resumes while they keep their defaults, and is refused when one changed."""
    args = ["train.max_steps=4", "train.save_every=2", "train.keep_checkpoints=null"]
    _, run_dir = train_run(args, tmp_path / "r")
    shutil.rmtree(run_dir / "checkpoints" / "step-4")
    state_file = run_dir / "checkpoints" / "step-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    for key in ("loss.f_divergence", "loss.f_alpha", "loss.ld_alpha", "loss.wpo", "checkpoint_format"):
        del state[key]
    state_file.write_text(json.dumps(state))
    (state_file.parent / "manifest.json").unlink()  # such checkpoints predate manifests too
    backup = tmp_path / "backup"
    shutil.copytree(run_dir, backup)

    with pytest.raises(Exception, match=r"loss.wpo: absent from the checkpoint \(default False\) -> True"):
        train_run([*args, "loss.wpo=true", "train.resume=auto"], run_dir)
    shutil.rmtree(run_dir)
    shutil.copytree(backup, run_dir)
    train_run([*args, "train.resume=auto"], run_dir)
    assert [r["step"] for r in _train_rows(run_dir)] == [1, 2, 3, 4]


def test_validation_names_every_problem_of_a_combination():
    from conftest import make_config

    from dpo_cli.config import validate

    cfg = make_config(QUIET + ["loss=mpo", "loss.terms.dpo.beta=-1", "loss.terms.bco_pair.beta=0"])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert any(p.startswith("loss.terms.dpo.beta=-1") for p in e.value.problems)
    assert any(p.startswith("loss.terms.bco_pair.beta=0") for p in e.value.problems)


def test_validation_lists_the_loss_and_its_data_needs_together():
    """A loss that does not build still has its data needs checked (from its class)."""
    from conftest import make_config

    from dpo_cli.config import validate

    cases = [
        (["loss=kto", "train.micro_batch_size=1", "loss.beta=-1"], ["loss.beta=-1", "train.micro_batch_size=1"]),
        (["data=kto", f"data.path={KTO_FIXTURE}", "loss.beta=0"], ["loss.beta=0", "needs preference pairs"]),
        (
            ["loss=mpo", "loss.weights.sft=-1", "loss.terms.dpo.beta=0"],
            ["loss.terms.dpo.beta=0", "loss.weights.sft=-1"],
        ),
        (["loss.ld_alpha=abc"], ["loss.ld_alpha='abc' has the wrong type; expected a number or null"]),
    ]
    for args, needles in cases:
        with pytest.raises(ConfigError) as e:
            validate(make_config(QUIET + args))
        for needle in needles:
            assert any(needle in p for p in e.value.problems), (args, needle, e.value.problems)
