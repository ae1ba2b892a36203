"""Token ids -> padded tensors with chosen rows first, then rejected rows."""

from __future__ import annotations

import torch

from dpo_cli.data.tokenize import Tokenized
from dpo_cli.logprobs import IGNORE_INDEX


def collate(pairs: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """Batch B pairs into (2B, T) tensors: rows [0, B) are prompt + chosen, rows [B, 2B)
    prompt + rejected, right-padded to the longest row.

    labels copy input_ids on response tokens and are IGNORE_INDEX on prompt and padding,
    so only response tokens count in the log-probs.
    """
    rows, labels = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            rows.append(p["prompt_ids"] + p[side])
            labels.append([IGNORE_INDEX] * len(p["prompt_ids"]) + p[side])
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    label_ids = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labels, strict=True)):
        input_ids[i, : len(r)] = torch.tensor(r)
        label_ids[i, : len(lab)] = torch.tensor(lab)
        attention_mask[i, : len(r)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids}
