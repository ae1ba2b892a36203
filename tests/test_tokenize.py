"""Text -> token ids: responses tokenized in context, truncation as documented, degenerate pairs dropped."""

from __future__ import annotations

import doctest

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from dpo_cli.batch import CHOSEN, REJECTED
from dpo_cli.data.formats import synthetic
from dpo_cli.data.tokenize import (
    IDENTICAL,
    IDENTICAL_AFTER_TRUNCATION,
    NO_COMPLETION_TOKENS,
    NO_RESPONSE_TOKENS,
    TruncationStats,
    check_kept,
    fingerprint,
    responses_by_role,
    tokenize_pairs,
    truncate,
)
from dpo_cli.errors import DataError
from dpo_cli.modeling import byte_tokenizer

# --- a SentencePiece-like tokenizer, built here ---------------------------------------------------

UNK, BOS, EOS, PAD = 0, 1, 2, 3
# Like Llama-2's vocabulary: words carry a leading "▁", digits are single pieces without one, and
# "▁" alone is a piece (Llama's id 29871). "▁QA" exists so that "Q" + "A" merges across a boundary.
PIECES = ["▁", "▁Q", "▁A", "▁QA", "▁Sure", "▁hi", "▁no", ":", "=", "+", *"0123456789", *"SureQAhino"]


