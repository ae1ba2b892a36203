"""Examples -> one batch of sequences, each with a role, padded into (N, T) tensors.

A batch holds *sequences*, not pairs: each row is one prompt + response, tagged with its role
(CHOSEN, REJECTED or KL) and the index of the example it came from. Every loss reads the same
shape (see DESIGN.md, "One batch shape"): paired losses pair the i-th CHOSEN row with the i-th
REJECTED row, KTO reads desirable completions as CHOSEN rows, undesirable ones as REJECTED
rows, and its KL reference point from the KL rows. Rows are ordered CHOSEN, then REJECTED,
then KL; `logprobs` groups per-sequence values by role, so only the order within a role matters.
"""

from __future__ import annotations

import torch

from dpo_cli.data.tokenize import Tokenized
from dpo_cli.logprobs import CHOSEN, IGNORE_INDEX, KL, REJECTED


def _sequences(examples: list[Tokenized]) -> list[tuple[list[int], list[int], int, int, int]]:
    """(prompt ids, response ids, role, example index, shared length) for every non-KL sequence.

    A pair gives a CHOSEN and a REJECTED sequence whose shared length is the shorter of the two
    responses (LD-DPO weights the tokens past it); an unpaired example ({prompt_ids,
    completion_ids, label}) gives one sequence, CHOSEN if desirable, whose shared length is its
    own length.
    """
    chosen, rejected = [], []
    for i, ex in enumerate(examples):
        if "completion_ids" in ex:
            seq = (ex["prompt_ids"], ex["completion_ids"], CHOSEN if ex["label"] else REJECTED, i)
            (chosen if ex["label"] else rejected).append((*seq, len(ex["completion_ids"])))
        else:
            shared = min(len(ex["chosen_ids"]), len(ex["rejected_ids"]))
            chosen.append((ex["prompt_ids"], ex["chosen_ids"], CHOSEN, i, shared))
            rejected.append((ex["prompt_ids"], ex["rejected_ids"], REJECTED, i, shared))
    return chosen + rejected


def collate(
    examples: list[Tokenized], pad_id: int, kl: bool = False, index: list[int] | None = None
) -> dict[str, torch.Tensor]:
    """Batch examples (pairs or unpaired completions) into right-padded (N, T) tensors.

    Keys: input_ids, attention_mask, labels (input ids on response tokens, IGNORE_INDEX on the
    prompt and padding, so only response tokens count), role (N,), example (N,) (index into
    `examples`), index (N,) (the example's index in its dataset, `index[example]`; default
    `example`: what a precomputed reference looks its log-probs up by) and shared_tokens (N,).

    With `kl=True`, KTO's mismatched sequences follow: for unpaired examples the j-th KL row
    is example j's prompt followed by example j - 1's completion (cyclically), as in TRL's
    KTOTrainer. For pairs the rotation runs over the rows (chosen responses, then rejected
    ones), so every KL row mixes two different pairs once there are at least two of them.
    """
    seqs = _sequences(examples)
    if kl:
        # Unpaired examples rotate in example order (as TRL's KTOTrainer does); pairs in row
        # order, chosen responses first, so that no prompt meets its own responses.
        order = sorted(seqs, key=lambda q: q[3]) if "completion_ids" in examples[0] else list(seqs)
        seqs += [
            (prompt, order[j - 1][1], KL, example, len(order[j - 1][1]))
            for j, (prompt, _, _, example, _) in enumerate(order)
        ]
    width = max(len(p) + len(r) for p, r, *_ in seqs)
    n = len(seqs)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    for row, (prompt, response, *_) in enumerate(seqs):
        ids = torch.tensor(prompt + response, dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        labels[row, len(prompt) : len(ids)] = ids[len(prompt) :]
        attention_mask[row, : len(ids)] = 1
    example = torch.tensor([s[3] for s in seqs], dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "role": torch.tensor([s[2] for s in seqs], dtype=torch.long),
        "example": example,
        "index": example if index is None else torch.tensor(index, dtype=torch.long)[example],
        "shared_tokens": torch.tensor([s[4] for s in seqs], dtype=torch.long),
    }
