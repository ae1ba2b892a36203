"""The reference as a source (live copy, separate model, LoRA adapter disabled, precomputed
cache), LoRA training, and what final/ holds: each as a user runs it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import FAST, QUIET, free_port, make_config, read_metrics, run_cli
from test_cli import assert_one_clear_error

from dpo_cli import checkpoint, modeling
from dpo_cli.data.collate import collate
from dpo_cli.data.prepare import prepare
from dpo_cli.logprobs import batch_logps
from dpo_cli.reference import AdapterReference

STEPS = ["train.max_steps=4", "train.eval_every=2"]


def _rows(run_dir: Path, key: str) -> list[float]:
    return [r[key] for r in read_metrics(run_dir) if key in r]


def _save_tiny(path: Path, seed: int = 42) -> Path:
    """The built-in tiny model as `model=tiny train.seed=SEED` initialises it, saved as a
    Hugging Face directory (what a separately trained SFT model would be)."""
    cfg = make_config([])
    tokenizer = modeling.byte_tokenizer()
    modeling.load_model(cfg.model, tokenizer, seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _cache_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.pt"))


def test_batches_carry_dataset_indices():
    """A precomputed reference looks its values up by the examples' dataset indices."""
    pairs = [{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]} for _ in range(3)]
    batch = collate(pairs, pad_id=0, index=[7, 3, 9])
    assert batch["index"].tolist() == [7, 3, 9, 7, 3, 9]
    assert collate(pairs, pad_id=0)["index"].tolist() == [0, 1, 2, 0, 1, 2]


@pytest.mark.integration
def test_live_separate_and_precomputed_references_give_the_same_run(train_run, tmp_path):
    """The initial policy as a frozen copy, the same weights loaded from a directory as a
    separate reference, and log-probs precomputed before training: the same losses and eval
    metrics, step by step."""
    ref_dir = _save_tiny(tmp_path / "sft")
    runs = {
        "live": [],
        "separate": [f"reference.name_or_path={ref_dir}"],
        "precomputed": ["reference.precompute=true", f"reference.cache_dir={tmp_path / 'cache'}"],
    }
    results = {name: train_run([*STEPS, *extra], tmp_path / name)[1] for name, extra in runs.items()}
    base = read_metrics(results["live"])
    assert abs(base[0]["loss"] - math.log(2)) < 1e-6
    for name in ("separate", "precomputed"):
        rows = read_metrics(results[name])
        assert len(rows) == len(base)
        for a, b in zip(base, rows, strict=True):
            for key in ("loss", "rewards/margins", "eval_loss", "eval_rewards/chosen"):
                if key in a:
                    assert abs(a[key] - b[key]) < 1e-5, (name, key, a[key], b[key])


@pytest.mark.integration
def test_cache_hit_on_a_beta_change_miss_on_a_data_or_model_change(train_run, tmp_path, caplog, monkeypatch):
    """A second run that changes only beta, the learning rate or the step count reads the
    entry (no reference model loaded, the file not rewritten); new data or new reference
    weights make a new entry."""
    cache = tmp_path / "cache"
    ref_dir = _save_tiny(tmp_path / "sft")
    # judge=none: generation evaluation would load the reference model to sample from it
    common = [
        "reference.precompute=true",
        f"reference.cache_dir={cache}",
        f"reference.name_or_path={ref_dir}",
        "judge=none",
    ]
    loads = []
    real_load = modeling.load_model
    monkeypatch.setattr(modeling, "load_model", lambda *a, **k: loads.append(a[0].name_or_path) or real_load(*a, **k))
    caplog.set_level("INFO", logger="dpo_cli.refcache")

    train_run([*common, "train.max_steps=2"], tmp_path / "a")
    (entry,) = _cache_files(cache)
    stamp = entry.stat().st_mtime_ns
    assert loads == [str(ref_dir)]
    caplog.clear()
    train_run([*common, "train.max_steps=3", "loss.beta=0.3", "optimizer.lr=2e-3"], tmp_path / "b")
    assert "cache hit" in caplog.text and "saved" in caplog.text
    assert loads == [str(ref_dir)], "the reference model was loaded again on a cache hit"
    assert _cache_files(cache) == [entry] and entry.stat().st_mtime_ns == stamp

    train_run([*common, "train.max_steps=2", "data.format.num_train=200"], tmp_path / "c")
    assert len(_cache_files(cache)) == 2
    # Other reference weights, same data: the content hash of the files changes the key.
    _save_tiny(ref_dir, seed=7)
    train_run([*common, "train.max_steps=2"], tmp_path / "d")
    assert len(_cache_files(cache)) == 3


@pytest.mark.integration
def test_a_cache_entry_cut_short_is_rejected_and_recomputed(train_run, tmp_path, caplog):
    cache = tmp_path / "cache"
    args = [*STEPS, "reference.precompute=true", f"reference.cache_dir={cache}"]
    _, first = train_run(args, tmp_path / "a")
    (entry,) = _cache_files(cache)
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    caplog.set_level("WARNING", logger="dpo_cli.refcache")
    _, second = train_run(args, tmp_path / "b")
    assert "is damaged" in caplog.text and str(entry) in caplog.text
    assert _rows(first, "loss") == _rows(second, "loss")
    torch.load(entry, weights_only=True)  # rewritten whole