def sentencepiece_like(append_eos: bool = False) -> PreTrainedTokenizerFast:
    """A Unigram model behind a Metaspace pre-tokenizer that prepends "▁" to every text it is
    given, as the legacy Llama-2 / Mistral v0.1 tokenizers do; BOS first (and EOS last if asked)."""
    vocab = [(t, 0.0) for t in ("<unk>", "<s>", "</s>", "<pad>")]
    vocab += [(p, -5.0 if len(p) == 1 else -1.0) for p in PIECES]  # longer pieces win
    tok = Tokenizer(models.Unigram(vocab, unk_id=UNK, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    single = "<s> $A </s>" if append_eos else "<s> $A"
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("<s>", BOS), ("</s>", EOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@pytest.fixture(scope="module")
def sp():
    return sentencepiece_like()


def ids(tokenizer, text: str, special: bool = True) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def test_sentencepiece_like_puts_a_stray_piece_before_a_response_tokenized_alone(sp):
    """The defect's premise: "13" after "2+11=" is ["1", "3"] in the text the model sees, but
    ["▁", "1", "3"] when tokenized on its own: a token that never occurs at inference."""
    space = sp.convert_tokens_to_ids("▁")
    whole = ids(sp, "2+11=13")
    assert sp.convert_ids_to_tokens(whole) == ["<s>", "▁", "2", "+", "1", "1", "=", "1", "3"]
    assert sp.convert_ids_to_tokens(ids(sp, "13", special=False)) == ["▁", "1", "3"]
    assert whole[: len(ids(sp, "2+11="))] == ids(sp, "2+11="), "the prompt's ids are a prefix of the whole's"
    assert space not in whole[len(ids(sp, "2+11=")) :]


def test_response_ids_are_the_whole_texts_ids_after_the_prompts(sp):
    pairs = [
        {"prompt": "2+11=", "chosen": "13", "rejected": "211"},
        {"prompt": "Q: hi", "chosen": " Sure", "rejected": " no"},
    ]
    out, stats = tokenize_pairs(pairs, sp, max_length=64, max_prompt_length=32)
    assert len(out) == 2
    space = sp.convert_tokens_to_ids("▁")
    for pair, t in zip(pairs, out, strict=True):
        assert t["prompt_ids"] == ids(sp, pair["prompt"])
        for side in ("chosen", "rejected"):
            response = t[f"{side}_ids"]
            assert response[-1] == EOS
            assert t["prompt_ids"] + response[:-1] == ids(sp, pair["prompt"] + pair[side])
    first = out[0]
    assert sp.convert_ids_to_tokens(first["chosen_ids"]) == ["1", "3", "</s>"]
    assert first["chosen_ids"][0] != space and first["rejected_ids"][0] != space, "no stray '▁'"
    assert stats.boundary_fallbacks == 0 and stats.dropped == {}


def test_unpaired_completion_ids_are_the_whole_texts_ids_after_the_prompts(sp):
    """A desirable completion becomes the example's CHOSEN response, an undesirable one its
    REJECTED response: the same keys as a pair's, the other role holding no ids."""
    rows = [
        {"prompt": "2+11=", "completion": "13", "label": True},
        {"prompt": "2+2=", "completion": "5", "label": False},
    ]
    out, stats = tokenize_pairs(rows, sp, max_length=64, max_prompt_length=32)
    assert [sorted(t) for t in out] == [["chosen_ids", "prompt_ids", "rejected_ids"]] * 2
    assert [list(responses_by_role(t)) for t in out] == [[CHOSEN], [REJECTED]]
    assert out[0]["rejected_ids"] == [] and out[1]["chosen_ids"] == []
    for row, t in zip(rows, out, strict=True):
        (completion,) = responses_by_role(t).values()
        assert t["prompt_ids"] + completion == ids(sp, row["prompt"] + row["completion"]) + [EOS]
    assert sp.convert_ids_to_tokens(out[0]["chosen_ids"]) == ["1", "3", "</s>"]
    assert stats.boundary_fallbacks == 0


def test_a_merge_across_the_boundary_falls_back_to_the_response_alone(sp):
    """The text "QA" is one piece "▁QA", so it does not start with the prompt's ids ["▁Q"]:
    that response is tokenized alone (["▁A"]) and counted; the other side and the prompt are not
    affected, and both sides share the prompt's ids."""
    assert ids(sp, "QA") == [BOS, sp.convert_tokens_to_ids("▁QA")]
    out, stats = tokenize_pairs([{"prompt": "Q", "chosen": "A", "rejected": " hi"}], sp, 64, 32)
    t = out[0]
    assert t["prompt_ids"] == ids(sp, "Q")
    assert sp.convert_ids_to_tokens(t["chosen_ids"]) == ["▁A", "</s>"]
    assert t["prompt_ids"] + t["rejected_ids"] == ids(sp, "Q hi") + [EOS]
    assert stats.boundary_fallbacks == 1


def test_a_tokenizer_that_appends_eos_itself_gets_no_second_one():
    """The whole "<s> 2+11=13 </s>" is what the model sees: the prompt is "<s> 2+11=" (not
    "<s> 2+11= </s>"), and the response ends with the tokenizer's own EOS, once."""
    tok = sentencepiece_like(append_eos=True)
    out, stats = tokenize_pairs([{"prompt": "2+11=", "chosen": "13", "rejected": "211"}], tok, 64, 32)
    t = out[0]
    assert t["prompt_ids"] + t["chosen_ids"] == ids(tok, "2+11=13")
    assert t["prompt_ids"] + t["rejected_ids"] == ids(tok, "2+11=211")
    assert t["prompt_ids"][-1] != EOS and t["chosen_ids"].count(EOS) == 1
    assert stats.boundary_fallbacks == 0


# --- the byte-level tokenizer: nothing moves ---------------------------------------------------------


def separately(pairs, tokenizer, max_length, max_prompt_length):
    """The previous way: prompt with special tokens, each response alone + EOS, then truncate."""
    out = []
    for p in pairs:
        prompt = ids(tokenizer, p["prompt"])
        chosen = ids(tokenizer, p["chosen"], special=False) + [tokenizer.eos_token_id]
        rejected = ids(tokenizer, p["rejected"], special=False) + [tokenizer.eos_token_id]
        out.append(truncate(prompt, chosen, rejected, max_length, max_prompt_length, True, tokenizer.bos_token_id))
    return out


def test_byte_level_tokens_are_unchanged():
    """Byte-level: every byte is one token whatever surrounds it, so in context == alone, and
    the built-in task's data (hence its fingerprint and numbers) is what it was."""
    tok = byte_tokenizer()
    H, A = "\n\nHuman: ", "\n\nAssistant:"
    pairs = synthetic.make_pairs(200, seed=0, min_digits=2, max_digits=8) + [
        {"prompt": H + "Hi" + A, "chosen": " Héllo ✓ 日本", "rejected": " Go away.\n"},
        {"prompt": H + "Fruit?" + A + " Apple." + H + "More?" + A, "chosen": " Pear.", "rejected": " No."},
        {"prompt": "ends with a space ", "chosen": "x", "rejected": " y"},
    ]
    out, stats = tokenize_pairs(pairs, tok, 32, 16)  # the built-in task's lengths
    expected = separately(pairs, tok, 32, 16)
    assert out == expected and fingerprint(out) == fingerprint(expected)
    assert stats.boundary_fallbacks == 0 and stats.dropped == {}
    # Cut short, some pairs become identical and are dropped; the rest is as before.
    out, stats = tokenize_pairs(pairs, tok, 12, 8)
    kept = [t for t in separately(pairs, tok, 12, 8) if t["chosen_ids"] != t["rejected_ids"]]
    assert out == kept and stats.dropped == {IDENTICAL_AFTER_TRUNCATION: len(pairs) - len(kept)} != {}
    assert stats.boundary_fallbacks == 0


# --- truncate: what its docstring says -----------------------------------------------------------


def test_truncate_docstring_examples_hold():
    """The docstring's examples are run, so the rule it states is the rule the code follows."""
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(truncate, "truncate", globs={"truncate": truncate}) if t.examples]
    assert tests, "truncate's docstring has no example"
    for t in tests:
        runner.run(t)
    assert runner.failures == 0 and runner.tries >= 2


def test_truncate_gives_responses_what_the_prompt_leaves():
    """Where the rules differ: a 3-token prompt (within max_prompt_length=6) and 8-token
    responses, max_length=10. The original DPO code would cut the responses to
    max_length - max_prompt_length = 4; here they get the 10 - 3 = 7 tokens the prompt leaves,
    and the prompt is not cut at all."""
    stats = TruncationStats()
    prompt, chosen, rejected = [BOS, 10, 11], list(range(20, 28)), list(range(30, 38))
    out = truncate(prompt, chosen, rejected, 10, 6, keep_end=True, bos_id=BOS, stats=stats)
    assert out == {"prompt_ids": prompt, "chosen_ids": chosen[:7], "rejected_ids": rejected[:7]}
    assert (stats.prompts, stats.responses) == (0, 1)


def test_truncate_cuts_a_long_prompt_only_when_the_pair_is_too_long():
    """A 9-token prompt with max_prompt_length=4 stays whole when the pair fits in max_length."""
    prompt = [BOS, *range(10, 18)]
    assert truncate(prompt, [20, EOS], [30, EOS], 11, 4, True, BOS)["prompt_ids"] == prompt
    out = truncate(prompt, [20, 21, 22, 23, EOS], [30, EOS], 11, 4, True, BOS)
    assert out["prompt_ids"] == [BOS, 15, 16, 17] and out["chosen_ids"] == [20, 21, 22, 23, EOS]


# --- degenerate pairs are dropped, by reason -------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_identical_chosen_and_rejected_are_dropped(tok):
    pairs = [
        {"prompt": "a:", "chosen": " x", "rejected": " x"},
        {"prompt": "b:", "chosen": " x", "rejected": " y"},
        {"prompt": "c:", "chosen": "", "rejected": ""},
    ]
    out, stats = tokenize_pairs(pairs, tok, 64, 32)
    assert [tok.decode(t["prompt_ids"][1:]) for t in out] == ["b:"]
    assert stats.dropped == {IDENTICAL: 2}


def test_pairs_identical_after_truncation_are_dropped(tok):
    """max_length=5 leaves one response token: " " for every pair of the sorting task, which
    would train at loss log 2 forever."""
    pairs = synthetic.make_pairs(20, seed=0, min_digits=3, max_digits=6)
    out, stats = tokenize_pairs(pairs, tok, max_length=5, max_prompt_length=4)
    assert out == [] and stats.dropped == {IDENTICAL_AFTER_TRUNCATION: 20}
    assert stats.responses == 20, "truncation is still counted"
    # With room for the digits, they differ and are kept.
    out, stats = tokenize_pairs(pairs, tok, max_length=32, max_prompt_length=16)
    assert len(out) == 20 and stats.dropped == {}


def test_pairs_with_no_response_tokens_after_truncation_are_dropped(tok):
    """A prompt that fills max_length (possible when max_prompt_length >= max_length, which the
    config refuses, but tokenize_pairs can be called directly) leaves the responses nothing."""
    pairs = [{"prompt": "1234567", "chosen": " a", "rejected": " b"}, {"prompt": "1", "chosen": " a", "rejected": " b"}]
    out, stats = tokenize_pairs(pairs, tok, max_length=8, max_prompt_length=8)
    assert len(out) == 1 and tok.decode(out[0]["prompt_ids"][1:]) == "1"
    assert stats.dropped == {NO_RESPONSE_TOKENS: 1}


def test_unpaired_examples_with_no_completion_tokens_are_dropped(tok):
    rows = [
        {"prompt": "1234567", "completion": " a", "label": True},
        {"prompt": "1", "completion": " a", "label": False},
    ]
    out, stats = tokenize_pairs(rows, tok, max_length=8, max_prompt_length=8)
    assert [list(responses_by_role(t)) for t in out] == [[REJECTED]] and stats.dropped == {NO_COMPLETION_TOKENS: 1}


def test_dropped_counts_add_up_over_reasons(tok):
    pairs = [
        {"prompt": "p", "chosen": " same", "rejected": " same"},
        {"prompt": "p", "chosen": " abcd", "rejected": " abce"},  # differ in the 5th token: cut to 4
        {"prompt": "p", "chosen": " a", "rejected": " b"},
    ]
    out, stats = tokenize_pairs(pairs, tok, max_length=6, max_prompt_length=2)
    assert len(out) == 1 and stats.dropped == {IDENTICAL: 1, IDENTICAL_AFTER_TRUNCATION: 1}


# --- check_kept: refuse mostly degenerate data --------------------------------------------------------


def test_check_kept_refuses_when_more_than_half_is_dropped(tok):
    pairs = synthetic.make_pairs(10, seed=0, min_digits=3, max_digits=6)
    out, stats = tokenize_pairs(pairs, tok, max_length=5, max_prompt_length=4)
    with pytest.raises(DataError) as e:
        check_kept(len(pairs), stats, "training pairs")
    message = str(e.value)
    assert "\n" not in message
    assert "10 of 10 training pairs" in message and f"{IDENTICAL_AFTER_TRUNCATION}: 10" in message
    assert "data.max_length" in message


def test_check_kept_names_every_reason_and_its_fix():
    stats = TruncationStats(dropped={IDENTICAL: 2, NO_RESPONSE_TOKENS: 1})
    with pytest.raises(DataError) as e:
        check_kept(5, stats, "eval pairs")
    message = str(e.value)
    assert "3 of 5 eval pairs" in message and "2 left" in message
    assert f"{IDENTICAL}: 2" in message and f"{NO_RESPONSE_TOKENS}: 1" in message
    assert "data.max_length" in message and "same chosen and rejected" in message


def test_check_kept_accepts_at_most_half_dropped():
    check_kept(4, TruncationStats(dropped={IDENTICAL_AFTER_TRUNCATION: 2}), "training pairs")
    check_kept(3, TruncationStats(), "training pairs")
    check_kept(0, TruncationStats(), "eval pairs")
    with pytest.raises(DataError):
        check_kept(1, TruncationStats(dropped={IDENTICAL: 1}), "training pairs")


def test_a_real_sentencepiece_model_on_the_legacy_path_gets_no_stray_token(tmp_path):
    """A SentencePiece model trained in the test and loaded as a Llama-2 style tokenizer
    (legacy=True): tokenized alone, "13" becomes ["▁", "13"]; after "2+11=" the model sees only
    "13". tokenize_pairs must give the latter."""
    spm = pytest.importorskip("sentencepiece")
    import io
    import json

    from transformers import AutoTokenizer

    lines = ["Human: what is two plus eleven? Assistant: thirteen", "the answer is 13 and 2+11=13"]
    lines = (lines + ["Hello world, this is a test of the tokenizer."]) * 50
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=60, model_type="bpe", minloglevel=2
    )
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True, "add_eos_token": False}
    config.update(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = AutoTokenizer.from_pretrained(tmp_path)
    alone = tok("13", add_special_tokens=False)["input_ids"]
    whole = tok("2+11=13")["input_ids"]
    prompt = tok("2+11=")["input_ids"]
    assert whole[: len(prompt)] == prompt
    assert alone != whole[len(prompt) :], "tokenized alone, the response starts with a piece never seen in context"
    assert tok.convert_ids_to_tokens(alone)[0] == "▁"
    (pair,), _ = tokenize_pairs([{"prompt": "2+11=", "chosen": "13", "rejected": "12"}], tok, 64, 32)
    assert pair["prompt_ids"] == prompt
    assert pair["chosen_ids"] == whole[len(prompt) :] + [tok.eos_token_id]
