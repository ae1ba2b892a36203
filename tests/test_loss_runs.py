"""Every loss as a user runs it: each conf/loss file, on a batch of the built-in task (a few
optimizer steps of the tiny model: finite loss and metrics, gradients everywhere, a lower
loss); one real training run per family (paired with a reference, reference-free, a
combination, KTO on unpaired data) from the loop or the CLI; bad loss settings are one clear
message before any weights load."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import FAST, QUIET, REPO, make_config, read_metrics, run_cli
from hydra.utils import instantiate
from test_cli import assert_one_clear_error

from dpo_cli import build, cli
from dpo_cli.data.batching import step_indices
from dpo_cli.data.prepare import prepare
from dpo_cli.errors import ConfigError
from dpo_cli.modeling import byte_tokenizer, load_model
from dpo_cli.reference import ModelReference
from dpo_cli.scoring import batch_loss, make_batch

LOSS_FILES = sorted(p.stem for p in (Path(cli.config_dir()) / "loss").glob("*.yaml"))
# What a file needs beyond `loss=NAME` to be a runnable loss: combo starts with no terms.
EXTRA = {"combo": ["+loss@loss.terms.dpo=dpo", "+loss@loss.terms.sft=sft", "+loss.weights.sft=0.5"]}
REFERENCE_FREE = {"simpo", "cpo", "orpo", "simper", "sft"}
KTO_FIXTURE = REPO / "tests" / "fixtures" / "kto_sample.jsonl"
# Metrics every loss logs on paired data, and those a file adds (its terms, its NLL, KTO's KL).
METRICS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "logits/chosen", "logits/rejected"}  # fmt: skip
REFERENCE_METRICS = {"logps/chosen_change", "logps/chosen_below_reference"}
OWN_METRICS = {
    "combo": {"loss/dpo", "loss/sft"},
    "mpo": {"loss/dpo", "loss/bco_pair", "loss/sft"},
    "dpo_simpo": {"loss/dpo", "loss/simpo"},
    "rpo": {"nll_loss"},
    "cpo": {"nll_loss"},
    "orpo": {"nll_loss", "log_odds_ratio", "log_odds_chosen"},
    "kto": {"kl"},
}
UPDATES = 5  # optimizer steps on the batch: DPO-Positive's penalty first rises, then the loss falls


def _train_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "loss" in r]


@pytest.fixture
def built_references(monkeypatch):
    """Every reference a run builds (None when it builds none)."""
    built = []

    real = build._reference

    def recording(cfg, loss_fn, tokenizer, policy, *rest):
        refs = real(cfg, loss_fn, tokenizer, policy, *rest)
        built.append((refs[0], sum(p.numel() for p in policy.parameters())))
        return refs

    monkeypatch.setattr(build, "_reference", recording)
    return built


@pytest.fixture(scope="module")
def tiny():
    """What every loss's batch comes from, made once: the tiny policy at its initial weights,
    the built-in task's training pairs and the pairs of its first optimizer step (8)."""
    cfg = make_config([*QUIET, *FAST])
    tokenizer = byte_tokenizer()
    train = prepare(cfg.data, tokenizer, cfg.train.seed).train
    policy = load_model(cfg.model, tokenizer, cfg.train.seed)
    indices = step_indices(0, len(train), cfg.train.batch_size, cfg.train.seed)
    return SimpleNamespace(policy=policy, train=train, indices=indices, pad_id=tokenizer.pad_token_id)


def _metrics(parts) -> dict[str, float]:
    return {k: float(s / c) for k, (s, c) in parts.items() if c > 0}