@pytest.mark.integration
def test_a_cache_entry_with_altered_values_is_rejected(train_run, tmp_path, caplog):
    cache = tmp_path / "cache"
    args = ["train.max_steps=2", "reference.precompute=true", f"reference.cache_dir={cache}"]
    train_run(args, tmp_path / "a")
    (entry,) = _cache_files(cache)
    data = torch.load(entry, weights_only=True)
    data["tables"]["train"]["logps"][0, 0] += 1.0
    torch.save(data, entry)
    caplog.set_level("WARNING", logger="dpo_cli.refcache")
    train_run(args, tmp_path / "b")
    assert "checksum does not match" in caplog.text


@pytest.mark.integration
def test_lora_trains_only_the_adapter_and_exports_it(train_run, tmp_path):
    """model.lora.r=8: only lora_ weights change; final/ holds the adapter (and the random-init
    base it needs) and, with export.merge_lora, the merged model; both reload with the standard
    peft / transformers calls and give the log-probs the run's last evaluation saw."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    args = ["model.lora.r=8", "train.max_steps=6", "train.eval_every=null", "export.merge_lora=true"]
    result, run_dir = train_run(args)
    final = run_dir / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["r"] == 8 and (final / "adapter_model.safetensors").is_file()

    cfg = make_config([*QUIET, *FAST, *args])
    tokenizer = modeling.byte_tokenizer()
    initial = modeling.load_model(cfg.model, tokenizer, cfg.train.seed).state_dict()
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]).state_dict()
    assert base.keys() == initial.keys() and all(torch.equal(base[k], initial[k]) for k in base)

    adapter_model = AutoPeftModelForCausalLM.from_pretrained(final).eval()
    merged = AutoModelForCausalLM.from_pretrained(final / "merged").eval()
    assert any(not torch.equal(merged.state_dict()[k], initial[k]) for k in initial)
    eval_set = prepare(cfg.data, tokenizer, cfg.train.seed).eval
    batch = collate(eval_set, tokenizer.pad_token_id)
    with torch.no_grad():
        ours = batch_logps(adapter_model, batch).logps["chosen"].logps
        theirs = batch_logps(merged, batch).logps["chosen"].logps
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert abs(ours.mean().item() - result["eval_logps/chosen"]) < 1e-4
    # Under FSDP / ZeRO-3 the merge reads the adapter back from disk: the same weights.
    from_disk = checkpoint.merged_from_disk(final).state_dict()
    in_memory = merged.state_dict()
    assert from_disk.keys() == in_memory.keys()
    assert all(torch.allclose(from_disk[k], in_memory[k], atol=1e-6) for k in in_memory)


@pytest.mark.integration
def test_full_fine_tune_export_reloads_with_the_runs_log_probs(train_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, run_dir = train_run(["train.max_steps=4", "train.eval_every=null"])
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    cfg = make_config([*QUIET, *FAST])
    eval_set = prepare(cfg.data, tokenizer, cfg.train.seed).eval
    with torch.no_grad():
        chosen = batch_logps(model, collate(eval_set, tokenizer.pad_token_id)).logps["chosen"].logps
    assert abs(chosen.mean().item() - result["eval_logps/chosen"]) < 1e-4


def test_adapter_reference_is_the_base_model():
    """With the adapter switched off the LoRA policy computes the base model's log-probs
    exactly, even once the adapter has moved away from zero."""
    from dpo_cli.lora import apply_lora

    cfg = make_config(["model.lora.r=4"])
    tokenizer = modeling.byte_tokenizer()
    base = modeling.load_model(cfg.model, tokenizer, 0)
    policy = apply_lora(modeling.load_model(cfg.model, tokenizer, 0), cfg.model.lora, False)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_()
    batch = collate([{"prompt_ids": [1, 5, 6], "chosen_ids": [7, 8, 2], "rejected_ids": [9, 2]}], 0)
    policy.train()
    ref = AdapterReference(policy)(batch)
    assert policy.training, "the reference forward must hand the policy back in training mode"
    with torch.no_grad():
        expected = batch_logps(base, batch).logps
        adapted = batch_logps(policy, batch).logps
    assert torch.allclose(ref["chosen"].logps, expected["chosen"].logps, atol=1e-6)
    assert not torch.allclose(adapted["chosen"].logps, expected["chosen"].logps, atol=1e-3)


@pytest.mark.integration
def test_lora_with_gradient_checkpointing_trains_the_adapter(train_run):
    """Frozen embeddings under gradient checkpointing: the checkpointed blocks still get
    gradients, so the adapter learns (its loss moves off log 2)."""
    _, run_dir = train_run(["model.lora.r=8", "model.gradient_checkpointing=true", "train.max_steps=4"])
    losses = _rows(run_dir, "loss")
    assert abs(losses[0] - math.log(2)) < 1e-6 and losses[-1] < losses[0]
    assert all(g > 0 for g in _rows(run_dir, "grad_norm"))


@pytest.mark.integration
def test_bfloat16_copy_of_the_policy_as_reference(train_run, caplog):
    caplog.set_level("INFO", logger="dpo_cli.build")
    _, run_dir = train_run(["reference.dtype=bfloat16", "train.max_steps=2"])
    assert "torch.bfloat16" in caplog.text
    assert all(math.isfinite(v) for v in _rows(run_dir, "loss"))


REFUSED = [
    (["loss=kto", "reference.precompute=true"], "reference.precompute=true with a loss that uses KTO"),
    (["loss=simpo", "reference.precompute=true"], "no term of the loss needs a reference"),
    (["export.merge_lora=true"], "export.merge_lora=true needs LoRA"),
    (["model.lora.r=0"], "model.lora.r=0 must be > 0"),
    (["model.lora.r=4", "reference.dtype=bfloat16"], "reference.dtype=bfloat16 with LoRA"),
]


@pytest.mark.parametrize(("args", "needle"), REFUSED)
def test_reference_settings_that_cannot_work_are_refused(args, needle):
    """Refused by the config's validation, before any weights load (from the command line, as
    the next test shows for one of them: one clear error)."""
    from dpo_cli.config import validate
    from dpo_cli.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        validate(make_config([*QUIET, *FAST, *args]))
    assert any(needle in p for p in e.value.problems), e.value.problems


@pytest.mark.integration
def test_a_reference_setting_that_cannot_work_is_one_clear_error_from_the_cli(tmp_path):
    args, needle = REFUSED[0]
    proc = run_cli(["dpo-train", *QUIET, *FAST, *args, f"hydra.run.dir={tmp_path}/r"], cwd=tmp_path)
    assert_one_clear_error(proc, needle)
    assert proc.returncode == 2
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


@pytest.mark.integration
def test_lora_target_modules_that_match_nothing_name_the_real_ones(tmp_path):
    proc = run_cli(
        [
            "dpo-train",
            "model.lora.r=4",
            "model.lora.target_modules=[qkv]",
            *QUIET,
            *FAST,
            f"hydra.run.dir={tmp_path}/r",
        ],
        cwd=tmp_path,
    )
    assert_one_clear_error(proc, "model.lora.target_modules=['qkv']", "q_proj")


@pytest.mark.integration
def test_a_reference_with_another_tokenizer_is_refused_before_weights_load(tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    ref_dir = tmp_path / "other"
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=16, n_layer=1, n_head=2)).save_pretrained(ref_dir)
    tok = modeling.byte_tokenizer()
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(ref_dir)
    AutoTokenizer.from_pretrained(ref_dir)
    proc = run_cli(
        ["dpo-train", f"reference.name_or_path={ref_dir}", *QUIET, *FAST, f"hydra.run.dir={tmp_path}/r"], cwd=tmp_path
    )
    assert_one_clear_error(proc, "has a different tokenizer from the policy's")


@pytest.mark.integration
@pytest.mark.distributed
def test_two_processes_share_the_precompute_and_a_sweep_shares_the_entry(tmp_path):
    """Two gloo processes each compute their share, one entry is written; a 2-job sweep on
    one process afterwards finds that entry for both jobs (a beta sweep)."""
    cache = tmp_path / "cache"
    common = ["reference.precompute=true", f"reference.cache_dir={cache}", "train.max_steps=2", *QUIET, *FAST]
    proc = run_cli(
        [
            "accelerate",
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--main_process_port",
            str(free_port()),
            "-m",
            "dpo_cli",
            *common,
            f"hydra.run.dir={tmp_path}/two",
        ],
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(_cache_files(cache)) == 1
    sweep = run_cli(
        ["dpo-train", "-m", "loss.beta=0.05,0.2", *common, f"hydra.sweep.dir={tmp_path}/sweep"], cwd=tmp_path
    )
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    logs = [(tmp_path / "sweep" / str(i) / "train.log").read_text() for i in (0, 1)]
    assert all("cache hit" in text for text in logs)
    assert len(_cache_files(cache)) == 1


@pytest.mark.integration
def test_a_lora_run_with_precomputed_reference_resumes_exactly(train_run, tmp_path):
    """Stopped after its step-2 checkpoint and resumed: the adapter, the optimizer and the
    cached reference continue the run as if it had not stopped."""
    import shutil

    args = [
        "model.lora.r=8",
        "reference.precompute=true",
        f"reference.cache_dir={tmp_path / 'cache'}",
        "train.max_steps=4",
        "train.save_every=2",
        "train.eval_every=2",
    ]
    _, full_dir = train_run(args, tmp_path / "full")
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(full_dir / "checkpoints" / "step-2", resumed_dir / "checkpoints" / "step-2")
    shutil.copy(full_dir / "metrics.jsonl", resumed_dir / "metrics.jsonl")
    train_run([*args, "train.resume=auto"], resumed_dir)
    full, resumed = read_metrics(full_dir), read_metrics(resumed_dir)
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    for a, b in zip(full, resumed, strict=True):
        for key in ("loss", "eval_loss", "grad_norm"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-6, (key, a, b)
