"""task=reward: the Bradley-Terry loss against a float64 hand computation (with data=pairs'
margins, from the rows to the loss), the pooled reward of padded rows, the judge's inputs built as
training built them, the refusals before any weights load, mode=inspect, and one short run
(final/ loads as a sequence-classification model and as `judge=reward_model`; a resume is
bit-equal; mode=eval on its final/ gives its last held-out metrics)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import FAST, QUIET, data_config, make_config, read_metrics, resumed_like_uninterrupted, train_once
from hydra import initialize_config_dir
from test_evalgen import CHAT, save_reward_model

from dpo_cli import cli, overrides, preflight, rewardformat
from dpo_cli.batch import CHOSEN, REJECTED
from dpo_cli.config import validate
from dpo_cli.data.chat import render
from dpo_cli.data.collate import collate
from dpo_cli.data.prepare import prepare
from dpo_cli.data.tokenize import tokenize_pairs
from dpo_cli.errors import DataError
from dpo_cli.judges import RewardModelJudge
from dpo_cli.modeling import byte_tokenizer
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


def _classifier(pad_id: int = 0, vocab_size: int = 32) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
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


# --- data=pairs' margins, from the rows to the loss ---------------------------------------------


def _margin_rows(n: int = 40) -> list[dict]:
    """Text pairs `q<i>:`, a margin in the column `gap` on two rows of three (none on the others)."""
    rows = [{"prompt": f"q{i}:", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(n)]
    for i, row in enumerate(rows):
        if i % 3:
            row["gap"] = round(0.35 * i - 4.0, 2)
    return rows


def _write_rows(path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_margins_travel_from_the_rows_to_the_loss(tmp_path):
    """data=pairs rows with a margin (mapped from column `gap`; a row without one: 0), tokenized,
    read back from the tokenization cache, collated: the objective's loss is
    mean(-log sigmoid(r_c - r_r - m)), computed here in float64 from each sequence scored alone."""
    rows = _margin_rows()
    data = data_config(
        format="pairs", columns={"margin": "gap"}, path=str(_write_rows(tmp_path / "p.jsonl", rows)),
        eval_holdout=0, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    tokenizer = byte_tokenizer()
    first = prepare(data, tokenizer, 0)
    again = prepare(data, tokenizer, 0)
    assert again.cached and again.train == first.train
    want = {f"q{i}:": r.get("gap") for i, r in enumerate(rows)}
    for ex in first.train:
        assert ex.get("margin") == want[tokenizer.decode(ex["prompt_ids"], skip_special_tokens=True)]
    examples = [ex for ex in first.train if "margin" in ex][:4] + [ex for ex in first.train if "margin" not in ex][:2]
    margins = [ex.get("margin", 0.0) for ex in examples]
    batch = collate(examples, tokenizer.pad_token_id)
    torch.testing.assert_close(batch["margin"], torch.tensor(margins))
    model = _classifier(tokenizer.pad_token_id, len(tokenizer))
    loss, parts = RewardObjective().score(model, batch)
    with torch.no_grad():

        def alone(ids: list[int]) -> float:
            return float(model(input_ids=torch.tensor([ids])).logits[0, 0])

        diffs = [
            alone(ex["prompt_ids"] + ex["chosen_ids"]) - alone(ex["prompt_ids"] + ex["rejected_ids"]) - m
            for ex, m in zip(examples, margins, strict=True)
        ]
    hand = sum(math.log1p(math.exp(-d)) for d in diffs) / len(diffs)
    assert loss.item() == pytest.approx(hand, abs=1e-5)
    without, _ = RewardObjective().score(model, {k: v for k, v in batch.items() if k != "margin"})
    assert abs(without.item() - hand) > 1e-3


def test_a_margin_that_is_no_number_is_refused_with_its_row(tmp_path):
    from dpo_cli.data import load_pairs

    path = _write_rows(tmp_path / "p.jsonl", [{"prompt": "q:", "chosen": " a", "rejected": " b", "margin": "high"}])
    with pytest.raises(DataError, match=r"line 1: field 'margin' must be a finite number, got 'high'"):
        load_pairs(data_config(format="pairs", path=str(path), eval_holdout=0), 0)


def test_dpo_refuses_data_with_margins_before_weights_load(tmp_path, train_run):
    path = _write_rows(tmp_path / "p.jsonl", _margin_rows())
    with pytest.raises(DataError, match=r"carry a 'margin' field .* only task=reward"):
        train_run(["data=pairs", f"data.path={path}", "data.format.columns.margin=gap"])


def test_inspect_reports_the_margin_refusal_as_training_would(tmp_path):
    from conftest import make_config

    from dpo_cli import config, preflight
    from dpo_cli.errors import UserError

    path = _write_rows(tmp_path / "p.jsonl", _margin_rows())
    args = ["mode=inspect", "data=pairs", f"data.path={path}", "data.format.columns.margin=gap", "data.eval_holdout=4",
            "data.cache_dir=null", "train.batch_size=4", "train.micro_batch_size=4", "judge=none"]  # fmt: skip
    with pytest.raises(UserError, match=r"carry a 'margin' field"):
        preflight.run(config.validate(make_config(args), quiet=True))
    reward = config.validate(make_config([*args, "task=reward"]), quiet=True)
    assert "training would refuse" not in preflight.run(reward)  # task=reward reads them


# --- the judge's inputs: as training built them -------------------------------------------------


def _as_messages(pair: dict) -> dict:
    return {
        "prompt": [{"role": "user", "content": pair["prompt"]}],
        **{k: [{"role": "assistant", "content": pair[k]}] for k in ("chosen", "rejected")},
    }


@pytest.mark.parametrize("kind", ["text", "messages"])
def test_the_judge_scores_a_dpo_cli_reward_model_as_training_scored_it(tmp_path, kind):
    """With the record a task=reward run's export writes in final/, judge=reward_model (input_format
    auto) builds the ids training built (prompt + response + EOS; messages through the chat
    template; a long prompt cut to data.max_prompt_length, keeping BOS): its score of (prompt,
    response) is the reward the objective computes for the same pair (`sequence_rewards` on the
    collated batch). The reward model's tokenizer alone (text: no EOS; chat: no truncation) is not."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = save_reward_model(tmp_path / "final", chat_template=CHAT)
    data = data_config(format="pairs", max_length=40, max_prompt_length=24)
    assert rewardformat.write(path, data) == [path / rewardformat.RECORD]
    pairs = [
        {"prompt": "sort 3917:", "chosen": " 1379", "rejected": " 3197"},
        {"prompt": "sort " + "9876543210" * 4 + ":", "chosen": " 0123456789", "rejected": " 9876"},
    ]
    pairs = pairs if kind == "text" else [_as_messages(p) for p in pairs]
    tokenizer = AutoTokenizer.from_pretrained(path)  # the one the run saved in final/
    rendered, _ = render(pairs, tokenizer, None)
    examples, stats = tokenize_pairs(rendered, tokenizer, data.max_length, data.max_prompt_length)
    assert len(examples) == 2 and stats.prompts == 1
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        rewards = sequence_rewards(AutoModelForSequenceClassification.from_pretrained(path).eval(), batch)
    want = rewards.tolist()  # CHOSEN, then REJECTED, in pair order

    def text(response):
        return response if isinstance(response, str) else response[0]["content"]

    prompts = [p["prompt"] for p in pairs] * 2
    responses = [text(p["chosen"]) for p in pairs] + [text(p["rejected"]) for p in pairs]
    judge = RewardModelJudge(str(path), batch_size=3)
    assert judge.score(prompts, responses) == pytest.approx(want, abs=1e-5)
    assert judge.format == "dpo_cli"
    plain = RewardModelJudge(str(path), input_format="text" if kind == "text" else "chat").score(prompts, responses)
    assert plain != pytest.approx(want, abs=1e-4)


