"""Conversational data: message-list pairs (pairs, kto, UltraFeedback), rendering with a chat
template built here, the prefix check, and how templated text is tokenized (no second BOS, no EOS
after the template's end of turn)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import data_config

from dpo_cli.data import chat, load_pairs
from dpo_cli.data.fields import RowError
from dpo_cli.data.formats import kto, pairs, ultrafeedback
from dpo_cli.data.tokenize import tokenize_pairs
from dpo_cli.errors import DataError
from dpo_cli.modeling import byte_tokenizer

UF_SAMPLE = Path(__file__).parent / "fixtures" / "ultrafeedback_sample.jsonl"

# ChatML with a leading BOS, as Qwen-style templates write it (written with Jinja's
# trim_blocks/lstrip_blocks, which transformers turns on).
CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Like CHATML, but the last assistant turn opens differently from the generation prompt (as
# templates do that render the final turn apart): the prompt is not a prefix of the whole.
LAST_TURN_APART = (
    "{{ bos_token }}{% for m in messages %}{% if loop.last and m['role'] == 'assistant' %}<|im_start|>final\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Like CHATML, but refusing two turns of the same role in a row, as Llama-2's and Mistral's do.
ALTERNATING = (
    "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
    "{{ raise_exception('Conversation roles must alternate') }}{% endif %}{% endfor %}" + CHATML
)
BOS, EOS = 1, 2


def u(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def a(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def s(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def im(role: str, text: str) -> str:
    return f"<|im_start|>{role}\n{text}<|im_end|>\n"


GEN = "<|im_start|>assistant\n"


@pytest.fixture
def tok():
    t = byte_tokenizer()
    t.chat_template = CHATML
    return t


# --- conversational pairs -------------------------------------------------------------------------


def test_explicit_prompt_messages_and_assistant_replies():
    row = {"prompt": [s("Be brief."), u("Hi")], "chosen": [a("Hello!")], "rejected": [a("Go away.")]}
    assert pairs.normalize(row) == {
        "prompt": [s("Be brief."), u("Hi")],
        "chosen": [a("Hello!")],
        "rejected": [a("Go away.")],
    }


def test_explicit_prompt_repeated_in_the_responses_is_taken_off():
    row = {"prompt": [u("Hi")], "chosen": [u("Hi"), a("Hello!")], "rejected": [u("Hi"), a("Go away.")]}
    assert pairs.normalize(row) == {"prompt": [u("Hi")], "chosen": [a("Hello!")], "rejected": [a("Go away.")]}


def test_implicit_prompt_is_the_shared_messages_with_system_and_earlier_turns():
    head = [s("You count apples."), u("I have 3 apples."), a("Okay."), u("I eat one. How many are left?")]
    row = {"chosen": [*head, a("2")], "rejected": [*head, a("4")]}
    assert pairs.normalize(row) == {"prompt": head, "chosen": [a("2")], "rejected": [a("4")]}


def test_text_prompt_with_message_responses_is_the_users_turn():
    """UltraFeedback's shape: a string prompt, and chosen/rejected that repeat it as the user's
    turn (the shared messages are the prompt) or hold the replies only (the prompt string is
    the user's turn)."""
    whole = {"prompt": "Hi", "chosen": [u("Hi"), a("Hello!")], "rejected": [u("Hi"), a("No.")]}
    replies = {"prompt": "Hi", "chosen": [a("Hello!")], "rejected": [a("No.")]}
    expected = {"prompt": [u("Hi")], "chosen": [a("Hello!")], "rejected": [a("No.")]}
    assert pairs.normalize(whole) == pairs.normalize(replies) == expected


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"chosen": [u("Hi"), a("A")], "rejected": [u("Hey"), a("A")]}, pairs.NO_SHARED_MESSAGES),
        ({"chosen": [u("Hi")], "rejected": [u("Hi"), a("A")]}, pairs.EMPTY_RESPONSE),
        ({"chosen": [u("Hi"), a("A")], "rejected": [u("Hi"), a("A")]}, pairs.IDENTICAL),
        # The dialogues differ before the last assistant turn: the "responses" hold user turns.
        (
            {"chosen": [u("Hi"), a("A"), u("Q"), a("B")], "rejected": [u("Hi"), a("X"), u("Q"), a("B")]},
            pairs.NOT_ASSISTANT,
        ),
        ({"prompt": [u("Hi")], "chosen": [a("A"), u("more")], "rejected": [a("B")]}, pairs.NOT_ASSISTANT),
    ],
    ids=["no-shared-prefix", "empty-response", "identical", "differ-before-last-turn", "user-turn-in-response"],
)
def test_conversational_rows_that_cannot_be_split_give_the_reason(row, reason):
    assert pairs.normalize(row) == reason


