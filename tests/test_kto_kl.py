"""KTO's KL reference point pairs each prompt with another example's completion. An eval batch
of one example (33 eval examples in batches of 4 leave one) used to pair the prompt with its
own completion, which is no mismatch at all."""

from __future__ import annotations

import pytest

from dpo_cli.data.tokenize import responses_by_role
from dpo_cli.logprobs import KL
from dpo_cli.losses.kto import KTOLoss
from dpo_cli.scoring import make_batch

UNPAIRED = [
    {"prompt_ids": [1, 2], "chosen_ids": [10, 11], "rejected_ids": []},
    {"prompt_ids": [3], "chosen_ids": [], "rejected_ids": [20, 21, 22]},
    {"prompt_ids": [4, 5, 6], "chosen_ids": [30], "rejected_ids": []},
]
PAIRED = [
    {"prompt_ids": [1, 2], "chosen_ids": [10, 11], "rejected_ids": [12]},
    {"prompt_ids": [3], "chosen_ids": [20], "rejected_ids": [21, 22]},
]


def _completion(example) -> list[int]:
    """An unpaired example's one response, whatever its role."""
    (ids,) = responses_by_role(example).values()
    return ids


def _kl_rows(batch) -> list[list[int]]:
    rows = batch["input_ids"][batch["row_kl"]]
    mask = batch["attention_mask"][batch["row_kl"]]
    return [r[m.bool()].tolist() for r, m in zip(rows, mask, strict=True)]


@pytest.mark.parametrize("last", [0, 2])
def test_a_batch_of_one_unpaired_example_takes_another_examples_completion(last):
    batch = make_batch(UNPAIRED, [last], 0, KTOLoss(), "cpu")
    donor = UNPAIRED[last - 1] if last else UNPAIRED[1]
    assert (batch["role"] == KL).sum() == 1
    assert _kl_rows(batch) == [UNPAIRED[last]["prompt_ids"] + _completion(donor)]


def test_a_batch_of_one_pair_takes_another_pairs_responses():
    batch = make_batch(PAIRED, [1], 0, KTOLoss(), "cpu")
    prompt, donor = PAIRED[1]["prompt_ids"], PAIRED[0]
    assert sorted(_kl_rows(batch)) == sorted([prompt + donor["chosen_ids"], prompt + donor["rejected_ids"]])


def test_batches_of_several_examples_are_unchanged():
    """Two or more examples mismatch among themselves (previous example's completion), as TRL."""
    batch = make_batch(UNPAIRED, [0, 1, 2], 0, KTOLoss(), "cpu")
    want = [UNPAIRED[j]["prompt_ids"] + _completion(UNPAIRED[j - 1]) for j in range(3)]
    assert sorted(_kl_rows(batch)) == sorted(want)
