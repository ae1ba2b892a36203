"""The one place where sequence log-probabilities are computed.

A batch (see `data.collate`) holds sequences with roles, laid out in model rows, and lists its
targets: for each scored token, the row and column whose output predicts it and the sequence
it belongs to. `batch_logps` runs the model over the rows and returns per-sequence values
grouped by role (one gather at the targets, one scatter by sequence), so every loss and every
layout share one code path. With a `Head` (see `lmhead`) only the target positions go through
the LM head, in chunks; without one the model's full logits are used. The CHOSEN and REJECTED
sequences go through one forward pass (one set of kernel launches and, under DDP, one gradient
sync); KL rows, which no loss differentiates, go through a second one without building a graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpo_cli.attention import attention_inputs
from dpo_cli.batch import CHOSEN, IGNORE_INDEX, KL, REJECTED, ROLE_NAMES, ROW_FIELDS, SHARED, TARGET_FIELDS, WHOLE, WPO
from dpo_cli.batch import KL_ROWS as KL_ROWS  # re-exported with the other names of the batch contract
from dpo_cli.lmhead import Head, chunked_logps, position_stats


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the labelled tokens and how many there are, per row.

    logits: (N, T, V) from a causal LM, where logits[:, t] predicts token t + 1.
    labels: (N, T) input ids with prompt and padding positions set to IGNORE_INDEX.
    Returns (logps (N,), n_tokens (N,)), both float32. Only the labelled positions go through
    the log-softmax, in float32: a masked position (prompt, padding) contributes nothing, not
    even a NaN from an overflowed logit there, in the forward or the backward pass; and in bf16
    the log-sum-exp over a large vocabulary would lose about two digits, the size of the
    differences DPO trains on.
    """
    t = _targets({"labels": labels}, whole=False)
    logps = -F.cross_entropy(logits[t["t_row"], t["t_col"]].float(), t["t_id"], reduction="none")
    n = labels.shape[0]
    at = (t["t_seq"], t["t_col"])
    return _per_sequence(logps, at, n), _per_sequence(torch.ones_like(logps), at, n)


@dataclass
class RoleValues:
    """One role's per-sequence values, each (number of sequences of that role,), float32.

    logps: log-probs summed over response tokens.
    tokens: number of response tokens.
    shared: log-probs summed over the first `shared_tokens` response tokens only (LD-DPO),
        when asked for (`batch.SHARED`).
    wpo: WPO's mean over response tokens of log p(y_t) - log sum_v p(v)^2, detached, when
        asked for (`batch.WPO`).
    whole, whole_tokens: log-probs summed over every token of the sequences but the first
        (prompt and response), and how many, when asked for (`batch.WHOLE`; CHOSEN only).
    """

    logps: torch.Tensor
    tokens: torch.Tensor
    shared: torch.Tensor | None = None
    wpo: torch.Tensor | None = None
    whole: torch.Tensor | None = None
    whole_tokens: torch.Tensor | None = None


@dataclass
class SequenceLogps:
    """Per-sequence values of one batch, by role name (`batch.ROLE_NAMES`): `values["chosen"]`,
    `values["rejected"]` and, when the batch has KTO's mismatched KL rows, `values["kl"]`.
    `values["chosen"].logps[i]` and `values["rejected"].logps[i]` are the two responses of pair
    i for paired data; for unpaired data they are the desirable and undesirable completions.

    roles: role name -> `RoleValues`.
    nll_tokens, nll_whole_tokens: what a token-mean NLL divides this batch's summed chosen
        (whole-sequence) log-probs by: the batch's share of the tokens of its whole optimizer
        step (or eval set), so that the NLL is one token mean over the step however it is split
        into micro batches and processes (set by `scoring.batch_loss`); None = this batch's
        own token count.
    """

    roles: dict[str, RoleValues]
    nll_tokens: float | None = None
    nll_whole_tokens: float | None = None

    def __getitem__(self, role: str) -> RoleValues:
        return self.roles[role]

    def __contains__(self, role: str) -> bool:
        return role in self.roles

    def replace(self, **roles: RoleValues) -> SequenceLogps:
        """A copy with the given roles' values replaced (the others and the NLL counts kept)."""
        return SequenceLogps({**self.roles, **roles}, self.nll_tokens, self.nll_whole_tokens)