@pytest.mark.parametrize(
    "row, field, message",
    [
        ({"chosen": ["Hi"], "rejected": [a("x")]}, "chosen", "message 1 must be a {role, content} object, got str"),
        (
            {"chosen": [u("x")], "rejected": [{"role": "user"}]},
            "rejected",
            "message 1 needs a string 'content', got missing",
        ),
        (
            {"chosen": [u("x"), {"role": "assistant", "content": None}], "rejected": [u("x")]},
            "chosen",
            "got a NoneType",
        ),
        ({"chosen": 3, "rejected": "x"}, "chosen", "must be a string or a list of {role, content} messages, got int"),
        ({"chosen": "x", "rejected": [u("x")]}, "rejected", "must be a string, like field 'chosen'"),
        ({"prompt": [u("x")], "chosen": "a", "rejected": "b"}, "prompt", "must be a string, like field 'chosen'"),
        ({"prompt": 5, "chosen": [a("a")], "rejected": [a("b")]}, "prompt", "got int"),
    ],
)
def test_bad_messages_name_the_field(row, field, message):
    with pytest.raises(RowError) as e:
        pairs.normalize(row)
    assert e.value.field == field and message in str(e.value), str(e.value)


def test_a_bad_message_in_a_file_names_the_line_and_the_field(tmp_path):
    rows = [{"chosen": [u("q"), a(f"good {i}")], "rejected": [u("q"), a("bad")]} for i in range(3)]
    rows.insert(1, {"chosen": [u("q"), {"role": "assistant", "text": "x"}], "rejected": [u("q"), a("bad")]})
    path = tmp_path / "conv.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"line 2: field 'chosen': message 2 needs a string 'content'"):
        load_pairs(data_cfg(format="pairs", path=str(path)), seed=0)


# --- kto ------------------------------------------------------------------------------------------


def test_kto_conversational_examples():
    assert kto.normalize({"prompt": [s("Be kind."), u("Hi")], "completion": [a("Hello!")], "label": True}) == {
        "prompt": [s("Be kind."), u("Hi")],
        "completion": [a("Hello!")],
        "label": True,
    }
    # A text prompt is the user's turn; a completion that repeats the prompt has it taken off.
    assert kto.normalize({"prompt": "Hi", "completion": [u("Hi"), a("Go away.")], "label": False}) == {
        "prompt": [u("Hi")],
        "completion": [a("Go away.")],
        "label": False,
    }
    assert kto.normalize({"prompt": [u("Hi")], "completion": [u("Hi")], "label": True}) == kto.EMPTY
    assert kto.normalize({"prompt": [u("Hi")], "completion": [a("A"), u("B")], "label": True}) == pairs.NOT_ASSISTANT
    with pytest.raises(RowError, match="field 'prompt' must be a string, like field 'completion'"):
        kto.normalize({"prompt": [u("Hi")], "completion": "text", "label": True})


def test_kto_conversational_render_and_tokenize(tok):
    examples = [{"prompt": [u("Hi")], "completion": [a("Yo")], "label": True}]
    rendered, dropped = chat.render(examples, tok, None)
    assert dropped == {}
    assert rendered == [
        {"prompt": "<s>" + im("user", "Hi") + GEN, "completion": "Yo<|im_end|>\n", "label": True, "templated": True}
    ]
    (t,), _ = tokenize_pairs(rendered, tok, max_length=128, max_prompt_length=64)
    assert t["prompt_ids"].count(BOS) == 1 and t["prompt_ids"][0] == BOS
    # A desirable completion is the example's chosen response; it holds no rejected one.
    assert tok.decode(t["chosen_ids"]) == "Yo<|im_end|>\n" and EOS not in t["chosen_ids"]
    assert t["rejected_ids"] == []


# --- rendering ------------------------------------------------------------------------------------


