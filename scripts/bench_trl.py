#!/usr/bin/env python
"""One TRL DPOTrainer run for scripts/bench.py, in its own process (so its peak RSS is its own).

    python scripts/bench_trl.py --spec JSON --result-file OUT.json

The spec names the model directory, an HH-format JSONL file, batch size, max length, steps,
learning rate, beta, seed and output directory, plus `trl_args` (DPOConfig fields to change). The
trainer is TRL's own with DPOConfig's defaults except what must match dpo-cli's run: batch size with
no accumulation, max_length, the precision (`bf16`: DPOConfig's default bf16=True, float32 weights
with bf16 autocast, as dpo-cli's train.mixed_precision=bf16; else float32), the device (`use_cpu`
on the CPU; on CUDA it is left at its default, False, and TRL takes the GPU), learning rate and
beta, max_steps, per-step logging to nowhere, no checkpoints, no evaluation. Everything else is
DPOConfig's default: gradient checkpointing on, the fused LM head (per-token log-probs computed in
chunks, no full logits), a live reference copy. The model is passed as the directory, so TRL loads
it (in float32, its default dtype), and its reference copy, as it does by default.

Writes: seconds in trainer.train(), the non-padding tokens of the batches trained on and their
padding share, the step times, peak RSS and peak CUDA memory, the nn.Linear parameter count and the
settings as run. On CUDA the clocks are read after torch.cuda.synchronize().
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench import cuda_memory, cuda_sync, linear_params, peak_rss_bytes, split_hh  # scripts/ is sys.path[0]


def run(spec: dict) -> dict:
    import datasets
    import torch
    import transformers
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    if not spec.get("verbose"):
        datasets.disable_progress_bars()
        transformers.logging.set_verbosity_error()

    counts = {"tokens": 0, "positions": 0}
    step_seconds: list[float] = []

    class CountingDPOTrainer(DPOTrainer):
        """DPOTrainer that counts the attention-mask ones (non-padding tokens, chosen and rejected
        rows) of every training batch it computes a loss on; nothing else changes."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.model.training:
                counts["tokens"] += int(inputs["attention_mask"].sum())
                counts["positions"] += inputs["attention_mask"].numel()
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    class StepTimes(TrainerCallback):
        # synchronized on CUDA so that a step's kernels count in its own time (logging_steps=1 reads
        # the loss every step anyway, which waits for them too)
        def on_step_begin(self, args, state, control, **kwargs):
            cuda_sync()
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            cuda_sync()
            step_seconds.append(time.perf_counter() - self.started)

    lines = Path(spec["data_file"]).read_text().splitlines()
    pairs = [split_hh(**json.loads(line)) for line in lines if line.strip()]
    train = datasets.Dataset.from_list(pairs)  # standard (text) prompt / chosen / rejected columns
    settings = dict(
        output_dir=spec["output_dir"],
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1,
        max_length=spec["max_length"],
        learning_rate=spec["lr"],
        beta=spec["beta"],
        bf16=spec["bf16"],  # DPOConfig's default is True; the CPU float32 runs turn it off
        fp16=False,
        max_steps=spec["steps"],
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        seed=spec["seed"],
        disable_tqdm=not spec.get("verbose"),
    )
    if spec["use_cpu"]:
        settings["use_cpu"] = True  # on CUDA left at TrainingArguments' default (False): the GPU
    config = DPOConfig(**(settings | spec["trl_args"]))  # --trl-arg wins, also over the settings above
    started = time.perf_counter()
    trainer = CountingDPOTrainer(model=spec["model_dir"], args=config, train_dataset=train, callbacks=[StepTimes()])
    built = time.perf_counter()
    trainer.train()
    cuda_sync()
    ended = time.perf_counter()

    a = trainer.args
    return {
        "seconds": ended - built,
        "timed_from": f"trainer.train() only; building the trainer took {built - started:.1f}s",
        "steps": len(step_seconds),
        "tokens": counts["tokens"],
        "pad_share": 1 - counts["tokens"] / counts["positions"] if counts["positions"] else 0.0,
        "step_seconds": step_seconds,
        "peak_rss": peak_rss_bytes(),
        **cuda_memory(),
        "linear_params": linear_params(trainer.model),
        "train_pairs": len(trainer.train_dataset),
        "settings": {
            "max_length": a.max_length,
            "truncation_mode": a.truncation_mode,
            "padding_free": trainer.padding_free,
            "pad_to_multiple_of": a.pad_to_multiple_of,
            "precompute_ref_log_probs": a.precompute_ref_log_probs,
            "reference_model": "separate copy" if trainer.ref_model is not None else "none",
            "gradient_checkpointing": a.gradient_checkpointing,
            "bf16": a.bf16,
            "device": str(a.device),
            "dtype": str(next(trainer.model.parameters()).dtype).removeprefix("torch."),
            "attn_implementation": trainer.model.config._attn_implementation,
            "loss_type": ",".join(a.loss_type),
            "learning_rate": a.learning_rate,
            "beta": a.beta,
            "lr_scheduler_type": str(getattr(a.lr_scheduler_type, "value", a.lr_scheduler_type)),
            "optim": str(getattr(a.optim, "value", a.optim)),
            "torch_threads": torch.get_num_threads(),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="the run, as JSON (see scripts/bench.py)")
    parser.add_argument("--result-file", required=True, help="where to write the measurements (JSON)")
    args = parser.parse_args()
    Path(args.result_file).write_text(json.dumps(run(json.loads(args.spec))))


if __name__ == "__main__":
    main()
