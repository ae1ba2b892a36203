"""model.warm_start: supervised fine-tuning before preference training, so that the reference
(the initial policy) is an SFT model, as in the DPO pipeline.

With `responses: both` the model imitates both responses of each training pair: it learns to
write what the data's demonstrator writes, right or wrong, so the preference pairs are samples
of the kind the reference itself produces (DPO's premise). `chosen` imitates the preferred
responses only (the DPO paper's "Preferred-FT"). It is deterministic given train.seed: a
resumed run, or `mode=eval` rebuilding a run's reference, gets the same weights. Every process
runs it on the same data, so no process waits on another.
"""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import torch

from dpo_cli.data.tokenize import Tokenized

log = logging.getLogger(__name__)


def _sequences(example: Tokenized, responses: str) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) for each response of `example` that is imitated."""
    if "completion_ids" in example:  # unpaired: desirable completions only
        return [(example["prompt_ids"], example["completion_ids"])] if example["label"] else []
    keys = ("chosen_ids", "rejected_ids") if responses == "both" else ("chosen_ids",)
    return [(example["prompt_ids"], example[k]) for k in keys]


def _batch(seqs: list[tuple[list[int], list[int]]], pad_id: int, device: Any) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 on prompt and padding)."""
    width = max(len(p) + len(r) for p, r in seqs)
    ids, mask, labels = [], [], []
    for p, r in seqs:
        pad = width - len(p) - len(r)
        ids.append(p + r + [pad_id] * pad)
        mask.append([1] * (len(p) + len(r)) + [0] * pad)
        labels.append([-100] * len(p) + r + [-100] * pad)
    return {
        k: torch.tensor(v, device=device) for k, v in (("input_ids", ids), ("attention_mask", mask), ("labels", labels))
    }


def warm_start(model: torch.nn.Module, train_set: list[Tokenized], ws: Any, seed: int, pad_id: int) -> None:
    """`ws.steps` AdamW steps (lr `ws.lr`) of next-token loss on the responses of `ws.batch_size`
    training examples each, drawn with a generator seeded by `seed`; `model` is changed in place."""
    device = next(model.parameters()).device
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=ws.lr)
    was_training = model.training
    model.train()
    started, first, loss = time.perf_counter(), None, None
    for _ in range(ws.steps):
        picked = rng.sample(range(len(train_set)), min(ws.batch_size, len(train_set)))
        seqs = [s for i in picked for s in _sequences(train_set[i], ws.responses)]
        if not seqs:
            continue
        loss = model(**_batch(seqs, pad_id, device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        first = loss.item() if first is None else first
    model.train(was_training)
    del optimizer
    log.info(
        "warm start: %d steps of supervised fine-tuning on %s responses (%d examples each): loss %.3f -> %.3f "
        "(%.1f s); the reference is this model",
        ws.steps, ws.responses, ws.batch_size, first or float("nan"), loss.item() if loss is not None else float("nan"),
        time.perf_counter() - started,
    )  # fmt: skip


WEIGHTS = "model.safetensors"


def warm_started(model: torch.nn.Module, train_set: list[Tokenized], ws: Any, seed: int, pad_id: int, saved: Path,
                 main_process: bool = True) -> None:  # fmt: skip
    """`model` warm-started: the weights a previous start of this run saved in `saved` (a
    resumed run, or `mode=eval` rebuilding the run's reference, gets exactly them, whatever its
    number of processes or threads), else `warm_start`, saved there by the main process."""
    from safetensors.torch import load_model, save_model  # they handle tied weights (embeddings, LM head)

    path = saved / WEIGHTS
    if path.is_file():
        load_model(model, str(path), device=str(next(model.parameters()).device))
        log.info("warm start: the weights of this run's warm start, from %s", path)
        return
    warm_start(model, train_set, ws, seed, pad_id)
    if main_process:
        saved.mkdir(parents=True, exist_ok=True)
        tmp = saved / f".{WEIGHTS}.tmp"
        save_model(model, str(tmp))
        os.replace(tmp, path)