def test_render_exact_strings_single_turn_system_and_multi_turn(tok):
    conv = [
        {"prompt": [u("Hi")], "chosen": [a("Hello!")], "rejected": [a("No.")]},
        {"prompt": [s("Be brief."), u("2+2?")], "chosen": [a("4")], "rejected": [a("5")]},
        {"prompt": [u("I have 3."), a("Okay."), u("Eat one?")], "chosen": [a("2 left")], "rejected": [a("ünï")]},
    ]
    rendered, dropped = chat.render(conv, tok, None)
    assert dropped == {}
    assert rendered == [
        {
            "prompt": "<s>" + im("user", "Hi") + GEN,
            "chosen": "Hello!<|im_end|>\n",
            "rejected": "No.<|im_end|>\n",
            "templated": True,
        },
        {
            "prompt": "<s>" + im("system", "Be brief.") + im("user", "2+2?") + GEN,
            "chosen": "4<|im_end|>\n",
            "rejected": "5<|im_end|>\n",
            "templated": True,
        },
        {
            "prompt": "<s>" + im("user", "I have 3.") + im("assistant", "Okay.") + im("user", "Eat one?") + GEN,
            "chosen": "2 left<|im_end|>\n",
            "rejected": "ünï<|im_end|>\n",
            "templated": True,
        },
    ]


def test_render_passes_text_pairs_through_and_keeps_order(tok):
    text = {"prompt": "Q:", "chosen": " yes", "rejected": " no"}
    conv = {"prompt": [u("Hi")], "chosen": [a("A")], "rejected": [a("B")]}
    rendered, dropped = chat.render([text, conv, text], tok, None)
    assert dropped == {} and rendered[0] is text and rendered[2] is text
    assert rendered[1]["templated"] and "templated" not in text
    assert chat.render([text], byte_tokenizer(), None) == ([text], {}), "text needs no template"


def test_a_given_template_is_used_when_the_tokenizer_has_none():
    conv = [{"prompt": [u("Hi")], "chosen": [a("A")], "rejected": [a("B")]}]
    rendered, _ = chat.render(conv, byte_tokenizer(), CHATML)
    assert rendered[0]["prompt"] == "<s>" + im("user", "Hi") + GEN


def test_no_template_is_an_error_that_says_the_fix():
    conv = [{"prompt": [u("Hi")], "chosen": [a("A")], "rejected": [a("B")]}]
    with pytest.raises(DataError, match=r"the tokenizer has no chat template; set data.chat_template=FILE"):
        chat.render(conv, byte_tokenizer(), None)


def test_a_prompt_that_is_not_a_string_prefix_is_dropped_and_counted(tok):
    conv = [
        {"prompt": [u("Hi")], "chosen": [a("A")], "rejected": [a("B")]},
        {"prompt": [u("Yo")], "chosen": [a("C")], "rejected": [a("D")]},
    ]
    rendered, dropped = chat.render(conv, tok, LAST_TURN_APART)
    assert rendered == [] and dropped == {chat.NOT_A_PREFIX: 2}


def test_a_prompt_that_is_a_string_prefix_but_not_a_token_prefix_is_dropped(tok):
    """With a token for "\\nHello", the prompt's last byte "\\n" merges with the response's first
    word in the whole: the prompt's ids are not the start of the whole's ids."""
    tok.add_tokens(["\nHello"])
    conv = [
        {"prompt": [u("Hi")], "chosen": [a("Hello!")], "rejected": [a("Bye.")]},
        {"prompt": [u("Yo")], "chosen": [a("Fine.")], "rejected": [a("Bye.")]},
        {"prompt": [u("Hey")], "completion": [a("Hello")], "label": True},
    ]
    whole = tok.apply_chat_template([u("Hi"), a("Hello!")], tokenize=False)
    assert whole.startswith(tok.apply_chat_template([u("Hi")], tokenize=False, add_generation_prompt=True))
    rendered, dropped = chat.render(conv, tok, None)
    assert [p["chosen"] for p in rendered] == ["Fine.<|im_end|>\n"] and dropped == {chat.NOT_A_PREFIX: 2}


def test_a_template_that_refuses_the_messages_drops_the_pair_with_its_message(tok):
    conv = [
        {"prompt": [u("Hi"), u("Again")], "chosen": [a("A")], "rejected": [a("B")]},
        {"prompt": [u("Hi")], "chosen": [a("A")], "rejected": [a("B")]},
    ]
    rendered, dropped = chat.render(conv, tok, ALTERNATING)
    assert len(rendered) == 1
    assert dropped == {"the chat template refused the messages: Conversation roles must alternate": 1}


