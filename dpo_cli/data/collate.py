"""Examples -> one batch of sequences, each with a role, laid out in (R, L) model input rows.

A batch holds *sequences*, not pairs: each is one prompt + response, tagged with its role
(CHOSEN, REJECTED or KL) and the index of the example it came from. Every loss reads the same
shape (see DESIGN.md, "One batch shape"): paired losses pair the i-th CHOSEN sequence with the
i-th REJECTED one, KTO reads desirable completions as CHOSEN, undesirable ones as REJECTED, and
its KL reference point from the KL sequences. Sequences are numbered CHOSEN, then REJECTED,
then KL; `logprobs` groups per-sequence values by role, so only the order within a role matters.

A layout decides how the sequences sit in the model's input rows:

- `padded`: one sequence per row, right-padded to the longest (row i is sequence i).
- `packed`: several sequences per row, back to back; position ids restart at each sequence
  and each attends only to itself (a block-diagonal causal mask), so no padding is computed
  but what a row's capacity leaves over.
- `shared`: packed, and the two responses of a pair share one copy of their prompt: the row
  holds prompt, chosen, rejected; both responses attend to the prompt and not to each other,
  their position ids both continue from the prompt's, and the prompt's last position predicts
  the first token of each.

Besides the rows (input_ids, attention_mask, and for packed layouts position_ids, segment and
branch, from which `attention.attention_inputs` builds the mask), a batch lists its *targets*:
one entry per scored token, naming the row and column that predicts it, the token, the
sequence it belongs to and its rank among that sequence's response tokens. Log-probs are then
one gather and one scatter by sequence id, the same for every layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpo_cli.batch import CHOSEN, IGNORE_INDEX, KL, LAYOUTS, REJECTED, RESPONSE_ROLES, TARGET_FIELDS
from dpo_cli.data.tokenize import EXTRAS, Tokenized, responses_by_role


@dataclass
class Sequence:
    prompt: list[int]
    response: list[int]
    role: int
    example: int  # position of its example in the list given to collate
    shared: int  # LD-DPO's shared length (the shorter response of the pair)
    rank: int = 0  # its response's place among its example's responses (a pair's chosen: 0, rejected: 1)


def _sequences(examples: list[Tokenized], kl: bool, kl_donor: Tokenized | None = None) -> list[Sequence]:
    """Every sequence of the batch, CHOSEN, then REJECTED, then KL.

    Each response an example holds (`responses_by_role`) gives a sequence of its role, whose
    shared length is the example's shortest response: for a pair the shorter of the two
    (LD-DPO weights the tokens past it), for an unpaired example its own length.

    With `kl`, KTO's mismatched sequences follow. They rotate over the sequences in order of
    rank (every example's first response, then every second one), then of example: the j-th
    KL sequence is the j-th sequence's prompt followed by the (j - 1)-th's response
    (cyclically). Unpaired examples (one response each) so rotate in example order, as TRL's
    KTOTrainer does; pairs run chosen responses, then rejected ones, so that every KL sequence
    mixes two different pairs once there are at least two of them.
    A batch of one example has no other example to mismatch with: `kl_donor` (an example from
    outside the batch) then gives the KL sequences' responses, its i-th sequence's to the i-th.
    """
    by_role: dict[int, list[Sequence]] = {role: [] for role in RESPONSE_ROLES}
    for i, ex in enumerate(examples):
        held = responses_by_role(ex)
        shared = min(len(ids) for ids in held.values())
        for rank, (role, ids) in enumerate(held.items()):
            by_role[role].append(Sequence(ex["prompt_ids"], ids, role, i, shared, rank))
    seqs = [s for role in RESPONSE_ROLES for s in by_role[role]]
    if kl and len(examples) == 1 and kl_donor is not None:
        donor = _sequences([kl_donor], False)
        return seqs + [
            Sequence(s.prompt, donor[j % len(donor)].response, KL, s.example, len(donor[j % len(donor)].response))
            for j, s in enumerate(seqs)
        ]
    if kl:
        # By rank, then example: no prompt meets its own responses (see the docstring).
        order = sorted(seqs, key=lambda q: (q.rank, q.example))
        seqs += [
            Sequence(s.prompt, order[j - 1].response, KL, s.example, len(order[j - 1].response))
            for j, s in enumerate(order)
        ]
    return seqs


def _scored(prompt: list[int], response: list[int]) -> int:
    """How many of `response`'s tokens `collate` scores: all, but the first when the prompt is
    empty (nothing predicts it)."""
    return len(response) - (1 if response and not prompt else 0)


def chosen_token_means(examples: list[Tokenized]) -> tuple[float, float]:
    """(scored response tokens, scored whole-sequence tokens) of the examples' CHOSEN sequences
    (an unpaired example's desirable completion; an undesirable one has none), per example:
    the denominators of a token-mean NLL over these examples, counted exactly as `collate`
    scores them, before any forward pass (see `scoring.batch_loss`)."""
    response = whole = 0
    for ex in examples:
        prompt, chosen = ex["prompt_ids"], responses_by_role(ex).get(CHOSEN)
        if chosen is None:
            continue
        response += _scored(prompt, chosen)
        whole += max(len(prompt) - 1, 0) + _scored(prompt, chosen)
    n = max(len(examples), 1)
    return response / n, whole / n


def _units(seqs: list[Sequence], layout: str) -> list[tuple[list[int], list[int]]]:
    """What must sit together in one row: (prompt ids, the ids of the sequences that follow it).
    Under `shared` the two sequences of a pair share their prompt; otherwise every sequence is
    a unit of its own."""
    if layout != "shared":
        return [(s.prompt, [i]) for i, s in enumerate(seqs)]
    units, partner = [], {}
    for i, s in enumerate(seqs):
        if (
            s.role == REJECTED
            and (s.example, CHOSEN) in partner
            and s.prompt == seqs[partner[s.example, CHOSEN]].prompt
        ):
            units[partner.pop((s.example, CHOSEN))][1].append(i)  # the pair's chosen came first
            continue
        if s.role == CHOSEN:
            partner[s.example, CHOSEN] = len(units)
        units.append((s.prompt, [i]))
    return units


def _rows(units: list[tuple[list[int], list[int]]], seqs: list[Sequence], layout: str) -> list[list[int]]:
    """Units (by index) per row: one per row when padded; else first-fit decreasing into rows
    as long as the longest unit, KL units in rows of their own (they run in a pass without
    gradients)."""
    if layout == "padded":
        return [[u] for u in range(len(units))]
    length = [len(p) + sum(len(seqs[i].response) for i in members) for p, members in units]
    capacity = max(length)
    rows: list[list[int]] = []
    room: list[int] = []
    kind: list[bool] = []
    for u in sorted(range(len(units)), key=lambda u: (-length[u], u)):
        is_kl = seqs[units[u][1][0]].role == KL
        row = next((r for r in range(len(rows)) if kind[r] == is_kl and room[r] >= length[u]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            kind.append(is_kl)
            row = len(rows) - 1
        rows[row].append(u)
        room[row] -= length[u]
    return [r for _, r in sorted(zip(kind, rows, strict=True), key=lambda kr: kr[0])]  # KL rows last


def collate(
    examples: list[Tokenized],
    pad_id: int,
    kl: bool = False,
    index: list[int] | None = None,
    layout: str = "padded",
    whole: bool = False,
    kl_donor: Tokenized | None = None,
) -> dict[str, torch.Tensor]:
    """Batch examples (pairs or unpaired completions) into model input rows (see the module doc).
    `kl_donor`: the example whose responses a one-example batch's KL sequences take.

    Keys, per row (R, L): input_ids, attention_mask (1 on tokens, 0 on padding), and for
    `packed`/`shared` position_ids, segment (which unit a token belongs to, -1 on padding) and
    branch (0 on a prompt, k on the k-th response after it); row_kl (R,): rows of KL sequences.
    `padded` also gives labels (R, L): input ids on response tokens, IGNORE_INDEX elsewhere.

    Per sequence (N,): role, example (index into `examples`), index (the example's index in its
    dataset, `index[example]`; default `example`: what a precomputed reference looks its
    log-probs up by), shared_tokens, tokens (response tokens scored), length (prompt + response).

    Per target (M,): t_row, t_col (the position whose output predicts the token), t_id (the
    token), t_seq (its sequence), t_rank (1-based rank among the sequence's response tokens; 0
    for a prompt token). Prompt tokens are targets only with `whole` (ORPO's NLL over the chosen
    sequence), and only of CHOSEN sequences; a sequence's first token has nothing predicting it.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    seqs = _sequences(examples, kl, kl_donor)
    units = _units(seqs, layout)
    rows = _rows(units, seqs, layout)
    grid, targets = _lay_out(rows, units, seqs, pad_id, whole)
    example = torch.tensor([s.example for s in seqs], dtype=torch.long)
    t = torch.tensor(targets, dtype=torch.long).reshape(-1, 5)
    batch = {
        "input_ids": grid["input_ids"],
        "attention_mask": (grid["segment"] >= 0).long(),
        "row_kl": torch.tensor([seqs[units[row[0]][1][0]].role == KL for row in rows]),
        "role": torch.tensor([s.role for s in seqs], dtype=torch.long),
        "example": example,
        "index": example if index is None else torch.tensor(index, dtype=torch.long)[example],
        "shared_tokens": torch.tensor([s.shared for s in seqs], dtype=torch.long),
        "tokens": torch.bincount(t[:, 3][t[:, 4] > 0], minlength=len(seqs)).float(),
        "length": torch.tensor([len(s.prompt) + len(s.response) for s in seqs], dtype=torch.long),
        **{name: t[:, k] for k, name in enumerate(TARGET_FIELDS)},
        "whole": torch.tensor(whole),
    }
    for key in EXTRAS:
        if any(key in ex for ex in examples):
            batch[key] = torch.tensor([float(ex.get(key, 0.0)) for ex in examples], dtype=torch.float32)
    if layout == "padded":
        batch["labels"] = _labels(t, grid["input_ids"].shape)
    else:
        batch.update(position_ids=grid["position_ids"], segment=grid["segment"], branch=grid["branch"])
    return batch


def _lay_out(
    rows: list[list[int]], units: list[tuple[list[int], list[int]]], seqs: list[Sequence], pad_id: int, whole: bool
) -> tuple[dict[str, torch.Tensor], list[tuple[int, int, int, int, int]]]:
    """The rows' tensors (R, L), each unit's prompt then its sequences' responses back to back:
    input_ids, position_ids, segment and branch; and the targets, as (row, predicting column,
    token, sequence, rank) in the order of TARGET_FIELDS."""
    width = max(sum(len(units[u][0]) + sum(len(seqs[i].response) for i in units[u][1]) for u in row) for row in rows)
    n_rows = len(rows)
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    segment = torch.full((n_rows, width), -1, dtype=torch.long)
    branch = torch.zeros((n_rows, width), dtype=torch.long)
    targets: list[tuple[int, int, int, int, int]] = []  # row, predicting column, token, sequence, rank
    for r, row in enumerate(rows):
        col = 0
        for u in row:
            prompt, members = units[u]
            p = len(prompt)
            input_ids[r, col : col + p] = torch.tensor(prompt, dtype=torch.long)
            position_ids[r, col : col + p] = torch.arange(p)
            segment[r, col : col + p] = u
            if whole and seqs[members[0]].role == CHOSEN:
                targets += [(r, col + k - 1, prompt[k], members[0], 0) for k in range(1, p)]
            start = col + p
            for b, i in enumerate(members, start=1):
                response = seqs[i].response
                m = len(response)
                input_ids[r, start : start + m] = torch.tensor(response, dtype=torch.long)
                position_ids[r, start : start + m] = torch.arange(p, p + m)
                segment[r, start : start + m] = u
                branch[r, start : start + m] = b
                for k in range(m):
                    predictor = start + k - 1 if k else col + p - 1
                    if predictor >= col:  # an empty prompt leaves the first token unpredicted
                        targets.append((r, predictor, response[k], i, k + 1))
                start += m
            col = start
    grid = {"input_ids": input_ids, "position_ids": position_ids, "segment": segment, "branch": branch}
    return grid, targets


def _labels(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Padded rows' labels: the input id at each response token, IGNORE_INDEX elsewhere
    (`t`: the targets as (M, 5) rows in the order of TARGET_FIELDS)."""
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    response = t[:, 4] > 0
    labels[t[response, 0], t[response, 1] + 1] = t[response, 2]
    return labels
