"""The batch contract: the names that `data.collate` writes and `logprobs`, `layout`, the
losses and the reference read (see DESIGN.md, "One batch shape").

A batch holds sequences, each with a role and the example it came from, laid out in model
rows (a layout), and lists its targets: one per scored token. This module only names those
parts; it imports nothing, so every stage can depend on it and none on another's internals.
"""

from __future__ import annotations

IGNORE_INDEX = -100  # the label of a position that is not scored (a padded batch's prompt and padding)
CHOSEN, REJECTED, KL = 0, 1, 2  # sequence roles (batch["role"]); sequences are numbered in this order
# ROLE_NAMES[role]: the name by which a loss reads a role's per-sequence values (`logprobs.SequenceLogps`).
ROLE_NAMES = ("chosen", "rejected", "kl")

# How sequences sit in the model's rows (see `data.collate`); `layout.choose` picks one.
LAYOUTS = ("padded", "packed", "shared")

# Per row (R, L): the token ids, and what the attention inputs are built from (see
# `attention.attention_inputs`): the padding mask, and for packed layouts the restarting
# position ids, the unit each token belongs to (segment) and its branch (0 prompt, k k-th response).
ROW_FIELDS = ("input_ids", "attention_mask", "position_ids", "segment", "branch")
# Per target (M,): the row and column whose output predicts the token, the token, its sequence,
# and its 1-based rank among the sequence's response tokens (0 for a prompt token).
TARGET_FIELDS = ("t_row", "t_col", "t_id", "t_seq", "t_rank")

# Extra per-sequence values or batch parts a loss may ask for (`loss.needs`); each costs
# compute, so only what some loss needs is collated and computed.
SHARED = "shared"  # summed log-probs of the first shared_tokens response tokens (LD-DPO)
WPO = "wpo"  # WPO's length-normalised, aligned sequence log-prob (no grad)
KL_ROWS = "kl"  # the batch carries KTO's mismatched KL rows
WHOLE = "whole"  # log-probs over prompt and response tokens too (ORPO's NLL, as TRL and the ORPO code)