def test_load_template(tmp_path):
    path = tmp_path / "chatml.jinja"
    path.write_text(CHATML + "\n")
    assert chat.load_template(str(path)) == CHATML + "\n"
    with pytest.raises(DataError, match=r"data.chat_template='.*nope.jinja': no such file"):
        chat.load_template(str(tmp_path / "nope.jinja"))
    with pytest.raises(DataError, match=r"is a directory"):
        chat.load_template(str(tmp_path))
    (tmp_path / "empty.jinja").write_text("\n")
    with pytest.raises(DataError, match=r"is empty"):
        chat.load_template(str(tmp_path / "empty.jinja"))
    (tmp_path / "bin.jinja").write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(DataError, match=r"not UTF-8"):
        chat.load_template(str(tmp_path / "bin.jinja"))
    (tmp_path / "bad.jinja").write_text("{{ bos_token }}\n{% for m in messages %}{{ m['content'] }}")
    with pytest.raises(DataError, match=r"bad.jinja'.*syntax error on line 2"):
        chat.load_template(str(tmp_path / "bad.jinja"))


# --- tokenizing templated text --------------------------------------------------------------------


def test_templated_text_gets_no_second_bos_and_no_eos(tok):
    conv = [{"prompt": [u("Hi")], "chosen": [a("Hello!")], "rejected": [a("No.")]}]
    rendered, _ = chat.render(conv, tok, None)
    (t,), stats = tokenize_pairs(rendered, tok, max_length=128, max_prompt_length=64)
    assert t["prompt_ids"][0] == BOS and t["prompt_ids"].count(BOS) == 1, "the template's BOS, once"
    for key, text in (("chosen_ids", "Hello!<|im_end|>\n"), ("rejected_ids", "No.<|im_end|>\n")):
        assert EOS not in t[key] and tok.decode(t[key]) == text, "the template ends the turn; no EOS added"
    assert t["prompt_ids"] + t["chosen_ids"] == tok(rendered[0]["prompt"] + rendered[0]["chosen"])["input_ids"][1:]
    assert stats.boundary_fallbacks == 0
    # The flag does the same for unmarked text; plain text keeps BOS from the tokenizer and EOS.
    unmarked = {k: rendered[0][k] for k in ("prompt", "chosen", "rejected")}
    assert tokenize_pairs([unmarked], tok, 128, 64, templated=True)[0] == [t]
    (plain,), _ = tokenize_pairs([unmarked], tok, 128, 64)
    assert plain["prompt_ids"][:2] == [BOS, BOS] and plain["chosen_ids"][-1] == EOS


def test_text_and_templated_pairs_in_one_call_are_each_tokenized_their_way(tok):
    text = {"prompt": "Q:", "chosen": " yes", "rejected": " no"}
    conv = {"prompt": [u("Hi")], "chosen": [a("A")], "rejected": [a("B")]}
    rendered, _ = chat.render([text, conv, text], tok, None)
    together, _ = tokenize_pairs(rendered, tok, 128, 64)
    apart = [tokenize_pairs([p], tok, 128, 64)[0][0] for p in rendered]
    assert together == apart
    assert together[0]["chosen_ids"][-1] == EOS and together[1]["chosen_ids"][-1] != EOS


def test_render_then_tokenize_reconstructs_the_templated_conversation(tok):
    """A property over seeded random conversations (system turn or not, 1-3 turns, unicode and
    markup-like text): prompt + response is the templated whole conversation, in text and in ids."""
    rng = random.Random(0)
    alphabet = "ab <>|/\n\té漢🙂"

    def text() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))

    for _ in range(100):
        head = [s(text())] if rng.random() < 0.5 else []
        for _ in range(rng.randint(0, 2)):
            head += [u(text()), a(text())]
        head.append(u(text()))
        c, r = a(text()), a(text())
        pair = pairs.normalize({"chosen": [*head, c], "rejected": [*head, r]})
        if c == r:
            assert pair == pairs.IDENTICAL
            continue
        (rendered,), dropped = chat.render([pair], tok, None)
        assert dropped == {}
        for response, msg in (("chosen", c), ("rejected", r)):
            whole = tok.apply_chat_template([*head, msg], tokenize=False)
            assert rendered["prompt"] + rendered[response] == whole
        (t,), _ = tokenize_pairs([rendered], tok, max_length=4096, max_prompt_length=2048)
        whole_ids = tok(tok.apply_chat_template([*head, c], tokenize=False), add_special_tokens=False)["input_ids"]
        assert t["prompt_ids"] + t["chosen_ids"] == whole_ids


# --- UltraFeedback --------------------------------------------------------------------------------