@dataclass
class ForwardOutput:
    logps: SequenceLogps
    # Sum over each sequence's response tokens of the mean logit (over the vocabulary), for
    # TRL's token-weighted `logits/chosen` and `logits/rejected` metrics; (n,) per role, no grad.
    logit_sums_chosen: torch.Tensor | None  # None when not asked for (`stats=False`)
    logit_sums_rejected: torch.Tensor | None


def _targets(batch: dict[str, torch.Tensor], whole: bool) -> dict[str, torch.Tensor]:
    """The batch's targets (t_row, t_col, t_id, t_seq, t_rank). A batch built by hand with
    `labels` only (padded rows, one sequence per row) gets them from its labels, and with
    `whole` every real token after the first becomes a target too (rank 0 for prompt tokens)."""
    if "t_row" in batch:
        if whole and not bool(batch["whole"]):
            raise ValueError("whole-sequence log-probs need a batch collated with whole=True")
        return {k: batch[k] for k in TARGET_FIELDS}
    labels = batch["labels"][:, 1:]
    scored = labels != IGNORE_INDEX
    if whole:
        scored = scored | (batch["attention_mask"][:, 1:] > 0)
    row, col = torch.nonzero(scored, as_tuple=True)
    response = labels[row, col] != IGNORE_INDEX
    rank = (labels != IGNORE_INDEX).cumsum(-1)[row, col]
    ids = torch.where(response, labels[row, col], batch["input_ids"][:, 1:][row, col] if whole else 0)
    return {
        "t_row": row,
        "t_col": col,
        "t_id": ids,
        "t_seq": row,
        "t_rank": torch.where(response, rank, 0),
    }


def _forward(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    rows: torch.Tensor | None,
    targets: dict[str, torch.Tensor],
    head: Head | None,
    stats: bool,
    wpo: bool,
) -> dict[str, torch.Tensor]:
    """Per-target values for the rows selected by the boolean mask `rows` (None: all rows):
    "logps" (with gradients), and without gradients "mean_logit" (with `stats`) and
    "log_sum_sq" (with `wpo`). `targets` must be those of the selected rows."""

    def select(t: torch.Tensor) -> torch.Tensor:
        return t if rows is None else t[rows]

    sub = {k: select(batch[k]) for k in ROW_FIELDS if k in batch}
    inputs = {"input_ids": sub["input_ids"], **attention_inputs(sub, model), "use_cache": False}
    where = (targets["t_row"], targets["t_col"])
    values: dict[str, torch.Tensor] = {}
    if head is None:
        logits = model(**inputs).logits[where].float()  # (M, V): the scored positions only
        values["logps"] = -F.cross_entropy(logits, targets["t_id"], reduction="none")
        with torch.no_grad():
            if stats:
                values["mean_logit"] = logits.mean(-1)
            if wpo:
                values["log_sum_sq"] = torch.logsumexp(2 * torch.log_softmax(logits, -1), -1)
        return values
    with head.capture() as hidden:
        # No logits from the model itself (an empty selection); the hook keeps its hidden states.
        model(**inputs, logits_to_keep=torch.zeros(0, dtype=torch.long, device=sub["input_ids"].device))
        h = hidden()[where]
    weight, bias = head.linear.weight, head.linear.bias
    values["logps"] = chunked_logps(h, weight, bias, targets["t_id"], head.chunk)
    if stats or wpo:
        extra = position_stats(h.detach(), weight.detach(), None if bias is None else bias.detach(), head.chunk, wpo)
        if stats:
            values["mean_logit"] = extra["mean_logit"]
        if wpo:
            values["log_sum_sq"] = extra["log_sum_sq"]
    return values


