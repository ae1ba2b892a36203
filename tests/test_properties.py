"""Property-based tests (hypothesis) of the splitters and of tokenization: they never crash on
arbitrary text, and prompt + response always gives back the original text."""

from __future__ import annotations

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dpo_cli.data.fields import RowError
from dpo_cli.data.formats import hh, pairs, shp
from dpo_cli.data.tokenize import tokenize_pairs
from dpo_cli.modeling import byte_tokenizer

# Text that often contains the markers the splitters look for.
pieces = st.sampled_from(["\n\nHuman:", "\n\nAssistant:", " ", "\n", "a", "b", "é", "猫", "🐱", ":", "\n\n"])
texts = st.lists(st.one_of(pieces, st.text(max_size=5)), max_size=12).map("".join)
TOKENIZER = byte_tokenizer()


@settings(max_examples=300, deadline=None)
@given(prefix=texts, chosen=texts, rejected=texts)
def test_hh_split_reconstructs_both_dialogues(prefix, chosen, rejected):
    a, b = prefix + chosen, prefix + rejected
    out = hh.split_pair(a, b)
    if isinstance(out, str):
        assert out in (hh.NO_TURN, hh.EMPTY, hh.DIFFERENT_PROMPTS)
    else:
        assert out["prompt"] + out["chosen"] == a and out["prompt"] + out["rejected"] == b
        assert out["prompt"].endswith(hh.ASSISTANT) and out["chosen"].strip() and out["rejected"].strip()


@settings(max_examples=300, deadline=None)
@given(prefix=texts, chosen=texts, rejected=texts)
def test_implicit_prompt_reconstructs_both_texts(prefix, chosen, rejected):
    a, b = prefix + chosen, prefix + rejected
    out = pairs.split_implicit(a, b)
    if not isinstance(out, str):
        assert out["prompt"] + out["chosen"] == a and out["prompt"] + out["rejected"] == b
        assert out["prompt"]


@settings(max_examples=200, deadline=None)
@given(
    history=texts, a=texts, b=texts, score_a=st.integers(-3, 50), score_b=st.integers(-3, 50), label=st.integers(0, 1)
)
def test_shp_never_crashes_and_reconstructs(history, a, b, score_a, score_b, label):
    row = {
        "post_id": "p",
        "history": history,
        "human_ref_A": a,
        "human_ref_B": b,
        "score_A": score_a,
        "score_B": score_b,
        "labels": label,
    }
    try:
        out = shp.normalize(row)
    except RowError:
        return
    if not isinstance(out, str):
        chosen, rejected = (a, b) if label == 1 else (b, a)
        assert out["prompt"] + out["chosen"] == "\n\nHuman: " + history + "\n\nAssistant: " + chosen
        assert out["prompt"] + out["rejected"] == "\n\nHuman: " + history + "\n\nAssistant: " + rejected


@settings(max_examples=200, deadline=None)
@given(prompt=texts, chosen=texts, rejected=texts)
def test_tokenized_pair_decodes_to_its_text(prompt, chosen, rejected):
    """With the byte-level tokenizer, prompt ids + response ids decode to prompt + response.
    (Text that spells a special token, e.g. "<s>", is parsed as that token, as by TRL and
    every Hugging Face tokenizer by default; such text is left out here.)"""
    assume(not any(tok in t for t in (prompt, chosen, rejected) for tok in TOKENIZER.all_special_tokens))
    ids, _ = tokenize_pairs([{"prompt": prompt, "chosen": chosen, "rejected": rejected}], TOKENIZER, 10_000, 5_000)
    for pair in ids:
        for side, text in (("chosen_ids", chosen), ("rejected_ids", rejected)):
            decoded = TOKENIZER.decode(pair["prompt_ids"] + pair[side], skip_special_tokens=True)
            assert decoded == prompt + text