def uf_rows() -> list[dict]:
    return [json.loads(line) for line in UF_SAMPLE.read_text(encoding="utf-8").splitlines()]


def test_ultrafeedback_fixture_is_the_binarized_format():
    for row in uf_rows():
        assert set(row) == {"prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected"}
        assert row["messages"] == row["chosen"] and row["chosen"][-1]["role"] == "assistant"


def test_ultrafeedback_normalize_fixture():
    out = [ultrafeedback.normalize(r) for r in uf_rows()]
    assert out.count(ultrafeedback.TIE) == 1 and sum(isinstance(p, dict) for p in out) == 7
    assert out[0] == {
        "prompt": [u("What is the boiling point of water at sea level?")],
        "chosen": [a("100 °C (212 °F) at standard atmospheric pressure.")],
        "rejected": [a("Water boils at 50 degrees.")],
    }
    assert out[1]["prompt"] == [s("You are a concise assistant. Answer in one line."), u("Name three primary colors.")]
    assert out[2]["prompt"] == [
        u("I have 3 apples."),
        a("Okay, you have 3 apples."),
        u("I eat one. How many are left?"),
    ]
    assert out[2]["chosen"] == [a("You have 2 apples left.")] and out[3]["chosen"] == [a("ありがとう (arigatō) 🙏")]


def test_ultrafeedback_drops_ties_and_reversed_scores_and_checks_types():
    row = {"prompt": "Hi", "chosen": [u("Hi"), a("A")], "rejected": [u("Hi"), a("B")]}
    assert ultrafeedback.normalize({**row, "score_chosen": 5.0, "score_rejected": 5}) == ultrafeedback.TIE
    assert ultrafeedback.normalize({**row, "score_chosen": 2.0, "score_rejected": 5.0}) == ultrafeedback.REVERSED
    with pytest.raises(RowError, match="field 'score_rejected' must be a number, got str"):
        ultrafeedback.normalize({**row, "score_chosen": 5.0, "score_rejected": "4"})
    with pytest.raises(RowError, match="field 'score_chosen' is missing"):
        ultrafeedback.normalize(row)
    with pytest.raises(RowError, match="field 'chosen' must be a list of {role, content} messages, got str"):
        ultrafeedback.normalize({**row, "chosen": "A", "score_chosen": 5.0, "score_rejected": 4.0})


def data_cfg(**overrides):
    return data_config(**{**dict(format="ultrafeedback", train_split="train_prefs", eval_holdout=2), **overrides})


def test_ultrafeedback_file_to_token_ids(tok, monkeypatch):
    """The fixture read as data=ultrafeedback, rendered and tokenized: the tie is dropped when
    reading, every other pair is kept, and each tokenized pair is the templated conversation."""
    loaded = load_pairs(data_cfg(path=str(UF_SAMPLE)), seed=0)
    assert (len(loaded.train), len(loaded.eval)) == (5, 2)
    assert loaded.dropped == {"train": {ultrafeedback.TIE: 1}}
    rendered, dropped = chat.render(loaded.train + loaded.eval, tok, None)
    assert dropped == {} and all(p["templated"] for p in rendered)
    tokenized, stats = tokenize_pairs(rendered, tok, max_length=512, max_prompt_length=256)
    assert len(tokenized) == 7 and stats.dropped == {} and (stats.prompts, stats.responses) == (0, 0)
    for p, t in zip(rendered, tokenized, strict=True):
        assert t["prompt_ids"].count(BOS) == 1 and EOS not in t["chosen_ids"] + t["rejected_ids"]
        assert tok.decode(t["prompt_ids"] + t["chosen_ids"]) == p["prompt"] + p["chosen"]


def test_roles_a_template_does_not_know_are_named_with_the_row_and_field(tmp_path):
    """`human`/`bot` were blamed on the chat template ("the chat template refused the messages")."""
    from dpo_cli.data import load_pairs
    from dpo_cli.errors import DataError

    rows = [
        {"chosen": [u("hi"), a("yo")], "rejected": [u("hi"), a("no")]},
        {"chosen": [{"role": "human", "content": "hi"}, {"role": "bot", "content": "yo"}], "rejected": [u("x")]},
    ]
    path = tmp_path / "roles.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as e:
        load_pairs(data_config(format="pairs", path=str(path), eval_holdout=0), 0)
    msg = str(e.value)
    assert "line 2: field 'chosen': message 1 has role 'human'; the roles are system, user, assistant" in msg, msg
    assert "chat template" not in msg
