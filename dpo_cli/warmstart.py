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

import hashlib
import json
import logging
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dpo_cli.batch import CHOSEN, RESPONSE_ROLES
from dpo_cli.data.tokenize import Tokenized, fingerprint, responses_by_role
from dpo_cli.errors import Interrupted, UserError

log = logging.getLogger(__name__)


def _sequences(example: Tokenized, responses: str) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) for each response of `example` that is imitated: its chosen
    one, and with `responses="both"` the rejected one beside it (the other half of a pair). An
    example that holds no chosen response (an undesirable completion) is not imitated at all:
    nothing in it is what to write."""
    held = responses_by_role(example)
    if CHOSEN not in held:
        return []
    roles = RESPONSE_ROLES if responses == "both" else (CHOSEN,)
    return [(example["prompt_ids"], held[role]) for role in roles if role in held]


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


def warm_start(
    model: torch.nn.Module,
    train_set: list[Tokenized],
    ws: Any,
    seed: int,
    pad_id: int,
    progress: bool = False,
    should_stop: Callable[[], str | None] | None = None,
) -> None:
    """`ws.steps` AdamW steps (lr `ws.lr`) of next-token loss on the responses of `ws.batch_size`
    training examples each, drawn with a generator seeded by `seed`; `model` is changed in place.

    `progress` shows a bar (it can take minutes on a busy machine). `should_stop` is asked after
    every step (every process asks, so they stop together): a signal's name there raises
    Interrupted within one step, with nothing saved (a partial warm start is no SFT model)."""
    device = next(model.parameters()).device
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=ws.lr)
    was_training = model.training
    model.train()
    log.info(
        "warm start: %d steps of supervised fine-tuning on %s responses, %d examples each (model.warm_start; "
        "model.warm_start.steps=0 skips it)",
        ws.steps, ws.responses, ws.batch_size,
    )  # fmt: skip
    started, first, loss = time.perf_counter(), None, None
    with tqdm(total=ws.steps, desc="warm start", unit="step", disable=not progress, dynamic_ncols=True) as bar:
        for step in range(ws.steps):
            picked = rng.sample(range(len(train_set)), min(ws.batch_size, len(train_set)))
            seqs = [s for i in picked for s in _sequences(train_set[i], ws.responses)]
            if seqs:
                loss = model(**_batch(seqs, pad_id, device)).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                first = loss.item() if first is None else first
                bar.set_postfix({"loss": f"{loss.item():.3f}"}, refresh=False)
            bar.update(1)
            signal_name = should_stop() if should_stop is not None else None
            if signal_name:
                raise Interrupted(
                    f"{signal_name}: stopped during the warm start (step {step + 1} of {ws.steps}); nothing was saved: "
                    "a partial warm start is no SFT model. The same command starts the run again",
                    signum=int(signal.Signals[signal_name]),
                )
    model.train(was_training)
    del optimizer
    log.info(
        "warm start: loss %.3f -> %.3f in %.1f s; the reference is this model",
        first or float("nan"), loss.item() if loss is not None else float("nan"), time.perf_counter() - started,
    )  # fmt: skip


WEIGHTS = "model.safetensors"
SETTINGS = "settings.json"


def settings(model: torch.nn.Module, train_set: list[Tokenized] | None, ws: Any, seed: int, source: Any) -> dict:
    """What decides the warm start's weights: its own settings, the seed, the model it started
    from (`source`: where its weights come from; its config: the architecture) and the data
    (None: not checked, when `mode=eval` rebuilds a finished run's reference from its config)."""
    shapes = [(name, list(t.shape)) for name, t in model.state_dict().items()]
    return {
        "steps": int(ws.steps),
        "lr": float(ws.lr),
        "batch_size": int(ws.batch_size),
        "responses": str(ws.responses),
        "seed": int(seed),
        "source": source,
        "architecture": hashlib.sha256(json.dumps(shapes).encode()).hexdigest(),
        "data": None if train_set is None else fingerprint(train_set),
    }


def _saved_settings(saved: Path) -> dict | None:
    try:
        return json.loads((saved / SETTINGS).read_text())
    except (OSError, ValueError):
        return None


def _differences(want: dict, have: dict | None) -> list[str]:
    if have is None:
        return ["it records no settings"]
    return [k for k in want if want[k] is not None and have.get(k) != want[k]]


def warm_started(
    model: torch.nn.Module,
    train_set: list[Tokenized],
    ws: Any,
    seed: int,
    pad_id: int,
    saved: Path,
    main_process: bool = True,
    source: Any = None,
    progress: bool = False,
    should_stop: Callable[[], str | None] | None = None,
) -> None:
    """`model` warm-started: the weights a previous start of this run saved in `saved` when they
    were made with the same settings, model and data (a resumed run, or `mode=eval` rebuilding
    the run's reference, gets exactly them, whatever its number of processes or threads); else
    `warm_start`, saved there by the main process with its settings. A `saved` made otherwise
    (a failed start with other settings, another model) is redone, never loaded: its weights
    would silently be the wrong reference, or not fit the model. An empty `train_set` (mode=eval
    with a saved warm start) is not compared."""
    from safetensors.torch import load_model, save_model  # they handle tied weights (embeddings, LM head)

    path = saved / WEIGHTS
    want = settings(model, train_set or None, ws, seed, source)
    if path.is_file():
        different = _differences(want, _saved_settings(saved))
        if not different:
            load_model(model, str(path), device=str(next(model.parameters()).device))
            log.info("warm start: the weights of this run's warm start, from %s", path)
            return
        if not train_set:
            raise UserError(
                f"{saved} was made with other settings than this run's config says ({', '.join(different)} differ); "
                "it cannot be rebuilt without the run's training data"
            )
        log.warning(
            "warm start: %s was made otherwise (%s differ); warm-starting again with this run's settings",
            saved, ", ".join(different),
        )  # fmt: skip
    warm_start(model, train_set, ws, seed, pad_id, progress, should_stop)
    if main_process:
        saved.mkdir(parents=True, exist_ok=True)
        tmp = saved / f".{WEIGHTS}.tmp"
        save_model(model, str(tmp))
        os.replace(tmp, path)
        (saved / SETTINGS).write_text(json.dumps(want, indent=1) + "\n")
