"""The one place where sequence log-probabilities are computed.

A batch (see `data.collate`) holds sequences with roles. `batch_logps` runs the model over it
and returns per-sequence values grouped by role, so that every loss and every layout share one
code path. The CHOSEN and REJECTED rows go through one forward pass (one set of kernel launches
and, under DDP, one gradient sync); KL rows, which no loss differentiates, go through a second
one without building a graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHOSEN, REJECTED, KL = 0, 1, 2  # sequence roles (batch["role"])

# Extra per-sequence values a loss may ask for (`loss.needs`); each costs compute, so only
# what some loss needs is computed.
SHARED = "shared"  # summed log-probs of the first shared_tokens response tokens (LD-DPO)
WPO = "wpo"  # WPO's length-normalised, aligned sequence log-prob (no grad)
KL_ROWS = "kl"  # the batch carries KTO's mismatched KL rows
WHOLE = "whole"  # log-probs over prompt and response tokens too (ORPO's NLL, as TRL and the ORPO code)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the labelled tokens and how many there are, per sequence.

    logits: (N, T, V) from a causal LM, where logits[:, t] predicts token t + 1.
    labels: (N, T) input ids with prompt and padding positions set to IGNORE_INDEX.
    Returns (logps (N,), n_tokens (N,)), both float32.
    """
    token_logps, mask = _token_logps(logits, labels)
    return token_logps.sum(-1), mask.sum(-1).float()


def _token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs (N, T-1), exactly zero where masked, and the mask (N, T-1).

    The shift aligns logits[:, t] with labels[:, t + 1]. Only the labelled positions go through
    the log-softmax: a masked position (prompt, padding) then contributes nothing at all, not
    even a NaN from an overflowed logit there, in the forward or the backward pass. Logits are
    cast to float32 first: in bf16 the log-sum-exp over a large vocabulary loses about two
    digits, which is the size of the differences DPO trains on.
    """
    assert logits.shape[:2] == labels.shape, (logits.shape, labels.shape)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    selected = logits[:, :-1, :][mask].float()  # (labelled positions, V)
    values = -F.cross_entropy(selected, targets[mask], reduction="none")
    token_logps = torch.zeros(mask.shape, dtype=values.dtype, device=values.device).index_put((mask,), values)
    return token_logps, mask


@dataclass
class SequenceLogps:
    """Per-sequence values of one batch, grouped by role; each tensor is (number of sequences
    of that role,), float32. `chosen[i]` and `rejected[i]` are the two responses of pair i
    for paired data; for unpaired data they are the desirable and undesirable completions.

    chosen, rejected: response log-probs summed over response tokens.
    chosen_tokens, rejected_tokens: number of response tokens.
    kl: summed log-probs of KTO's mismatched KL sequences (when the batch has them).
    chosen_shared, rejected_shared: log-probs summed over the first `shared_tokens` response
        tokens only (LD-DPO), when asked for.
    chosen_wpo, rejected_wpo: WPO's mean over response tokens of log p(y_t) - log sum_v p(v)^2,
        detached, when asked for.
    chosen_whole, chosen_whole_tokens: log-probs summed over every token of the chosen
        sequences but the first (prompt and response), and how many, when asked for.
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    kl: torch.Tensor | None = None
    chosen_shared: torch.Tensor | None = None
    rejected_shared: torch.Tensor | None = None
    chosen_wpo: torch.Tensor | None = None
    rejected_wpo: torch.Tensor | None = None
    chosen_whole: torch.Tensor | None = None
    chosen_whole_tokens: torch.Tensor | None = None


@dataclass
class ForwardOutput:
    logps: SequenceLogps
    # Sum over each sequence's response tokens of the mean logit (over the vocabulary), for
    # TRL's token-weighted `logits/chosen` and `logits/rejected` metrics; (n,) per role, no grad.
    logit_sums_chosen: torch.Tensor
    logit_sums_rejected: torch.Tensor


def _row_values(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], rows: torch.Tensor | None, extras: frozenset[str]
) -> dict[str, torch.Tensor]:
    """Per-row sums for the rows selected by the boolean mask `rows` (None: all rows), as a dict
    of (n,) tensors: logps, tokens, logit_sums, and the `extras` asked for."""

    def select(t: torch.Tensor) -> torch.Tensor:
        return t if rows is None else t[rows]

    input_ids, attention_mask = select(batch["input_ids"]), select(batch["attention_mask"])
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    labels = select(batch["labels"])
    if WHOLE in extras:
        # Every real token as a target: one log-softmax serves the response and the whole sequence.
        targets = torch.where(labels != IGNORE_INDEX, labels, input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX))
        all_logps, all_mask = _token_logps(out.logits, targets)
        mask = labels[:, 1:] != IGNORE_INDEX
        token_logps = torch.where(mask, all_logps, 0.0)
    else:
        token_logps, mask = _token_logps(out.logits, labels)
    values = {"logps": token_logps.sum(-1), "tokens": mask.sum(-1).float()}
    if WHOLE in extras:
        values["whole"], values["whole_tokens"] = all_logps.sum(-1), all_mask.sum(-1).float()
    with torch.no_grad():
        per_token_mean = torch.mean(out.logits[:, :-1], dim=-1, dtype=torch.float32)
        values["logit_sums"] = torch.where(mask, per_token_mean, 0.0).sum(-1)
        if WPO in extras:
            # WPO (Zhou et al., 2024, Eq. 2) aligns each token's log-prob by the log of the
            # model's sum of squared probabilities at that position, then averages over tokens.
            log_sum_sq = torch.logsumexp(2 * torch.log_softmax(out.logits[:, :-1].float(), dim=-1), dim=-1)
            aligned = torch.where(mask, token_logps - log_sum_sq, 0.0)
            values["wpo"] = aligned.sum(-1) / values["tokens"].clamp(min=1)
    if SHARED in extras:
        position = mask.cumsum(-1)  # 1-based index of each response token, 0 before the response
        shared = mask & (position <= select(batch["shared_tokens"]).unsqueeze(-1))
        values["shared"] = torch.where(shared, token_logps, 0.0).sum(-1)
    return values


def batch_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], extras: frozenset[str] = frozenset()
) -> ForwardOutput:
    """Per-sequence log-probs of a batch from `data.collate`, grouped by role.

    `extras` names the optional values to compute (SHARED, WPO). KL rows, if any, are run
    without gradients: KTO detaches its KL estimate, so a graph for them would only cost memory.
    """
    role = batch["role"]
    has_kl = bool((role == KL).any())
    main = role != KL if has_kl else None
    values = _row_values(model, batch, main, extras)
    main_role = role[main] if has_kl else role
    c, r = main_role == CHOSEN, main_role == REJECTED
    kl = None
    if has_kl:
        with torch.no_grad():
            kl = _row_values(model, batch, role == KL, frozenset())["logps"]

    def opt(name: str, which: torch.Tensor) -> torch.Tensor | None:
        return values[name][which] if name in values else None

    logps = SequenceLogps(
        chosen=values["logps"][c],
        rejected=values["logps"][r],
        chosen_tokens=values["tokens"][c],
        rejected_tokens=values["tokens"][r],
        kl=kl,
        chosen_shared=opt("shared", c),
        rejected_shared=opt("shared", r),
        chosen_wpo=opt("wpo", c),
        rejected_wpo=opt("wpo", r),
        chosen_whole=opt("whole", c),
        chosen_whole_tokens=opt("whole_tokens", c),
    )
    return ForwardOutput(logps, values["logit_sums"][c], values["logit_sums"][r])
