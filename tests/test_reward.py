"""task=reward: the Bradley-Terry loss against a float64 hand computation, the pooled reward of
padded rows, the refusals before any weights load, mode=inspect, and one short run (final/ loads
as a sequence-classification model and as `judge=reward_model`; a resume is bit-equal)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_config, read_metrics, resumed_like_uninterrupted, train_once
from hydra import initialize_config_dir

from dpo_cli import cli, overrides, preflight
from dpo_cli.batch import CHOSEN, REJECTED
from dpo_cli.config import validate
from dpo_cli.reward import RewardObjective, bradley_terry, sequence_rewards


def test_bradley_terry_matches_a_float64_hand_computation():
    """Pair 0: r_c=1, r_r=0, m=0.5: -log sigmoid(0.5) = log(1 + e^-0.5) = 0.474077; centring
    0.1 * (1 + 0)^2 = 0.1. Pair 1: r_c=-0.5, r_r=1, m=0: log(1 + e^1.5) = 1.701413; 0.1 * 0.25.
    Mean: (0.574077 + 1.726413) / 2 = 1.150245."""
    chosen = torch.tensor([1.0, -0.5], dtype=torch.float64)
    rejected = torch.tensor([0.0, 1.0], dtype=torch.float64)
    margin = torch.tensor([0.5, 0.0], dtype=torch.float64)
    want = (math.log1p(math.exp(-0.5)) + 0.1 * 1.0 + math.log1p(math.exp(1.5)) + 0.1 * 0.25) / 2
    assert want == pytest.approx(1.150245, abs=1e-6)
    torch.testing.assert_close(bradley_terry(chosen, rejected, margin, 0.1).item(), want, rtol=0, atol=1e-12)
    # No margin, no centring (null or 0): the plain Bradley-Terry NLL; equal rewards give log 2.
    plain = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.5))) / 2
    for off in (None, 0.0):
        torch.testing.assert_close(bradley_terry(chosen, rejected, None, off).item(), plain, rtol=0, atol=1e-12)
    torch.testing.assert_close(bradley_terry(chosen, chosen).item(), math.log(2), rtol=0, atol=1e-12)


def _classifier(pad_id: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_labels=1, pad_token_id=pad_id,
    )  # fmt: skip
    return LlamaForSequenceClassification(config).double().eval()


@pytest.mark.parametrize("side", ["right", "left"])
def test_the_pooled_reward_is_the_score_at_the_last_real_token(side):
    """Rows of 5, 3 and 1 real tokens padded on one side: each reward is the score head's output
    at the row's last real token (from the same forward's last hidden states)."""
    model, pad = _classifier(), 0
    ids = [[5, 6, 7, 8, 9], [3, 4, 10], [11]]
    rows = [[pad] * (5 - len(r)) + r if side == "left" else r + [pad] * (5 - len(r)) for r in ids]
    input_ids = torch.tensor(rows)
    mask = (input_ids != pad).long()
    batch = {"input_ids": input_ids, "attention_mask": mask, "role": torch.tensor([CHOSEN, REJECTED, CHOSEN])}
    with torch.no_grad():
        got = sequence_rewards(model, batch)
        hidden = model.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        scores = model.score(hidden)[..., 0]
    last = [4, 4, 4] if side == "left" else [4, 2, 0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, scores[torch.arange(3), torch.tensor(last)].float())
    if side == "right":  # a right-padded row scores as the sequence alone
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([ids[1]])).logits[0, 0].float()
        torch.testing.assert_close(got[1], alone)


def test_the_objective_pairs_chosen_with_rejected_and_names_metrics_as_trl():
    model = _classifier()
    ids = torch.tensor([[5, 6, 7], [5, 6, 8], [9, 6, 7], [9, 6, 8]])
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "role": torch.tensor([CHOSEN, CHOSEN, REJECTED, REJECTED]),
    }
    loss, parts = RewardObjective(center_coefficient=0.01).score(model, batch)
    r = sequence_rewards(model, batch).detach()
    chosen, rejected = r[:2], r[2:]
    torch.testing.assert_close(loss.detach(), bradley_terry(chosen, rejected, None, 0.01))
    means = {name: float(s / c) for name, (s, c) in parts.items()}
    assert set(means) == {"loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected"}
    assert means["accuracy"] == pytest.approx(float((chosen > rejected).float().mean()))
    assert means["margin"] == pytest.approx(float((chosen - rejected).mean()), abs=1e-6)
    assert loss.requires_grad


def test_lora_on_a_reward_model_trains_the_score_head_whole_and_saves_a_plain_base(tmp_path):
    """peft's SEQ_CLS: adapters on the body, the new score head trained whole (modules_to_save);
    final/base/ (a random-init base) holds the head as `score.weight`, not peft's copies."""
    from safetensors.torch import load_file

    from dpo_cli.checkpoint.export import _point_adapter_at_base
    from dpo_cli.lora import apply_lora
    from dpo_cli.modeling import byte_tokenizer
    from dpo_cli.modeling.options import LoraConfig

    model = apply_lora(_classifier().float(), LoraConfig(r=4), False, "SEQ_CLS")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".score." in n and "modules_to_save" in n for n in trainable), trainable
    assert any("lora_A" in n for n in trainable) and not any("embed_tokens" in n for n in trainable)
    _point_adapter_at_base(model, byte_tokenizer(), tmp_path / "base")
    keys = set(load_file(tmp_path / "base" / "model.safetensors"))
    assert "score.weight" in keys and not any("modules_to_save" in k or "original_module" in k for k in keys)