def _learn(tiny, overrides: list[str], updates: int = UPDATES):
    """The loss of `overrides` (composed as a run would) on the first step's batch, in the
    prompt-shared rows a run of the tiny model uses: the policy (a copy of the initial one)
    takes `updates` steps of the run's optimizer on it; the reference (when a term needs one)
    is the initial policy. Returns the loss, the metrics before each step and after the last,
    and the gradients of the first backward."""
    cfg = make_config([*QUIET, *FAST, *overrides])
    loss_fn = instantiate(cfg.loss)
    batch = make_batch(tiny.train, tiny.indices, tiny.pad_id, loss_fn, "cpu", "shared")
    policy = copy.deepcopy(tiny.policy)
    reference = ModelReference(copy.deepcopy(tiny.policy), "the initial policy") if loss_fn.requires_reference else None
    optimizer = instantiate(cfg.optimizer)(params=policy.parameters())
    history, grads = [], None
    for step in range(updates + 1):
        loss, parts = batch_loss(policy, reference, loss_fn, batch)
        history.append(_metrics(parts))
        if step == updates:
            break
        loss.backward()
        if grads is None:
            grads = {n: None if p.grad is None else p.grad.clone() for n, p in policy.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
    return loss_fn, history, grads


@pytest.mark.parametrize("name", LOSS_FILES)
def test_every_loss_file_learns_a_batch(tiny, name):
    """Each conf/loss file on a batch of the built-in task: every metric is finite, with the
    loss's own ones; every parameter gets a finite, non-zero gradient; a few optimizer steps
    lower the loss. A reference is needed exactly when a term needs one."""
    loss_fn, history, grads = _learn(tiny, [f"loss={name}", *EXTRA.get(name, [])])
    assert loss_fn.requires_reference == (name not in REFERENCE_FREE)
    want = METRICS | OWN_METRICS.get(name, set()) | (REFERENCE_METRICS if loss_fn.requires_reference else set())
    assert want <= history[0].keys(), (name, want - history[0].keys())
    for metrics in history:
        for key, value in metrics.items():
            assert math.isfinite(value), (name, key, metrics)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), name
    assert sum(float(g.norm()) for g in grads.values()) > 0, name
    assert history[-1]["loss"] < history[0]["loss"], (name, [m["loss"] for m in history])


def test_kto_on_pairs_estimates_a_kl_and_compares_the_pairs(tiny):
    """KTO on paired data: its batch holds KL rows (mismatched responses), the KL estimate is
    not negative, and paired data still has an accuracy over its pairs."""
    _, history, _ = _learn(tiny, ["loss=kto"], updates=1)
    for metrics in history:
        assert metrics["kl"] >= 0 and 0 <= metrics["rewards/accuracies"] <= 1, metrics


def test_recipe_terms_and_weights_are_overridable(tiny):
    loss_fn, history, _ = _learn(tiny, ["loss=mpo", "loss.weights.sft=0.25", "loss.terms.dpo.beta=0.05"], updates=1)
    for row in history:
        want = 0.8 * row["loss/dpo"] + 0.2 * row["loss/bco_pair"] + 0.25 * row["loss/sft"]
        assert row["loss"] == pytest.approx(want, rel=1e-6)
    assert "beta=0.05" in repr(loss_fn), loss_fn


def test_rpo_is_dpo_plus_the_chosen_nll(tiny):
    _, history, _ = _learn(tiny, ["loss=rpo", "loss.nll_weight=0.5"], updates=0)
    row = history[0]
    assert row["loss"] == pytest.approx(math.log(2) + 0.5 * row["nll_loss"], rel=1e-5)  # policy = reference: log 2


@pytest.mark.integration
@pytest.mark.parametrize("name", ["dpo", "simpo"], ids=["paired-with-reference", "reference-free"])
def test_a_loss_family_trains_and_lowers_its_loss(train_run, name, built_references, tmp_path, caplog):
    """The real loop, a few dozen steps of the built-in task: every logged value is finite and
    the loss of the last steps is below that of the first ones. A reference model exists
    exactly when a term needs one, and a run without one says so."""
    caplog.set_level("INFO")
    args = [f"loss={name}", "train.max_steps=24", "train.eval_every=null", "train.save_every=null"]
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
        assert "reference: none (no loss term needs one)" in caplog.text
    else:
        assert ref is not None and ref.num_parameters() == policy_params


