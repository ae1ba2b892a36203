"""scripts/bench.py: the peak-FLOP lookup, the MFU arithmetic, the targets, and (integration) a whole
`--device cpu --dry-run` run of dpo-cli and TRL on the shrunk qwen05 model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "scripts" / "bench.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA A10", 125.0),
        ("NVIDIA GeForce RTX 4090", 165.0),
        ("NVIDIA A10G", None),  # not an A10: unknown, so no MFU rather than a wrong one
        ("Tesla T4", None),
        ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", None),  # a slice of the card
    ],
)
def test_gpu_peak_by_device_name(name, peak):
    assert bench.gpu_peak_tflops(name) == peak


def test_qwen05_linear_parameters():
    """N of the 8N estimate for Qwen2.5-0.5B's shape, by hand: per layer q 896x896+896, k and v
    896x128+128 each, o 896x896, gate/up/down 3 x 896x4864 = 14,910,592; x 24 layers = 357,854,208;
    plus the (tied) head 896 x 151936 = 136,134,656: 493,988,864."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**bench.QWEN05))
    assert bench.linear_params(model) == 493_988_864


def test_mfu_arithmetic():
    """qwen05 at 2048 tokens, batch 8 pairs (4096 tokens a pair), one step in 0.5 s: 65,536 tokens/s;
    8 x 493,988,864 x 65,536 = 2.58993e14 FLOP/s; over an H100 SXM's 989e12: 26.19%."""
    tokens_per_s = 8 * 4096 / 0.5
    assert bench.mfu(tokens_per_s, 493_988_864, 8, 989e12) == pytest.approx(0.261874, rel=1e-5)
    assert bench.mfu(1e5, 10**8, 8, 400e12) == pytest.approx(0.2)
    assert bench.mfu(1e5, 10**8, 6, 400e12) == pytest.approx(0.15)


def _run(seconds: float, tokens: float, step_seconds: list[float]) -> dict:
    return {"seconds": seconds, "tokens": tokens, "step_seconds": step_seconds, "pad_share": 0.0, "peak_rss": 1,
            "factor": 8, "linear_params": 10}  # fmt: skip


def test_per_step_time_is_the_difference_of_two_run_lengths_unless_noise_swamps_it():
    """2 and 10 steps of batch 2: 8 extra steps in 4 s is 0.5 s a step. When the 10-step run took no
    longer than the 2-step one (start-up noise on a busy machine), the median of the longer run's own
    step times after its first (0.3 s) is used instead, and the row says so."""
    a, b = _run(6.0, 40.0, [0.9, 0.5]), _run(10.0, 200.0, [0.9, 0.2, 0.3, 0.4])
    row = bench.measure("dpo-cli", a, b, (2, 10), 2)
    assert row["s/step"] == pytest.approx(0.5) and row["timed_by"] == "difference of the two run lengths"
    assert row["tok/pair"] == pytest.approx(10.0) and row["pairs/s"] == pytest.approx(4.0)
    noisy = bench.measure("dpo-cli", _run(10.5, 40.0, [0.9, 0.5]), b, (2, 10), 2)
    assert noisy["s/step"] == pytest.approx(0.3) and noisy["timed_by"].startswith("in-run median step")
    assert "error" in bench.measure("dpo-cli", _run(10.5, 40.0, []), _run(10.0, 200.0, []), (2, 10), 2)


def _row(label, tokens_s):
    return {"model": "qwen05", "seq": 2048, "label": label, "tokens/s": tokens_s, "pairs/s": tokens_s / 4096}


def test_cuda_targets():
    """dpo-cli at 2.5x TRL's tokens/s and 0.5x its peak CUDA memory, 31% MFU: both targets met;
    at 1.5x, the speed target is not."""
    trl = _row("TRL", 20000) | {"peak_cuda": 40 * 2**30, "share": 0.12}
    ours = _row("dpo-cli", 50000) | {"peak_cuda": 20 * 2**30, "share": 0.31}
    goals = bench.targets([ours, trl], "cuda")
    assert [g["met"] for g in goals] == [True, True]
    assert goals[0]["speedup"] == pytest.approx(2.5) and goals[0]["memory"] == pytest.approx(0.5)
    assert goals[1]["mfu"] == pytest.approx(0.31)
    slow = ours | {"tokens/s": 30000}
    assert [g["met"] for g in bench.targets([slow, trl], "cuda")] == [False, True]


def test_seq_list():
    assert bench.parse_seqs("1024,2048") == (1024, 2048)
    args = bench.parse_args(["--models", "qwen05"])
    assert bench.seqs_of("qwen05", args) == (1024, 2048)
    assert bench.seqs_of("qwen05", bench.parse_args(["--models", "qwen05", "--dry-run"])) == (64,)


def test_carried_tokenizer_loads_offline(monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(bench.TOKENIZER_DIR)
    assert len(tokenizer) == 49152 and tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None


def bench_dry_run_figures(report: dict) -> None:
    """What `bench.py --models qwen05 --device cpu --dry-run --json` writes: both tools' rows with
    positive throughput and the keys scripts/gpu/check.sh reads (tests/test_gpu_check.py runs it,
    inside the check's CPU dry run)."""
    assert report["device"] == "cpu" and report["dtype"] == "fp32" and report["dry_run"] and report["ok"]
    assert set(report["versions"]) == {"python", "torch", "transformers", "trl", "accelerate"}
    rows = {r["tool"]: r for r in report["rows"]}
    assert set(rows) == {"dpo-cli", "TRL"}
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and row["pairs_per_s"] > 0 and row["step_seconds"] > 0
        assert row["seq"] == 64 and row["plan"]["steps"] == [2, 10]
        assert row["mfu"] > 0 and row["n_params"] > 0 and row["peak_rss_bytes"] > 0
        assert row["peak_cuda_allocated_bytes"] is None
        assert row["settings"]
    # fixed lengths: every sequence is 64 tokens, prompt counted with each response
    assert rows["dpo-cli"]["tokens_per_pair"] == rows["TRL"]["tokens_per_pair"] == 128
    assert report["targets"] and {"met", "target", "speedup", "memory"} <= set(report["targets"][0])


@pytest.mark.integration
def test_the_dpo_cli_worker_trains_the_tiny_model_through_the_typed_config(tmp_path, monkeypatch):
    """The dpo-cli child validates the composed config as dpo-train does: once it passed the
    untyped one, and the tiny model's warm start failed (DictConfig is not JSON serializable)."""
    monkeypatch.chdir(tmp_path)  # the worker changes into its run directory
    quick = ["model.warm_start.steps=2", "data.format.num_train=16", "data.format.num_eval=1", "logger.report=false"]
    overrides = ["model=tiny", "logger.wandb.mode=disabled", "logger.progress=false", "train.max_steps=2", *quick]
    overrides += ["train.batch_size=8", "train.micro_batch_size=8", "train.eval_every=null", "train.save_every=null"]
    result = bench.dpo_cli_worker({"run_dir": str(tmp_path / "run"), "overrides": overrides, "verbose": False})
    assert result["steps"] == 2 and result["tokens"] > 0, result