def test_the_dpo_cli_input_format_needs_the_record(tmp_path):
    path = save_reward_model(tmp_path / "rm")
    problem = RewardModelJudge(str(path), input_format="dpo_cli").check(["q"])
    assert problem and rewardformat.RECORD in problem and "judge.input_format" in problem


def test_a_lora_reward_models_final_loads_for_mode_eval_as_it_scored(tmp_path):
    """final/ of a LoRA reward run (the adapter, the score head trained whole, a random-init base
    in final/base): mode=eval loads it as a sequence classifier giving the trained model's scores."""
    from dpo_cli.checkpoint.export import _point_adapter_at_base
    from dpo_cli.evalmode import load_saved
    from dpo_cli.lora import apply_lora
    from dpo_cli.modeling.options import LoraConfig
    from dpo_cli.tasks import TASKS

    tokenizer = byte_tokenizer()
    model = apply_lora(_classifier(tokenizer.pad_token_id, len(tokenizer)).float(), LoraConfig(r=4), False, "SEQ_CLS")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # lora_B starts at zero: move every trained weight
                p.add_(0.1 * torch.randn_like(p))
    final = tmp_path / "final"
    _point_adapter_at_base(model, tokenizer, final / "base")
    model.save_pretrained(final)
    loaded = load_saved(validate(make_config(["task=reward"])).model, str(final), tokenizer, TASKS["reward"])
    ids = torch.tensor([[1, 40, 41, 42, 2]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


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

    final = reward_run[1] / "final"
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    # The run recorded how it built its inputs: the judge (input_format=auto) reads them so.
    assert json.loads((final / rewardformat.RECORD).read_text())["format"] == "dpo_cli"
    judge = RewardModelJudge(name_or_path=str(final))
    judge.score(["sort 3917:"], [" 1379"])
    assert judge.format == "dpo_cli"
    text = RewardModelJudge(name_or_path=str(final), input_format="text")
    got = text.score(["sort 3917:", "sort 21:"], [" 1379", " 12"])
    tok = AutoTokenizer.from_pretrained(final)
    with torch.no_grad():
        want = [float(model(**tok([t], return_tensors="pt")).logits[0, 0]) for t in ("sort 3917: 1379", "sort 21: 12")]
    assert got == pytest.approx(want, abs=1e-5)
    card = (final / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "AutoModelForSequenceClassification" in card


@pytest.mark.integration
def test_a_resumed_reward_run_is_bit_equal_to_the_uninterrupted_one(reward_run, tmp_path):
    resumed_like_uninterrupted(reward_run[1], 2, tmp_path / "resumed", [*RUN, "train.eval_every=null"])


@pytest.mark.integration
def test_eval_mode_on_a_reward_models_final_gives_the_runs_last_held_out_metrics(reward_run, tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState

    from dpo_cli import evalmode

    trained = [r for r in read_metrics(reward_run[1]) if "eval_loss" in r][-1]
    out = tmp_path / "eval"
    out.mkdir()
    monkeypatch.chdir(out)
    final = reward_run[1] / "final"
    cfg = validate(make_config([*QUIET, *FAST, *RUN, "mode=eval", "model=pretrained", f"model.name_or_path={final}"]))
    AcceleratorState._reset_state(reset_partial_state=True)  # one Accelerator per process, as in a fresh one
    row = evalmode.run(cfg, out)
    for key in ("eval_loss", "eval_accuracy", "eval_margin", "eval_rewards/chosen", "eval_rewards/rejected"):
        assert row[key] == pytest.approx(trained[key], rel=1e-5, abs=1e-6), key
    record = json.loads((out / "eval.json").read_text())
    assert record["metrics"] == {k: v for k, v in row.items() if k != "step"} and read_metrics(out) == [row]
    assert record["reference"] == "no reference (task=reward)" and record["loss"].startswith("BradleyTerry")
