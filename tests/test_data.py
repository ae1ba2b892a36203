"""The data pipeline: HH rows -> pairs -> token ids (truncation) -> tensors, and the batch order."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import data_config

from dpo_cli.data import batching, load_pairs
from dpo_cli.data.collate import collate
from dpo_cli.data.formats import hh, synthetic
from dpo_cli.data.tokenize import TruncationStats, tokenize_pairs, truncate
from dpo_cli.errors import DataError
from dpo_cli.logprobs import CHOSEN, KL, REJECTED
from dpo_cli.modeling import byte_tokenizer

HH_SAMPLE = Path(__file__).parent / "fixtures" / "hh_sample.jsonl"
HH_ROWS = 12  # in the fixture
HH_USABLE = 10  # 8 single-turn + 2 multi-turn; 1 has an empty rejected response, 1 differs early
X = -100  # IGNORE_INDEX, short for the tables below


# --- collate -------------------------------------------------------------------------------


def test_collate_exact_tensors():
    """Pair 0: prompt 3 tokens, chosen 2, rejected 3. Pair 1: prompt 2, chosen 4, rejected 2.
    Rows: chosen of pair 0 (5), chosen of pair 1 (6), rejected of pair 0 (6), rejected of
    pair 1 (4); width 6, padded on the right with pad_id 0."""
    pairs = [
        {"prompt_ids": [1, 10, 11], "chosen_ids": [20, 2], "rejected_ids": [30, 31, 2]},
        {"prompt_ids": [1, 12], "chosen_ids": [21, 22, 23, 2], "rejected_ids": [32, 2]},
    ]
    batch = collate(pairs, pad_id=0)
    per_row = {"input_ids", "attention_mask", "labels", "row_kl"}
    per_sequence = {"role", "example", "index", "shared_tokens", "tokens", "length"}
    per_target = {"t_row", "t_col", "t_id", "t_seq", "t_rank"}
    assert set(batch) == per_row | per_sequence | per_target | {"whole"}
    assert batch["role"].tolist() == [CHOSEN, CHOSEN, REJECTED, REJECTED]
    assert batch["example"].tolist() == [0, 1, 0, 1]
    assert batch["shared_tokens"].tolist() == [2, 2, 2, 2]  # the shorter response of each pair
    expected_ids = torch.tensor(
        [
            [1, 10, 11, 20, 2, 0],
            [1, 12, 21, 22, 23, 2],
            [1, 10, 11, 30, 31, 2],
            [1, 12, 32, 2, 0, 0],
        ]
    )
    expected_mask = torch.tensor(
        [
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 0, 0],
        ]
    )
    expected_labels = torch.tensor(
        [
            [X, X, X, 20, 2, X],
            [X, X, 21, 22, 23, 2],
            [X, X, X, 30, 31, 2],
            [X, X, 32, 2, X, X],
        ]
    )
    for key, expected in (("input_ids", expected_ids), ("attention_mask", expected_mask), ("labels", expected_labels)):
        assert batch[key].dtype == torch.long, key
        assert torch.equal(batch[key], expected), (key, batch[key])


def test_collate_pads_with_pad_id():
    pairs = [{"prompt_ids": [5], "chosen_ids": [6], "rejected_ids": [7, 8, 9]}]
    batch = collate(pairs, pad_id=258)
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 258, 258], [5, 7, 8, 9]]))
    assert torch.equal(batch["labels"], torch.tensor([[X, 6, X, X], [X, 7, 8, 9]]))


def test_collate_unpaired_examples_with_kl_rows():
    """Three unpaired examples: 0 desirable, 1 undesirable, 2 desirable. Rows: the desirable
    completions (examples 0, 2) as CHOSEN, then the undesirable one (1) as REJECTED, then one
    KL row per example, in example order: example j's prompt with example j - 1's completion
    (cyclically): [p0 + c2], [p1 + c0], [p2 + c1]."""
    examples = [
        {"prompt_ids": [1, 10], "chosen_ids": [20, 2], "rejected_ids": []},
        {"prompt_ids": [1, 11], "chosen_ids": [], "rejected_ids": [21, 22, 2]},
        {"prompt_ids": [1, 12], "chosen_ids": [23, 2], "rejected_ids": []},
    ]
    batch = collate(examples, pad_id=0, kl=True)
    assert batch["role"].tolist() == [CHOSEN, CHOSEN, REJECTED, KL, KL, KL]
    assert batch["example"].tolist() == [0, 2, 1, 0, 1, 2]
    expected_ids = torch.tensor(
        [
            [1, 10, 20, 2, 0],
            [1, 12, 23, 2, 0],
            [1, 11, 21, 22, 2],
            [1, 10, 23, 2, 0],
            [1, 11, 20, 2, 0],
            [1, 12, 21, 22, 2],
        ]
    )
    expected_labels = torch.tensor(
        [
            [X, X, 20, 2, X],
            [X, X, 23, 2, X],
            [X, X, 21, 22, 2],
            [X, X, 23, 2, X],
            [X, X, 20, 2, X],
            [X, X, 21, 22, 2],
        ]
    )
    assert torch.equal(batch["input_ids"], expected_ids)
    assert torch.equal(batch["labels"], expected_labels)
    assert torch.equal(batch["attention_mask"], (expected_ids != 0).long())


def test_collate_pairs_with_kl_rows_never_match_their_prompt():
    """KTO on pairs: chosen c0, c1 then rejected r0, r1; KL rows take the previous sequence's
    response: p0 + r1, p1 + c0, p0 + c1, p1 + r0. With two or more pairs no KL row pairs a
    prompt with its own response."""
    pairs = [
        {"prompt_ids": [1, 10], "chosen_ids": [20], "rejected_ids": [30]},
        {"prompt_ids": [1, 11], "chosen_ids": [21], "rejected_ids": [31]},
    ]
    batch = collate(pairs, pad_id=0, kl=True)
    kl_rows = batch["input_ids"][batch["role"] == KL].tolist()
    assert kl_rows == [[1, 10, 31], [1, 11, 20], [1, 10, 21], [1, 11, 30]]


# --- truncation ------------------------------------------------------------------------------

BOS = 1
LONG_PROMPT = [BOS, 10, 11, 12, 13, 14]  # 6 tokens, starting with BOS


def test_truncate_nothing_when_it_fits():
    stats = TruncationStats()
    out = truncate(
        LONG_PROMPT, [20, 2], [30, 31, 2], max_length=9, max_prompt_length=4, keep_end=True, bos_id=BOS, stats=stats
    )
    # 6 + 3 = 9 fits, although the prompt is longer than max_prompt_length.
    assert out == {"prompt_ids": LONG_PROMPT, "chosen_ids": [20, 2], "rejected_ids": [30, 31, 2]}
    assert (stats.prompts, stats.responses) == (0, 0)


def test_truncate_prompt_keep_end_keeps_bos():
    """6 + 3 = 9 > 8: the prompt is cut to 4 tokens, BOS + its last 3; then 4 + 3 fits."""
    stats = TruncationStats()
    out = truncate(
        LONG_PROMPT, [20, 2], [30, 31, 2], max_length=8, max_prompt_length=4, keep_end=True, bos_id=BOS, stats=stats
    )
    assert out == {"prompt_ids": [BOS, 12, 13, 14], "chosen_ids": [20, 2], "rejected_ids": [30, 31, 2]}
    assert (stats.prompts, stats.responses) == (1, 0)


def test_truncate_prompt_keep_end_without_bos():
    out = truncate([10, 11, 12, 13, 14, 15], [20, 2], [30, 31, 2], 8, 4, keep_end=True, bos_id=BOS)
    assert out["prompt_ids"] == [12, 13, 14, 15]
    out = truncate(LONG_PROMPT, [20, 2], [30, 31, 2], 8, 4, keep_end=True, bos_id=None)
    assert out["prompt_ids"] == [11, 12, 13, 14]


def test_truncate_prompt_keep_start():
    out = truncate(LONG_PROMPT, [20, 2], [30, 31, 2], 8, 4, keep_end=False, bos_id=BOS)
    assert out["prompt_ids"] == [BOS, 10, 11, 12]
    assert out["chosen_ids"] == [20, 2] and out["rejected_ids"] == [30, 31, 2]


def test_truncate_responses_after_the_prompt():
    """6 + 5 > 7: the prompt goes to [BOS, 12, 13, 14]; 4 + 5 > 7 still, so both responses
    are cut to the 3 tokens left (the shorter one is already within it)."""
    stats = TruncationStats()
    out = truncate(LONG_PROMPT, [20, 21, 22, 23, 2], [30, 2], 7, 4, keep_end=True, bos_id=BOS, stats=stats)
    assert out == {"prompt_ids": [BOS, 12, 13, 14], "chosen_ids": [20, 21, 22], "rejected_ids": [30, 2]}
    assert (stats.prompts, stats.responses) == (1, 1)
    assert len(out["prompt_ids"]) + max(len(out["chosen_ids"]), len(out["rejected_ids"])) == 7


def test_truncate_short_prompt_only_cuts_responses():
    stats = TruncationStats()
    out = truncate([BOS, 10], list(range(20, 28)), [30, 31, 2], 6, 4, keep_end=True, bos_id=BOS, stats=stats)
    assert out == {"prompt_ids": [BOS, 10], "chosen_ids": [20, 21, 22, 23], "rejected_ids": [30, 31, 2]}
    assert (stats.prompts, stats.responses) == (0, 1)


def test_truncation_stats_accumulate():
    stats = TruncationStats()
    for _ in range(3):
        truncate(LONG_PROMPT, [20, 21, 22, 23, 2], [30, 2], 7, 4, keep_end=True, bos_id=BOS, stats=stats)
    truncate([BOS], [2], [2], 7, 4, keep_end=True, bos_id=BOS, stats=stats)
    assert (stats.prompts, stats.responses) == (3, 3)


# --- tokenize_pairs with the built-in byte tokenizer ---------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def test_tokenize_pairs_special_tokens(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    pairs = [
        {"prompt": "sort 31:", "chosen": " 13", "rejected": " 31"},
        {"prompt": "Hi", "chosen": " yes!", "rejected": ""},
    ]
    out, stats = tokenize_pairs(pairs, tokenizer, max_length=64, max_prompt_length=32)
    assert len(out) == 2 and (stats.prompts, stats.responses) == (0, 0)
    first = out[0]
    # One token per byte: BOS + 8 prompt bytes; 3 response bytes + EOS.
    assert first["prompt_ids"][0] == 1 and len(first["prompt_ids"]) == 1 + len("sort 31:")
    assert first["chosen_ids"][-1] == 2 and first["rejected_ids"][-1] == 2
    assert len(first["chosen_ids"]) == len(first["rejected_ids"]) == 4
    for t in out:
        assert 1 not in t["chosen_ids"] and 1 not in t["rejected_ids"], "no BOS inside responses"
        assert t["prompt_ids"].count(1) == 1 and 2 not in t["prompt_ids"]
    assert tokenizer.decode(first["prompt_ids"][1:]) == "sort 31:"
    assert tokenizer.decode(first["chosen_ids"][:-1]) == " 13"
    assert out[1]["rejected_ids"] == [2], "an empty response is just EOS"


def test_tokenize_pairs_truncates(tokenizer):
    pairs = [{"prompt": "abcdefghij", "chosen": "xyz", "rejected": "uv"}]  # prompt 11 ids, responses 4 and 3
    out, stats = tokenize_pairs(pairs, tokenizer, max_length=10, max_prompt_length=6)
    t = out[0]
    assert t["prompt_ids"][0] == 1 and tokenizer.decode(t["prompt_ids"][1:]) == "fghij"  # keep_end + BOS
    assert len(t["chosen_ids"]) == 4 and (stats.prompts, stats.responses) == (1, 0)
    out, _ = tokenize_pairs(pairs, tokenizer, max_length=10, max_prompt_length=6, truncation_mode="keep_start")
    assert tokenizer.decode(out[0]["prompt_ids"][1:]) == "abcde"


def test_tokenize_pairs_empty(tokenizer):
    out, stats = tokenize_pairs([], tokenizer, 16, 8)
    assert out == [] and (stats.prompts, stats.responses) == (0, 0)


# --- HH-RLHF rows ---------------------------------------------------------------------------------

H, A = "\n\nHuman: ", "\n\nAssistant:"


def test_split_pair_single_turn():
    pair = hh.split_pair(H + "Hi there" + A + " Hello! How can I help?", H + "Hi there" + A + " Go away.")
    assert pair == {"prompt": H + "Hi there" + A, "chosen": " Hello! How can I help?", "rejected": " Go away."}


def test_split_pair_multi_turn_keeps_earlier_turns():
    history = H + "Name a fruit." + A + " An apple." + H + "Another one?" + A
    pair = hh.split_pair(history + " A pear.", history + " No.")
    assert pair == {"prompt": history, "chosen": " A pear.", "rejected": " No."}
    assert pair["prompt"].count(A) == 2


@pytest.mark.parametrize(
    "chosen, rejected",
    [
        pytest.param(H + "Hi" + A + " Hello.", H + "Hi" + A, id="empty-rejected"),
        pytest.param(H + "Hi" + A + " Hello.", H + "Hi" + A + "  \n ", id="whitespace-rejected"),
        pytest.param(H + "Hi" + A + " \n", H + "Hi" + A + " Hello.", id="whitespace-chosen"),
        pytest.param(
            H + "Hi" + A + " Hey." + H + "Joke?" + A + " Sure: ...",
            H + "Hi" + A + " Yo!!" + H + "Joke?" + A + " No.",
            id="differ-before-last-turn-same-length",
        ),
        pytest.param(
            H + "Hi" + A + " Hey." + H + "Joke?" + A + " Sure: ...",
            H + "Hi" + A + " Whatever you want." + H + "Joke?" + A + " No.",
            id="differ-before-last-turn",
        ),
        pytest.param(
            H + "Hi" + A + " Hello.", H + "Hi" + A + " Hello." + H + "And?" + A + " Nothing.", id="rejected-extra-turn"
        ),
        pytest.param(
            H + "Hi" + A + " Hello." + H + "And?" + A + " More.", H + "Hi" + A + " Hello.", id="chosen-extra-turn"
        ),
        pytest.param(H + "Hi. Hello.", H + "Hi. Bye.", id="no-assistant-turn"),
    ],
)
def test_split_pair_unsplittable_rows_give_the_reason(chosen, rejected, request):
    case = request.node.callspec.id
    expected = (
        hh.NO_TURN
        if case == "no-assistant-turn"
        else hh.EMPTY
        if "space" in case or "empty" in case
        else hh.DIFFERENT_PROMPTS
    )
    assert hh.split_pair(chosen, rejected) == expected


# --- load_pairs on a local HH file -----------------------------------------------------------------


def hh_config(path, **kwargs):
    return data_config(format="hh", path=str(path), **kwargs)


def fixture_pairs() -> list[dict[str, str]]:
    with open(HH_SAMPLE) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == HH_ROWS
    return [p for p in (hh.normalize(r) for r in rows) if not isinstance(p, str)]


def key(pair: dict[str, str]) -> tuple[str, str, str]:
    return pair["prompt"], pair["chosen"], pair["rejected"]


def test_hh_fixture_counts():
    pairs = fixture_pairs()
    assert len(pairs) == HH_USABLE
    assert sum(p["prompt"].count(A) == 2 for p in pairs) == 2, "two multi-turn rows"


def test_load_pairs_counts_and_holdout():
    out = load_pairs(hh_config(HH_SAMPLE, eval_holdout=3), seed=0)
    assert out.dropped == {"train": {hh.EMPTY: 1, hh.DIFFERENT_PROMPTS: 1}}
    assert sum(out.dropped["train"].values()) == HH_ROWS - HH_USABLE
    assert (len(out.train), len(out.eval)) == (HH_USABLE - 3, 3)
    train, evals = {key(p) for p in out.train}, {key(p) for p in out.eval}
    assert not train & evals, "held-out pairs are removed from training"
    assert train | evals == {key(p) for p in fixture_pairs()}


def test_load_pairs_holdout_is_seeded():
    a = load_pairs(hh_config(HH_SAMPLE, eval_holdout=3), seed=0)
    b = load_pairs(hh_config(HH_SAMPLE, eval_holdout=3), seed=0)
    assert a.train == b.train and a.eval == b.eval
    others = [load_pairs(hh_config(HH_SAMPLE, eval_holdout=3), seed=s).eval for s in (1, 2, 3)]
    assert any(e != a.eval for e in others), "the held-out set depends on the seed"


def test_load_pairs_holdout_limits():
    out = load_pairs(hh_config(HH_SAMPLE, eval_holdout=0), seed=0)
    assert (len(out.train), len(out.eval)) == (HH_USABLE, 0)
    # At most half the pairs are held out, so a tiny file still trains.
    out = load_pairs(hh_config(HH_SAMPLE, eval_holdout=1000), seed=0)
    assert (len(out.train), len(out.eval)) == (HH_USABLE // 2, HH_USABLE // 2)


def test_load_pairs_max_pairs():
    out = load_pairs(hh_config(HH_SAMPLE, eval_holdout=4, max_train_pairs=2, max_eval_pairs=3), seed=0)
    full = load_pairs(hh_config(HH_SAMPLE, eval_holdout=4), seed=0)
    assert (len(out.train), len(out.eval)) == (2, 3)
    # A seeded sample (see test_data_loading.py), kept in the order of the full sets.
    assert out.train == [p for p in full.train if p in out.train]
    assert out.eval == [p for p in full.eval if p in out.eval]


def test_load_pairs_eval_path(tmp_path):
    eval_file = tmp_path / "eval.jsonl"
    with open(HH_SAMPLE) as src, open(eval_file, "w") as dst:
        dst.writelines(src.readlines()[-4:])  # the last 4 rows: 2 usable, 2 dropped
    out = load_pairs(hh_config(HH_SAMPLE, eval_path=str(eval_file), eval_holdout=3), seed=0)
    assert len(out.train) == HH_USABLE, "with eval_path nothing is held out of training"
    assert len(out.eval) == 2
    assert out.dropped == {
        "train": {hh.EMPTY: 1, hh.DIFFERENT_PROMPTS: 1},
        "eval": {hh.EMPTY: 1, hh.DIFFERENT_PROMPTS: 1},
    }


def test_load_pairs_gzipped(tmp_path):
    gz = tmp_path / "train.jsonl.gz"
    with open(HH_SAMPLE, "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    plain = load_pairs(hh_config(HH_SAMPLE, eval_holdout=2), seed=0)
    zipped = load_pairs(hh_config(gz, eval_holdout=2), seed=0)
    assert zipped.train == plain.train and zipped.eval == plain.eval
    assert zipped.dropped == plain.dropped


def test_load_pairs_missing_file(tmp_path):
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(DataError, match="nope/train.jsonl"):
        load_pairs(hh_config(missing), seed=0)


def test_load_pairs_wrong_keys(tmp_path):
    bad = tmp_path / "qa.jsonl"
    bad.write_text('{"question": "Why?", "answer": "Because."}\n{"question": "How?", "answer": "Thus."}\n')
    with pytest.raises(DataError, match="line 1: fields 'chosen' and 'rejected' are missing"):
        load_pairs(hh_config(bad), seed=0)


def test_load_pairs_nothing_usable(tmp_path):
    bad = tmp_path / "empty_responses.jsonl"
    bad.write_text(json.dumps({"chosen": H + "Hi" + A, "rejected": H + "Hi" + A + " Hello."}) + "\n")
    with pytest.raises(DataError, match="no usable training pairs"):
        load_pairs(hh_config(bad), seed=0)


# --- the synthetic task -------------------------------------------------------------------------------


def test_synthetic_pairs_are_sorting_preferences():
    pairs = synthetic.make_pairs(400, seed=0, min_digits=3, max_digits=8)
    assert len(pairs) == 400
    kinds = {"misordered": 0, "miscopied": 0}
    for p in pairs:
        assert p["prompt"].startswith("sort ") and p["prompt"].endswith(":")
        digits = p["prompt"][len("sort ") : -1]
        chosen, rejected = p["chosen"].lstrip(" "), p["rejected"].lstrip(" ")
        assert p["chosen"] == " " + chosen and p["rejected"] == " " + rejected
        assert 3 <= len(digits) <= 8 and digits.isdigit()
        assert chosen == "".join(sorted(digits))
        assert len(rejected) == len(chosen) and rejected != chosen
        differing = sum(a != b for a, b in zip(chosen, rejected, strict=True))
        if sorted(rejected) == sorted(digits):  # same digits: two unequal ones swapped
            assert differing == 2
            kinds["misordered"] += 1
        else:  # one digit replaced, order kept
            assert differing == 1 and list(rejected) == sorted(rejected)
            kinds["miscopied"] += 1
    assert min(kinds.values()) > 150, kinds  # about half each


def test_synthetic_deterministic():
    assert synthetic.make_pairs(50, 7, 3, 8) == synthetic.make_pairs(50, 7, 3, 8)
    assert synthetic.make_pairs(50, 7, 3, 8) != synthetic.make_pairs(50, 8, 3, 8)


def test_synthetic_load_keeps_eval_prompts_out_of_train():
    # Short strings make collisions between two random streams likely: 1,080 possible prompts.
    task = synthetic.Synthetic(num_train=400, num_eval=150, min_digits=2, max_digits=3)
    train, evals = task.generate(seed=5)
    assert (len(train), len(evals)) == (400, 150)
    train_prompts = {p["prompt"] for p in train}
    assert not train_prompts & {p["prompt"] for p in evals}
    unfiltered = synthetic.make_pairs(150, seed=99, min_digits=2, max_digits=3)
    assert train_prompts & {p["prompt"] for p in unfiltered}, "the domain is small enough for the check to bite"
    assert task.generate(seed=5) == (train, evals)


def test_load_pairs_synthetic_respects_max_pairs():
    """data.max_train_pairs / max_eval_pairs cap the synthetic task too (conf/data/synthetic.yaml
    documents them); they used to be ignored for format=synthetic."""
    spec = synthetic.Synthetic(num_train=40, num_eval=10)
    full = load_pairs(data_config(format=spec, max_eval_pairs=None), seed=3)
    assert (len(full.train), len(full.eval)) == (40, 10)
    capped = data_config(format=spec, max_train_pairs=25, max_eval_pairs=4)
    out = load_pairs(capped, seed=3)
    assert (len(out.train), len(out.eval)) == (25, 4)
    assert out.train == [p for p in full.train if p in out.train]
    assert out.eval == [p for p in full.eval if p in out.eval]


# --- batch order ------------------------------------------------------------------------------------------


def test_step_indices_permutation_per_epoch():
    n, batch, seed = 20, 6, 3  # 3 full batches per epoch, 2 pairs left out each epoch
    assert batching.steps_per_epoch(n, batch) == 3
    for epoch in range(3):
        steps = [batching.step_indices(epoch * 3 + s, n, batch, seed) for s in range(3)]
        seen = [i for s in steps for i in s]
        assert all(len(s) == batch for s in steps)
        assert len(seen) == len(set(seen)) == 18, "no pair twice within an epoch"
        assert set(seen) <= set(range(n))
    epoch0 = [batching.step_indices(s, n, batch, seed) for s in range(3)]
    epoch1 = [batching.step_indices(s, n, batch, seed) for s in range(3, 6)]
    assert epoch0 != epoch1, "each epoch has its own order"


def test_step_indices_deterministic():
    a = [batching.step_indices(s, 50, 8, seed=1) for s in range(12)]
    # Resuming at step 7 needs no state: the same call gives the same batch.
    assert batching.step_indices(7, 50, 8, seed=1) == a[7]
    assert a == [batching.step_indices(s, 50, 8, seed=1) for s in range(12)]
    assert a != [batching.step_indices(s, 50, 8, seed=2) for s in range(12)]
    assert batching.position(13, 50, 8) == (2, 1)


def test_micro_batches_cover_global_batch():
    indices = batching.step_indices(0, 40, 8, seed=0)
    rank0 = batching.micro_batches(indices, rank=0, world_size=2, micro_batch_size=2)
    rank1 = batching.micro_batches(indices, rank=1, world_size=2, micro_batch_size=2)
    assert [len(m) for m in rank0] == [len(m) for m in rank1] == [2, 2]
    assert [i for m in rank0 + rank1 for i in m] == indices
    single = batching.micro_batches(indices, rank=0, world_size=1, micro_batch_size=4)
    assert single == [indices[:4], indices[4:]]


def test_eval_batches_cover_every_index_once():
    n = 7
    per_rank = [batching.eval_batches(n, rank=r, world_size=2, micro_batch_size=2) for r in range(2)]
    assert per_rank[0] == [[0, 2], [4, 6]]
    assert per_rank[1] == [[1, 3], [5]]
    for world in (1, 2, 3):
        seen = [i for r in range(world) for m in batching.eval_batches(n, r, world, 2) for i in m]
        assert sorted(seen) == list(range(n))


def test_synthetic_small_prompt_space_is_an_error_not_a_hang():
    from dpo_cli.errors import DataError

    with pytest.raises(DataError, match="data.format: could not draw 50 pairs"):
        synthetic.Synthetic(num_train=2000, num_eval=50, min_digits=2, max_digits=2).generate(seed=0)