def _select_rows(targets: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The targets that fall in the selected rows, with row numbers counted among those rows."""
    keep = rows[targets["t_row"]]
    renumber = rows.long().cumsum(0) - 1
    out = {k: v[keep] for k, v in targets.items()}
    out["t_row"] = renumber[out["t_row"]]
    return out


def _per_sequence(values: torch.Tensor, at: tuple[torch.Tensor, torch.Tensor], n: int) -> torch.Tensor:
    """Per-sequence sums of per-target `values`, `at` = (t_seq, t_col) of each target (unique
    pairs). The values are laid out by predicting column and summed along it, so a padded
    batch sums in the order a (rows, positions) mask-and-sum does (as TRL does, to the bit)."""
    seq, col = at
    width = int(col.max()) + 1 if col.numel() else 1
    dense = torch.zeros(n, width, dtype=values.dtype, device=values.device)
    return dense.index_put((seq, col), values).sum(-1)


def batch_logps(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    extras: frozenset[str] = frozenset(),
    head: Head | None = None,
    stats: bool = True,
) -> ForwardOutput:
    """Per-sequence log-probs of a batch from `data.collate`, grouped by role.

    `extras` names the optional values to compute (SHARED, WPO, WHOLE); `head` runs the LM head
    on the target positions only, in chunks (None: the model's full logits); `stats=False`
    skips the mean-logit metric (a reference has no use for it). KL rows, if any, are run
    without gradients: KTO detaches its KL estimate, so a graph for them would only cost memory.
    """
    role = batch["role"]
    n = role.shape[0]
    targets = _targets(batch, WHOLE in extras)
    row_kl = batch["row_kl"] if "row_kl" in batch else role == KL  # hand-built batches: a row per sequence
    has_kl = bool(row_kl.any())
    main_targets = _select_rows(targets, ~row_kl) if has_kl else targets
    per_target = _forward(model, batch, ~row_kl if has_kl else None, main_targets, head, stats, WPO in extras)
    values = _sequence_values(per_target, main_targets, batch, n, extras, stats)
    kl = None
    if has_kl:
        with torch.no_grad():
            kl_targets = _select_rows(targets, row_kl)
            kl_logps = _forward(model, batch, row_kl, kl_targets, head, False, False)
            kl = _sequence_values(kl_logps, kl_targets, batch, n, frozenset(), False)
    return _by_role(values, role, kl)


def _sequence_values(
    per_target: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    n: int,
    extras: frozenset[str],
    stats: bool,
) -> dict[str, torch.Tensor]:
    """Per-sequence sums of the per-target values (`_forward`'s) of the `n` sequences: "logps"
    and "tokens" over response tokens, and what `extras` and `stats` ask for."""
    seq, rank = targets["t_seq"], targets["t_rank"]
    at = (seq, targets["t_col"])
    response = rank > 0
    logps = per_target["logps"]

    def summed(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        return _per_sequence(torch.where(where, values, 0.0), at, n)

    tokens = _per_sequence(response.float(), at, n)
    values = {"logps": summed(logps, response), "tokens": tokens}
    if stats:
        values["logit_sums"] = summed(per_target["mean_logit"], response)
    if WHOLE in extras:
        values["whole"], values["whole_tokens"] = (
            _per_sequence(logps, at, n),
            _per_sequence(torch.ones_like(logps), at, n),
        )
    if WPO in extras:
        # WPO (Zhou et al., 2024, Eq. 2) aligns each token's log-prob by the log of the
        # model's sum of squared probabilities at that position, then averages over tokens.
        aligned = summed(logps.detach() - per_target["log_sum_sq"], response)
        values["wpo"] = aligned / tokens.clamp(min=1)
    if SHARED in extras:
        values["shared"] = summed(logps, response & (rank <= batch["shared_tokens"][seq]))
    return values


def _by_role(values: dict[str, torch.Tensor], role: torch.Tensor, kl: dict[str, torch.Tensor] | None) -> ForwardOutput:
    """Per-sequence `values` split by role, each role's sequences in their order: CHOSEN and
    REJECTED from the main forward, KL from `kl` (the no-grad forward of the KL rows)."""

    def of(which: int, source: dict[str, torch.Tensor]) -> RoleValues:
        at = role == which
        # Only CHOSEN sequences have their prompt tokens scored (`collate(whole=True)`).
        skip = ("logit_sums",) if which == CHOSEN else ("logit_sums", "whole", "whole_tokens")
        return RoleValues(**{k: v[at] for k, v in source.items() if k not in skip})

    roles = {ROLE_NAMES[r]: of(r, values) for r in (CHOSEN, REJECTED)}
    if kl is not None:
        roles[ROLE_NAMES[KL]] = of(KL, kl)
    sums = values.get("logit_sums")
    return ForwardOutput(
        SequenceLogps(roles),
        None if sums is None else sums[role == CHOSEN],
        None if sums is None else sums[role == REJECTED],
    )
