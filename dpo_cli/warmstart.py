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
import random
import time
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
