"""Generation evaluation: judges, the win rate and its interval, prompts, sampling, and the
outputs a run writes (samples, metrics, reports)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from conftest import make_config, read_metrics

from dpo_cli.config import validate
from dpo_cli.data.formats.synthetic import make_pairs
from dpo_cli.errors import ConfigError, ModelLoadError
from dpo_cli.evalgen import GenerationEval, GenPrompt, Sample, eval_prompts, win_rate
from dpo_cli.judges import RewardModelJudge, SortJudge
from dpo_cli.modeling import byte_tokenizer

# --- the win rate and its interval --------------------------------------------------------------


def test_win_rate_counts_ties_as_half():
    rate = win_rate([1, 0, 1, 1, 0.5], [0, 0, 1, 0, 0.7], confidence=0.95)
    # wins: prompts 1 and 4; ties: 2 and 3; loss: 5 -> (2 + 2/2) / 5
    assert rate["win_rate"] == pytest.approx(0.6)
    assert rate["tie_rate"] == pytest.approx(0.4)


@pytest.mark.parametrize(
    "successes, n, low, high",
    [
        (0, 10, 0.0, 0.2775),  # the textbook Wilson 95% interval for 0 of 10
        (3, 4, 0.3006, 0.9544),  # 3 of 4
        (50, 100, 0.4038, 0.5962),  # 1/2 of 100
    ],
)
def test_interval_is_wilsons(successes, n, low, high):
    rate = win_rate([1.0] * successes + [0.0] * (n - successes), [0.5] * n, confidence=0.95)
    assert rate["win_rate"] == pytest.approx(successes / n)
    assert rate["win_rate_low"] == pytest.approx(low, abs=1e-4)
    assert rate["win_rate_high"] == pytest.approx(high, abs=1e-4)


def test_interval_narrows_with_more_prompts_and_widens_with_confidence():
    few = win_rate([1, 0] * 5, [0.5] * 10, 0.95)
    many = win_rate([1, 0] * 500, [0.5] * 1000, 0.95)
    wider = win_rate([1, 0] * 5, [0.5] * 10, 0.99)
    width = lambda r: r["win_rate_high"] - r["win_rate_low"]  # noqa: E731
    assert width(many) < width(few) < width(wider)


# --- the exact judge -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, verdict",
    [(" 1379", "correct"), ("1379", "correct"), (" 1739", "misordered"), (" 1369", "miscopied"),
     (" 137", "other"), (" 13799", "other"), (" abcd", "other")],
)  # fmt: skip
def test_sort_judge_checks_the_tasks_rule(response, verdict):
    judge = SortJudge()
    assert judge.verdict("sort 3917:", response) == verdict
    assert judge.score(["sort 3917:"], [response]) == [1.0 if verdict == "correct" else 0.0]


def test_sort_judge_agrees_with_the_tasks_pairs():
    pairs = make_pairs(200, seed=3, min_digits=3, max_digits=8)
    judge = SortJudge()
    assert judge.score([p["prompt"] for p in pairs], [p["chosen"] for p in pairs]) == [1.0] * 200
    assert judge.score([p["prompt"] for p in pairs], [p["rejected"] for p in pairs]) == [0.0] * 200
    assert {judge.verdict(p["prompt"], p["rejected"]) for p in pairs} == {"misordered", "miscopied"}


def test_sort_judge_refuses_other_prompts():
    assert "data=synthetic" in SortJudge().check(["\n\nHuman: hi\n\nAssistant:"])
    assert SortJudge().check(["sort 123:"]) is None


def test_win_rate_with_a_judge_whose_answers_are_known(tmp_path):
    """4 prompts: the policy is right on 3, the reference on 1 (prompt 0, where both are right)."""
    prompts = [GenPrompt(f"sort {d}:", [1]) for d in ("321", "54", "987", "60")]
    policy = [Sample(t, len(t), True) for t in (" 123", " 45", " 789", " 66")]
    reference = [Sample(t, len(t), True) for t in (" 123", " 54", " 798", " 60")]
    settings = make_config([]).eval
    gen = GenerationEval(prompts, SortJudge(), settings, tmp_path)
    gen.set_reference(reference, "fp", main_process=True)
    metrics, rows = gen.evaluate(policy)
    # prompt 0 tie (both right), 1 and 2 wins, 3 tie (both wrong) -> (2 + 2/2) / 4
    assert metrics["eval_win_rate"] == pytest.approx(0.75)
    assert metrics["eval_tie_rate"] == pytest.approx(0.5)
    assert metrics["eval_judge_score"] == pytest.approx(0.75)
    assert metrics["eval_reference_judge_score"] == pytest.approx(0.25)
    assert [r["outcome"] for r in rows] == ["tie", "win", "win", "tie"]
    assert [r["reference_verdict"] for r in rows] == ["correct", "misordered", "misordered", "misordered"]
    assert gen.load_reference("fp") and not gen.load_reference("other settings")


# --- the reward-model judge ----------------------------------------------------------------------


def save_reward_model(path: Path, num_labels: int = 1, chat_template: str | None = None) -> Path:
    """A tiny random Llama sequence classifier with the byte tokenizer, saved as a reward model."""
    tokenizer = byte_tokenizer()
    if chat_template:
        tokenizer.chat_template = chat_template
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, num_labels=num_labels,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForSequenceClassification.from_config(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


CHAT = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


@pytest.mark.parametrize("fmt", ["text", "pair", "chat", "auto"])
def test_reward_model_scores_do_not_depend_on_batching(tmp_path, fmt):
    path = save_reward_model(tmp_path / "rm", chat_template=CHAT if fmt in ("chat", "auto") else None)
    prompts = ["\n\nHuman: hi\n\nAssistant:", [{"role": "user", "content": "sort 21:"}], "short", "x" * 40]
    responses = [" hello", " 12", " a much longer response than the others", " y"]
    one = RewardModelJudge(str(path), input_format=fmt, batch_size=1).score(prompts, responses)
    four = RewardModelJudge(str(path), input_format=fmt, batch_size=4).score(prompts, responses)
    assert one == pytest.approx(four, abs=1e-5)
    assert len(set(one)) == 4 and all(math.isfinite(s) for s in one)


def test_reward_model_judge_fails_clearly(tmp_path):
    with pytest.raises(ModelLoadError, match="no such directory"):
        RewardModelJudge(str(tmp_path / "missing")).load()
    path = save_reward_model(tmp_path / "two", num_labels=2)
    with pytest.raises(ModelLoadError, match="num_labels=1"):
        RewardModelJudge(str(path)).load()
    with pytest.raises(ValueError, match="input_format"):
        RewardModelJudge("x/y", input_format="html")


# --- prompts and sampling ------------------------------------------------------------------------


def test_eval_prompts_are_the_training_prompts_first_distinct_and_cut_like_training():
    tok = byte_tokenizer()
    data = make_config([]).data
    pairs = make_pairs(5, seed=1, min_digits=3, max_digits=5)
    prompts = eval_prompts(pairs + pairs, tok, data, 8)
    assert [p.prompt for p in prompts] == [p["prompt"] for p in pairs]  # distinct: 5, not 8
    assert prompts[0].ids == tok(pairs[0]["prompt"]).input_ids  # BOS + bytes, as training tokenizes
    long = [{"prompt": "sort " + "9" * 40 + ":", "chosen": " a", "rejected": " b"}]
    cut = eval_prompts(long, tok, data, 1)[0].ids
    assert len(cut) == data.max_prompt_length and cut[0] == tok.bos_token_id  # keep_end keeps BOS


def test_eval_prompts_of_conversations_use_the_chat_template():
    tok = byte_tokenizer()
    tok.chat_template = CHAT + "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    data = make_config(["data.max_length=200", "data.max_prompt_length=100"]).data
    conv = [{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
             "rejected": [{"role": "assistant", "content": "b"}]}]  # fmt: skip
    (p,) = eval_prompts(conv, tok, data, 4)
    assert p.prompt == conv[0]["prompt"]
    assert tok.decode(p.ids) == "<|user|>hi\n<|assistant|>"


def _tiny_lm():
    tok = byte_tokenizer()
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval(), tok


class OneProcess:
    """What `generate` reads from an Accelerator, for process `index` of `n`."""

    def __init__(self, index: int = 0, n: int = 1):
        self.process_index, self.num_processes, self.device = index, n, torch.device("cpu")

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()


def test_sampling_depends_on_the_seed_and_batch_only_and_keeps_the_training_rng():
    from dpo_cli.evalgen import generate

    model, tok = _tiny_lm()
    prompts = [GenPrompt(p["prompt"], tok(p["prompt"]).input_ids) for p in make_pairs(6, 0, 3, 8)]
    settings = make_config(["eval.max_new_tokens=6", "eval.batch_size=2"]).eval
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = generate(model, prompts, tok, settings, OneProcess())
    assert torch.equal(torch.get_rng_state(), state)  # training's random stream is untouched
    assert generate(model, prompts, tok, settings, OneProcess()) == first
    reseeded = make_config(["eval.max_new_tokens=6", "eval.batch_size=2", "eval.seed=1"]).eval
    other = generate(model, prompts, tok, reseeded, OneProcess())
    assert other != first
    assert all(s.tokens <= 6 and (s.finished or s.tokens == 6) for s in first)
    # Greedy decoding of a batch equals each prompt decoded alone (left padding is masked).
    greedy = make_config(["eval.max_new_tokens=6", "eval.temperature=0", "eval.batch_size=6"]).eval
    alone = make_config(["eval.max_new_tokens=6", "eval.temperature=0", "eval.batch_size=1"]).eval
    assert generate(model, prompts, tok, greedy, OneProcess()) == generate(model, prompts, tok, alone, OneProcess())


# --- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["judge=none", "eval.generate_every=4"], "eval.generate_every=4 needs a judge"),
        (["eval.temperature=-1"], "eval.temperature=-1.0 must be >= 0"),
        (["eval.top_p=0"], "eval.top_p=0.0 must be in (0, 1]"),
        (["eval.confidence=1.5"], "eval.confidence=1.5 must be in (0, 1)"),
        (["judge=reward_model", "judge.name_or_path=x/y", "judge.input_format=html"], "judge.input_format='html'"),
        (
            ["model.name_or_path=x/y", "model.warm_start.steps=4", "model.lora.r=4"],
            "model.warm_start fine-tunes every weight of",
        ),
    ],
)
def test_bad_generation_settings_are_config_errors(overrides, message):
    from dpo_cli.config import validate

    with pytest.raises(ConfigError, match=None) as e:
        validate(make_config(overrides))
    assert message in str(e.value)


def test_the_default_run_is_judged_exactly_and_other_data_is_not_judged():
    assert make_config([]).judge._target_ == "dpo_cli.judges.SortJudge"
    assert make_config(["data=hh"]).judge is None
    assert make_config(["judge=none"]).judge is None
    assert make_config(["data=hh", "judge=reward_model", "judge.name_or_path=a/b"]).judge.name_or_path == "a/b"


# --- in a run ------------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_run_writes_samples_metrics_and_reuses_the_references_samples(train_run, tmp_path):
    overrides = ["train.max_steps=4", "train.eval_every=2", "judge=sort", "eval.generate_every=2", "eval.prompts=8"]
    _, run_dir = train_run([*overrides, "logger.report=true"])
    rows = read_metrics(run_dir)
    generated = [r for r in rows if "eval_win_rate" in r]
    assert [r["step"] for r in generated] == [2, 4]
    for r in generated:
        assert r["eval_win_rate_low"] <= r["eval_win_rate"] <= r["eval_win_rate_high"]
        assert r["eval_reference_response_length"] == generated[0]["eval_reference_response_length"]
    samples = [json.loads(line) for line in (run_dir / "samples" / "step-4.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and {"prompt", "policy", "reference", "outcome", "policy_verdict"} <= samples[0].keys()
    assert sum(s["outcome"] == "win" for s in samples) + sum(
        s["outcome"] == "tie" for s in samples
    ) / 2 == pytest.approx(8 * generated[-1]["eval_win_rate"])
    reference = (run_dir / "samples" / "reference.jsonl").read_text()
    assert [s["reference"] for s in samples] == [json.loads(line)["response"] for line in reference.splitlines()]
    # The held-out preference metrics that catch DPO's failure mode.
    last = [r for r in rows if "eval_loss" in r][-1]
    assert 0 <= last["eval_logps/chosen_below_reference"] <= 1 and math.isfinite(last["eval_logps/chosen_change"])
    assert (run_dir / "report.html").is_file() and (run_dir / "report.png").is_file()


@pytest.mark.integration
def test_samples_reach_a_wandb_table(tmp_path, monkeypatch):
    """A real offline W&B run gets the samples as a table (wandb writes it as a JSON media file)."""
    from accelerate.state import AcceleratorState

    from dpo_cli import train

    for var in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)
    from conftest import FAST

    cfg = make_config([*FAST, "logger.wandb.mode=offline", "judge=sort", "train.max_steps=2", "eval.prompts=4"])
    AcceleratorState._reset_state(reset_partial_state=True)
    train.run(validate(cfg))
    (table,) = (run_dir / "wandb").glob("offline-run-*/files/media/table/eval_samples_*.table.json")
    content = json.loads(table.read_text())
    samples = [json.loads(line) for line in (run_dir / "samples" / "step-2.jsonl").read_text().splitlines()]
    assert content["columns"][:3] == ["prompt", "policy", "reference"]
    assert [row[1] for row in content["data"]] == [s["policy"] for s in samples]


def test_the_preflight_says_what_generation_evaluation_will_do():
    from dpo_cli import preflight

    text = preflight.run(validate(make_config(["mode=inspect", "eval.generate_every=8"])))
    assert "generation evaluation: 64 held-out prompts, every 8 steps and at the end; judge exact" in text
    off = preflight.run(validate(make_config(["mode=inspect", "judge=none"])))
    assert "generation evaluation: off" in off