@pytest.mark.integration
def test_combination_logs_each_term_and_weights_add_up(tmp_path):
    """loss = 1.0 * dpo + 0.5 * sft, from the documented command line, trains the built-in
    task: finite rows, a lower loss at the end; the first step's policy equals the reference,
    so loss/dpo is exactly log 2."""
    proc = run_cli(
        [
            "dpo-train",
            *QUIET,
            *FAST,
            "loss=combo",
            "+loss@loss.terms.dpo=dpo",
            "+loss@loss.terms.sft=sft",
            "+loss.weights.sft=0.5",
            "train.max_steps=24",
            "train.eval_every=null",
            "train.save_every=null",
            f"hydra.run.dir={tmp_path}/r",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    rows = _train_rows(tmp_path / "r")
    assert len(rows) == 24 and all(math.isfinite(v) for r in rows for v in r.values())
    assert sum(r["loss"] for r in rows[-4:]) < sum(r["loss"] for r in rows[:4])
    assert abs(rows[0]["loss/dpo"] - math.log(2)) < 1e-6
    for r in rows:
        assert r["loss"] == pytest.approx(r["loss/dpo"] + 0.5 * r["loss/sft"], rel=1e-6)
    assert "reference: frozen copy of the initial policy" in (tmp_path / "r" / "train.log").read_text()


@pytest.mark.integration
def test_kto_trains_on_unpaired_data_from_the_cli(tmp_path):
    """KTO on unpaired examples from the CLI: finite rows, a KL estimate that is not negative,
    a lower loss at the end; no accuracy (no pair to compare) and examples_per_s, not pairs_per_s."""
    unpaired = run_cli(
        [
            "dpo-train",
            *QUIET,
            *FAST,
            "data=kto",
            f"data.path={KTO_FIXTURE}",
            "loss=kto",
            "train.max_steps=24",
            "train.eval_every=null",
            "train.save_every=null",
            f"hydra.run.dir={tmp_path}/unpaired",
        ],
        cwd=tmp_path,
    )
    assert unpaired.returncode == 0, unpaired.stderr
    rows = _train_rows(tmp_path / "unpaired")
    assert len(rows) == 24
    assert all(math.isfinite(r["loss"]) and r["kl"] >= 0 for r in rows)
    assert sum(r["loss"] for r in rows[-4:]) < sum(r["loss"] for r in rows[:4])
    assert "rewards/accuracies" not in rows[-1]  # unpaired examples have no pair to compare
    assert all("pairs_per_s" not in r and r["examples_per_s"] > 0 for r in rows)


BAD_SETTINGS = {
    "exo-eps": (["loss=exo_pair", "loss.epsilon=0"], "loss.epsilon=0.0 must be in (0, 1)"),
    "ld-alpha": (["loss.ld_alpha=1.5"], "loss.ld_alpha=1.5 must be in [0, 1]"),
    "robust-eps": (["loss=robust", "loss.label_smoothing=0.5"], "loss.label_smoothing=0.5 must be in [0, 0.5)"),
    "f-div": (["loss.f_divergence=kl"], "loss.f_divergence='kl' is not one of reverse_kl"),
    "weights": (
        ["loss=mpo", "+loss.weights.sfft=0.5"],
        "loss.weights.sfft=0.5 names no term; the terms are: dpo, bco_pair, sft",
    ),
    "term-beta": (["loss=mpo", "loss.terms.dpo.beta=0"], "loss.terms.dpo.beta=0.0 must be > 0"),
    "nll-weight": (["loss=rpo", "loss.nll_weight=-1"], "loss.nll_weight=-1.0 must be >= 0"),
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


@pytest.mark.integration
@pytest.mark.parametrize("case", ["weights", "kto-data", "exo-eps"])
def test_bad_loss_settings_are_one_clear_error_from_the_cli(tmp_path, case):
    args, needle = BAD_SETTINGS[case]
    proc = run_cli(["dpo-train", *args, *QUIET, f"hydra.run.dir={tmp_path}/r"], cwd=tmp_path)
    assert_one_clear_error(proc, "invalid config", needle)
    assert proc.returncode == 2
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


@pytest.mark.integration
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
    ]
    for args, needles in cases:
        with pytest.raises(ConfigError) as e:
            validate(make_config(QUIET + args))
        for needle in needles:
            assert any(needle in p for p in e.value.problems), (args, needle, e.value.problems)
