"""final/README.md (the model card) and export.push_to_hub. The cards are built from run
directories of real files (metrics.jsonl, Hydra's .hydra/ files, a base model's README.md) and
read back with huggingface_hub's own ModelCard.load. The push's start-up refusals go through the
real CLI. Nothing here reaches the Hub: "no Hub" is a closed local port, and the one thing a
fake-free test cannot drive is a token the Hub refuses (it needs a Hub to answer)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml
from conftest import FAST, QUIET, make_config, run_cli
from huggingface_hub import ModelCard, ModelCardData
from omegaconf import OmegaConf

from dpo_cli import card, publish
from dpo_cli.errors import UserError
from dpo_cli.hub import hub_reachable
from dpo_cli.schema import ExportConfig

TRAIN_ROW = {"step": 4, "loss": 0.61, "rewards/accuracies": 0.75}
EVAL_ROW = {"step": 4, "eval_loss": 0.5873, "eval_rewards/accuracies": 0.8125, "eval_rewards/margins": 0.4242}
WIN_ROW = {"step": 4, "eval_win_rate": 0.6875, "eval_win_rate_low": 0.4445, "eval_win_rate_high": 0.8584,
           "eval_tie_rate": 0.0625}  # fmt: skip


def fabricated_run(run_dir: Path, overrides: list[str], rows: list[dict]) -> dict:
    """A run directory as a finished run leaves it: .hydra/ (the composed config, the overrides,
    the loss choice), metrics.jsonl, final/; returns the config as the run passes it (resolved)."""
    cfg = make_config(overrides)
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "final").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    loss = next((o.split("=", 1)[1] for o in overrides if o.startswith("loss=")), "dpo")
    (run_dir / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": {"loss": loss}}}}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"), resolve=True)


def test_card_of_a_hub_model_reads_back_with_its_metrics_and_command(tmp_path):
    overrides = [
        "model=pretrained", "model.name_or_path=HuggingFaceTB/SmolLM2-135M-Instruct", "data=hh", "loss=simpo", "loss.beta=2.5",
        "train.max_steps=4", "export.push_to_hub=me/smol-simpo",
    ]  # fmt: skip
    run_dir = tmp_path / "run"
    config = fabricated_run(run_dir, overrides, [TRAIN_ROW, EVAL_ROW, WIN_ROW])
    (path,) = card.write(run_dir / "final", run_dir, config, steps=4, kept={"train": 120, "eval": 16})
    loaded = ModelCard.load(path)
    assert loaded.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert loaded.data.library_name == "transformers"
    assert loaded.data.datasets == ["Anthropic/hh-rlhf"]
    assert {"dpo", "dpo-cli", "simpo"} <= set(loaded.data.tags)
    assert loaded.data.license is None  # the base's card is not on this machine: none is guessed
    text = loaded.text
    for key, value in {**EVAL_ROW, **WIN_ROW}.items():
        if key not in ("step", "eval_win_rate_low", "eval_win_rate_high"):
            assert f"| {value:.4f} |" in text, key
    assert "0.4445-0.8584" in text and "(step 4)" in text
    assert "beta=2.5" in text and "120 training pairs kept, 16 held out" in text
    assert f"dpo-train {' '.join(overrides)}\n" in text  # the command, as Hydra recorded its overrides
    assert "# smol-simpo" in text and "AutoModelForCausalLM.from_pretrained('me/smol-simpo')" in text


def test_card_of_a_lora_adapter_on_a_local_base_and_its_merged_export(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    ModelCard(f"---\n{ModelCardData(license='apache-2.0').to_yaml()}\n---\n# base\n").save(base / "README.md")
    overrides = ["model=pretrained", f"model.name_or_path={base}", "model.lora.r=8", "export.merge_lora=true"]
    run_dir = tmp_path / "run"
    config = fabricated_run(run_dir, overrides, [TRAIN_ROW])  # no eval row
    (run_dir / "final" / "adapter_config.json").write_text("{}")
    (run_dir / "final" / "merged").mkdir()
    adapter, merged = card.write(run_dir / "final", run_dir, config, steps=4, kept={"train": 8, "eval": 0})
    a, m = ModelCard.load(adapter), ModelCard.load(merged)
    assert (a.data.library_name, m.data.library_name) == ("peft", "transformers")
    assert a.data.base_model is None  # a local path is no Hub repo id: the body names it
    assert a.data.license == m.data.license == "apache-2.0"
    assert "lora" in a.data.tags and "dpo" in a.data.tags
    assert f"`{base.resolve()}`" in a.text and "LoRA: r=8" in a.text and "AutoPeftModelForCausalLM" in a.text
    assert "No evaluation was logged" in a.text


def test_push_problems_found_without_the_network(monkeypatch, closed_port):
    """Each refusal is one problem: a bad repo id, a mode with no final/, a branch without a repo,
    the offline variable, an endpoint that refuses connections."""
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    hub_reachable.cache_clear()
    assert publish.push_problems(ExportConfig(), "train") == []
    (bad,) = publish.push_problems(ExportConfig(push_to_hub="me/x/y"), "train")
    assert "is not a Hub repo id" in bad
    (evaluating,) = publish.push_problems(ExportConfig(push_to_hub="me/x"), "eval")
    assert "mode=eval writes none" in evaluating
    (branch,) = publish.push_problems(ExportConfig(hub_revision="dpo"), "train")
    assert "needs export.push_to_hub" in branch
    (unreachable,) = publish.push_problems(ExportConfig(push_to_hub="me/x"), "train")
    assert f"127.0.0.1:{closed_port}) cannot be reached" in unreachable
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    (offline,) = publish.push_problems(ExportConfig(push_to_hub="me/x"), "train")
    assert "TRANSFORMERS_OFFLINE is set" in offline
    hub_reachable.cache_clear()


def refused_start(tmp_path: Path, env: dict[str, str], extra: tuple[str, ...] = ()) -> tuple[str, Path]:
    """`dpo-train` with export.push_to_hub in a clean Hugging Face environment plus `env`:
    it must stop with exit 2 and one line, before a run directory or a weight exists."""
    home = tmp_path / "hf-home"
    home.mkdir()
    clean = {"HF_HOME": str(home), "HF_TOKEN": "", "HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": "", **env}
    run_dir = tmp_path / "run"
    args = ["dpo-train", *QUIET, *FAST, "train.max_steps=2", "export.push_to_hub=me/x", *extra]
    proc = run_cli([*args, f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=clean)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out and out.count("[ERROR]") == 1, out
    assert not run_dir.exists()  # refused before Hydra made it: nothing was built, no weights loaded
    return out, run_dir


@pytest.mark.integration
def test_a_push_while_offline_is_refused_by_the_preflight(tmp_path):
    out, _ = refused_start(tmp_path, {"HF_HUB_OFFLINE": "1"}, ("mode=inspect",))
    assert "export.push_to_hub='me/x' needs the Hub, but HF_HUB_OFFLINE is set" in out


@pytest.mark.integration
def test_a_push_without_a_token_is_refused_at_start(tmp_path, listening_port):
    """HF_TOKEN empty and HF_HOME empty: no token anywhere. The endpoint answers connections, so
    the token is the one problem."""
    out, _ = refused_start(tmp_path, {"HF_ENDPOINT": f"http://127.0.0.1:{listening_port}"})
    assert "needs a Hugging Face token: run `hf auth login`, or set HF_TOKEN" in out
    assert "cannot be reached" not in out


@pytest.fixture(scope="module")
def pushed_run(tmp_path_factory):
    """One short run whose push fails at the end: the start-up check passed (the run was validated
    without the push), then the Hub became unreachable (a closed local port). Returns (run_dir, error)."""
    from accelerate.state import AcceleratorState

    from dpo_cli import config, train

    run_dir = tmp_path_factory.mktemp("pushed") / "run"
    run_dir.mkdir()
    with pytest.MonkeyPatch.context() as mp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        mp.setenv("HF_ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}")
        mp.setenv("HF_TOKEN", "hf_not_a_real_token")
        mp.chdir(run_dir)
        typed = config.validate(make_config([*QUIET, *FAST, "train.max_steps=2"]))
        typed.export.push_to_hub, typed.export.hub_revision = "me/x", "dpo-run"  # the network drops after start-up
        AcceleratorState._reset_state(reset_partial_state=True)
        with pytest.raises(UserError) as e:
            train.run(typed)
    return run_dir, str(e.value)


@pytest.mark.integration
def test_a_failed_push_keeps_final_and_says_how_to_push_by_hand(pushed_run):
    run_dir, error = pushed_run
    final = run_dir / "final"
    assert (final / "model.safetensors").is_file() and (final / "tokenizer_config.json").is_file()
    assert f"could not push {final} to the Hub repo me/x" in error
    assert f"push it by hand with: hf upload me/x {final} . --revision dpo-run --private" in error


@pytest.mark.integration
def test_the_card_of_a_finished_run_holds_its_last_eval(pushed_run):
    run_dir, _ = pushed_run
    loaded = ModelCard.load(run_dir / "final" / "README.md")
    assert loaded.data.base_model is None and loaded.data.library_name == "transformers"
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    assert f"| loss | {evals[-1]['eval_loss']:.4f} |" in loaded.text
    assert "randomly initialised llama" in loaded.text and "2 optimizer steps of 8 pairs" in loaded.text