def _job_problems(args: list[str]) -> list[str]:
    """What the command line `dpo-train ARGS` is refused for, before Hydra runs it."""
    cli.register()
    with initialize_config_dir(config_dir=cli.config_dir(), version_base="1.3"):
        cfg, found = overrides.compose_job(args)
        return found + overrides.job_problems(cfg, full=True)


def test_settings_the_reward_task_does_not_read_are_refused_before_weights_load():
    problems = _job_problems(
        ["task=reward", "loss=ipo", "loss.beta=0.2", "judge=sort", "reference.precompute=true", "train.layout=packed"]
    )
    text = "\n".join(problems)
    for given in ("loss=ipo", "loss.beta=0.2", "judge=sort", "reference.precompute=True", "train.layout=packed"):
        assert given in text, text
    assert len(problems) == 5, text
    assert _job_problems(["task=reward", "judge=none", "debug=default"]) == []
    assert _job_problems(["data=kto", "data.path=x.jsonl", "task=reward", "loss=kto"])  # unpaired data, a loss
    assert any("read by task=reward only" in p for p in _job_problems(["reward.center_coefficient=0.1"]))


def test_every_task_the_schema_allows_is_described():
    from dpo_cli import schema, tasks

    assert set(tasks.TASKS) == set(schema.TASKS) and schema.Config().task == "dpo"


def test_the_task_logs_what_a_group_set_and_it_does_not_use(caplog):
    """data=synthetic chooses loss=rpo and judge=sort, model=tiny a warm start: not used by
    task=reward, said in the log, and the judge and warm start turned off."""
    with caplog.at_level("INFO"):
        c = validate(make_config(["task=reward"]))
    assert c.judge is None and c.model.warm_start.steps == 0
    assert "not used: the loss section (loss: DPOLoss)" in caplog.text
    assert "model.warm_start (steps 256" in caplog.text and "the judge (SortJudge)" in caplog.text


def test_mode_inspect_reports_a_reward_run():
    text = preflight.run(validate(make_config(["task=reward", "mode=inspect", "debug=default"])))
    assert "batches: layout padded: task=reward" in text
    assert "reference       0.0 MiB" in text


# --- one short run, and its resume from a copied checkpoint (bit-equal) ------------------------

RUN = ["task=reward", "train.max_steps=4", "train.save_every=2", "train.keep_checkpoints=null"]


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    """4 steps of reward-model training on the built-in task, checkpoints after steps 2 and 4,
    and the held-out metrics at the end."""
    return train_once(tmp_path_factory.mktemp("reward") / "run", [*RUN, "train.eval_every=null"])


@pytest.mark.integration
def test_a_reward_run_logs_accuracy_and_margin(reward_run):
    rows = read_metrics(reward_run[1])
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in evals] == [4]
    for r in train:
        assert {"accuracy", "margin", "rewards/chosen", "rewards/rejected"} <= r.keys()
        assert not any(k.startswith(("logps/", "rewards/acc", "rewards/margins")) for k in r)
        assert r["margin"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-5)
    assert {"eval_accuracy", "eval_margin", "eval_loss"} <= evals[0].keys()
    assert all(math.isfinite(v) for r in rows for v in r.values())


@pytest.mark.integration
def test_final_loads_as_a_sequence_classifier_and_as_the_reward_model_judge(reward_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dpo_cli.judges import RewardModelJudge

    final = reward_run[1] / "final"
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    judge = RewardModelJudge(name_or_path=str(final))
    got = judge.score(["sort 3917:", "sort 21:"], [" 1379", " 12"])
    tok = AutoTokenizer.from_pretrained(final)
    with torch.no_grad():
        want = [float(model(**tok([t], return_tensors="pt")).logits[0, 0]) for t in ("sort 3917: 1379", "sort 21: 12")]
    assert got == pytest.approx(want, abs=1e-5)
    card = (final / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "AutoModelForSequenceClassification" in card


@pytest.mark.integration
def test_a_resumed_reward_run_is_bit_equal_to_the_uninterrupted_one(reward_run, tmp_path):
    resumed_like_uninterrupted(reward_run[1], 2, tmp_path / "resumed", [*RUN, "train.eval_every=null"])
