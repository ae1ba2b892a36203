"""The one place where sequence log-probabilities are computed.

A batch holds chosen rows followed by rejected rows (see `data.collate`), so that one forward
pass serves both halves: one set of kernel launches and, under DDP, one gradient sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpo_cli.losses import SequenceLogps

IGNORE_INDEX = -100


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the labelled tokens and how many there are, per sequence.

    logits: (N, T, V) from a causal LM, where logits[:, t] predicts token t + 1.
    labels: (N, T) input ids with prompt and padding positions set to IGNORE_INDEX.
    Returns (logps (N,), n_tokens (N,)), both float32.

    The shift aligns logits[:, t] with labels[:, t + 1]. Logits are cast to float32 before the
    softmax: in bf16 the log-sum-exp over a large vocabulary loses about two digits, which is
    the size of the differences DPO trains on.
    """
    assert logits.shape[:2] == labels.shape, (logits.shape, labels.shape)
    logits = logits[:, :-1, :].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    token_logps = -F.cross_entropy(logits.transpose(1, 2), targets.masked_fill(~mask, 0), reduction="none")
    token_logps = token_logps * mask
    return token_logps.sum(-1), mask.sum(-1).float()


@dataclass
class ForwardOutput:
    logps: SequenceLogps
    mean_logits_chosen: torch.Tensor
    mean_logits_rejected: torch.Tensor


def concatenated_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> ForwardOutput:
    """Run chosen and rejected rows through `model` in one pass and split the results.

    `batch` has input_ids, attention_mask and labels of shape (2B, T): rows [0, B) are the
    chosen responses, rows [B, 2B) the rejected ones, each after its own prompt.
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logps, n_tokens = sequence_logps(out.logits, batch["labels"])
    b = batch["input_ids"].shape[0] // 2
    # Mean logit over response tokens, as TRL logs it: a cheap check for drifting logits.
    with torch.no_grad():
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        per_token = torch.sum(out.logits[:, :-1], dim=-1, dtype=torch.float32)
        summed = (per_token * mask).sum(-1)
        vocab = out.logits.shape[-1]
        mean_logits = summed / (n_tokens.clamp(min=1) * vocab)
    return ForwardOutput(
        logps=SequenceLogps(
            chosen=logps[:b], rejected=logps[b:], chosen_tokens=n_tokens[:b], rejected_tokens=n_tokens[b:]
        ),
        mean_logits_chosen=mean_logits[:b],
        mean_logits_rejected=mean_logits[b:],
    )
