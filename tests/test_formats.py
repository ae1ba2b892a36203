"""Row formats: TL;DR comparisons and SHP rows -> pairs (exact strings from fixtures in the real
formats), and properties of every splitter on random input: none crashes, and whenever one
returns a pair, prompt + response gives back the original text.

The properties use a seeded random generator (500 cases each) rather than hypothesis, which is
not a dependency of this project: the cases are the same on every run, and a failure prints the
case.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import data_config

from dpo_cli.data import load_pairs
from dpo_cli.data.fields import RowError
from dpo_cli.data.formats import hh, pairs, shp, tldr
from dpo_cli.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures"
TLDR_SAMPLE = FIXTURES / "tldr_sample.jsonl"
SHP_SAMPLE = FIXTURES / "shp_sample.jsonl"
CASES = 500


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- TL;DR ---------------------------------------------------------------------------------


def test_tldr_fixture_exact_pairs():
    """8 rows: 6 post rows, 1 article row (post null), 1 whose summaries differ only in white space."""
    out = [tldr.normalize(r) for r in _rows(TLDR_SAMPLE)]
    assert out[0] == {
        "prompt": "SUBREDDIT: r/relationships\n\nTITLE: Roommate eats my labeled food\n\nPOST: My roommate keeps "
        "eating my food even after I labeled it. I asked nicely twice. What should I do next?\n\nTL;DR:",
        "chosen": " Roommate eats my food despite labels and two polite requests; what now?",
        "rejected": " I like food.",  # the source's trailing newline is stripped
    }
    assert out[1] == {  # choice 1: the second summary is chosen; the post keeps its paragraphs
        "prompt": "SUBREDDIT: r/running\n\nTITLE: Knee pain after 5k runs\n\nPOST: I've been running for three "
        "months.\n\nMy knees hurt after every run longer than 5k. I bought new shoes but nothing changed.\n\nTL;DR:",
        "chosen": " Knees hurt after runs over 5k for three months, new shoes didn't help. Advice?",
        "rejected": " New shoes",
    }
    assert out[2] == {  # a CNN/DM row: post and subreddit are null, the article is the text
        "prompt": "Article:\nA powerful storm struck the coast on Monday, cutting power to thousands of homes.\n\nTL;DR:",
        "chosen": " A storm cut power to thousands of coastal homes on Monday.",
        "rejected": " Storm.",
    }
    assert out[3] == tldr.IDENTICAL
    assert out[4] == {
        "prompt": "SUBREDDIT: r/zurich\n\nTITLE: Café calme à Zürich ?\n\nPOST: J'ai déménagé à Zürich 🇨🇭 et je "
        "cherche un café calme pour travailler. 東京 me manque.\n\nTL;DR:",
        "chosen": " Nouveau à Zürich ☕, cherche un café calme pour travailler.",
        "rejected": " Zürich.",
    }
    assert sum(isinstance(p, dict) for p in out) == 7


def test_tldr_fixture_through_load_pairs(monkeypatch):
    """The fixture file read the way training reads it: 7 pairs, the identical row counted."""
    data = data_config(format="tldr", path=str(TLDR_SAMPLE), eval_holdout=2)
    out = load_pairs(data, seed=0)
    assert (len(out.train), len(out.eval)) == (5, 2)
    assert out.dropped == {"train": {tldr.IDENTICAL: 1}}
    assert all(set(p) == {"prompt", "chosen", "rejected"} for p in out.train + out.eval)


def _tldr_row(**changes) -> dict:
    row = {
        "info": {"id": "t3_x", "post": "Post.", "title": "Title", "subreddit": "sub", "site": None, "article": None},
        "summaries": [
            {"text": " First.", "policy": "a", "note": None},
            {"text": " Second.", "policy": "b", "note": None},
        ],
        "choice": 0,
    }
    row.update(changes)
    return row


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"choice": 2}, tldr.BAD_CHOICE),
        ({"choice": -1}, tldr.BAD_CHOICE),
        ({"info": {"id": "x", "post": None, "title": "T", "subreddit": None, "article": None}}, tldr.NO_TEXT),
        ({"info": {"id": "x", "title": "T"}}, tldr.NO_TEXT),  # neither key present
        ({"summaries": [{"text": " \n"}, {"text": " Second."}]}, tldr.EMPTY),
        ({"summaries": [{"text": " Same."}, {"text": "Same.\n"}]}, tldr.IDENTICAL),
    ],
)
def test_tldr_dropped_with_reason(changes, reason):
    assert tldr.normalize(_tldr_row(**changes)) == reason


def test_tldr_choice_one_and_post_over_article():
    row = _tldr_row(choice=1, info={"post": "P", "title": "T", "subreddit": "s", "article": "ignored"})
    assert tldr.normalize(row) == {
        "prompt": "SUBREDDIT: r/s\n\nTITLE: T\n\nPOST: P\n\nTL;DR:",
        "chosen": " Second.",
        "rejected": " First.",
    }


@pytest.mark.parametrize(
    "changes, name, words",
    [
        ({"summaries": "two summaries"}, "summaries", "list of two objects with a string text"),
        ({"summaries": [{"text": "only one"}]}, "summaries", "a list of 1"),
        ({"summaries": [{"text": "a"}, {"text": None}]}, "summaries", "string text"),
        ({"summaries": [{"text": "a"}, "b"]}, "summaries", "string text"),
        ({"choice": "1"}, "choice", "integer 0 or 1, got str '1'"),
        ({"choice": True}, "choice", "got bool"),
        ({"choice": None}, "choice", "got null"),
        ({"info": "a post"}, "info", "'info' must be an object"),
        ({"info": {"post": "P", "title": None, "subreddit": "s"}}, "info", "'info.title' must be a string"),
        ({"info": {"post": 3, "title": "T", "subreddit": "s"}}, "info", "'info.post' must be a string"),
        ({"info": {"post": None, "article": ["x"]}}, "info", "'info.article' must be a string"),
    ],
)
def test_tldr_wrong_types_name_the_field(changes, name, words):
    with pytest.raises(RowError) as e:
        tldr.normalize(_tldr_row(**changes))
    assert e.value.field == name and words in str(e.value)


@pytest.mark.parametrize("name", ["info", "summaries", "choice"])
def test_tldr_missing_field(name):
    row = _tldr_row()
    del row[name]
    with pytest.raises(RowError, match=f"field '{name}' is missing"):
        tldr.normalize(row)


def test_tldr_bad_row_in_a_file_names_line_and_field(tmp_path, monkeypatch):
    path = tmp_path / "c.jsonl"
    rows = _rows(TLDR_SAMPLE)
    rows[5]["summaries"][1]["text"] = None
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = data_config(format="tldr", path=str(path))
    with pytest.raises(DataError, match=r"line 6: field 'summaries' must be .*data\.format\.columns\.summaries="):
        load_pairs(data, seed=0)


# --- SHP -----------------------------------------------------------------------------------

BASIL = (
    "\n\nHuman: What's the best way to keep basil fresh for more than a few days? Mine wilts in the fridge."
    "\n\nAssistant:"
)


def test_shp_fixture_exact_pairs():
    """10 rows: post p1basil has 8 (one with ratio 1.9), p2sky has 2 (one with ratio 1.99)."""
    out = [shp.normalize(r) for r in _rows(SHP_SAMPLE)]
    assert out[0] == {  # 10 / 5: a ratio of exactly 2 is kept; labels 1: A is chosen
        "prompt": BASIL,
        "chosen": " Treat it like cut flowers: stems in a glass of water on the counter.",
        "rejected": " Freeze it.",
        "_post_id": "p1basil",
    }
    assert out[1] == {  # 3 / 8, labels 0: B is chosen
        "prompt": BASIL,
        "chosen": " Wrap the leaves loosely in a damp paper towel and keep them in a bag.",
        "rejected": " Just buy dried basil.",
        "_post_id": "p1basil",
    }
    assert out[2] == shp.LOW_RATIO  # 19 / 10 = 1.9
    assert out[5]["chosen"] == " Trim the stems and change the water every day."  # 25 / 12 = 2.08
    assert out[8] == {
        "prompt": "\n\nHuman: Pourquoi le ciel est-il bleu ? Explain like I'm five — 为什么天空是蓝色的?\n\nAssistant:",
        "chosen": " Sunlight scatters off air molecules, and blue light scatters the most — so blue comes from "
        "everywhere. 🌤",
        "rejected": " Because of the ocean.",
        "_post_id": "p2sky",
    }
    assert out[9] == shp.LOW_RATIO  # 199 / 100 = 1.99
    assert [p["_post_id"] for p in out if isinstance(p, dict)] == ["p1basil"] * 7 + ["p2sky"]


def test_shp_cap_keeps_the_first_pairs_of_each_post():
    """p1basil has 7 pairs after the ratio filter: the default cap keeps its first 5."""
    kept = [p for p in (shp.normalize(r) for r in _rows(SHP_SAMPLE)) if isinstance(p, dict)]
    out, dropped = shp.finalize(kept, shp.MAX_PAIRS_PER_POST)
    assert dropped == 2 and len(out) == 6
    assert out == [{k: v for k, v in p.items() if k != "_post_id"} for p in kept[:5] + kept[7:]]
    assert all("_post_id" not in p for p in out) and all("_post_id" in p for p in kept)  # input left as it was
    assert shp.finalize(kept, None) == ([{k: v for k, v in p.items() if k != "_post_id"} for p in kept], 0)
    assert shp.finalize(kept, 1)[1] == 6
    assert shp.finalize([], 5) == ([], 0)
    with pytest.raises(ValueError, match="at least 1"):
        shp.finalize(kept, 0)
    assert "5" in shp.capped_reason(5)


def _shp_row(**changes) -> dict:
    row = {"post_id": "p", "history": "Q?", "human_ref_A": "a", "human_ref_B": "b", "score_A": 4, "score_B": 2}
    row["labels"] = 1
    row.update(changes)
    return row


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"score_A": 3, "score_B": 2}, shp.LOW_RATIO),
        ({"score_A": 2, "score_B": 2}, shp.LOW_RATIO),
        ({"score_A": 0}, shp.NOT_POSITIVE),  # the DPO code would divide by zero
        ({"score_B": -3}, shp.NOT_POSITIVE),
        ({"labels": 2}, shp.BAD_LABEL),
        ({"human_ref_B": "  "}, shp.EMPTY),
        ({"human_ref_A": "same", "human_ref_B": "same"}, shp.IDENTICAL),
    ],
)
def test_shp_dropped_with_reason(changes, reason):
    assert shp.normalize(_shp_row(**changes)) == reason


def test_shp_float_scores_and_ratio_from_scores():
    """The ratio is computed from the scores; a wrong `score_ratio` column is not read."""
    row = _shp_row(score_A=1.0, score_B=2.5, labels=0, score_ratio=1.0)
    assert shp.normalize(row) == {
        "prompt": "\n\nHuman: Q?\n\nAssistant:",
        "chosen": " b",
        "rejected": " a",
        "_post_id": "p",
    }


@pytest.mark.parametrize(
    "changes, name",
    [
        ({"score_A": "4"}, "score_A"),
        ({"score_B": None}, "score_B"),
        ({"score_A": True}, "score_A"),
        ({"labels": "1"}, "labels"),
        ({"labels": False}, "labels"),
        ({"history": None}, "history"),
        ({"human_ref_A": 7}, "human_ref_A"),
        ({"post_id": 12}, "post_id"),
    ],
)
def test_shp_wrong_types_name_the_field(changes, name):
    with pytest.raises(RowError) as e:
        shp.normalize(_shp_row(**changes))
    assert e.value.field == name and repr(name) in str(e.value)


# --- properties on random input ------------------------------------------------------------

# Pieces that hit the splitters' edge cases: turn markers whole and in part, white space of
# each kind the implicit splitter cuts at, and characters outside ASCII.
PIECES = [
    "a",
    "b",
    "yes",
    " ",
    "  ",
    "\n",
    "\t",
    "\n\n",
    ":",
    "é",
    "東",
    "🙂",
    "\n\nHuman:",
    "\n\nAssistant:",
    "Assistant:",
]


def _text(rng: random.Random, n: int = 6) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, n)))


def _two_texts(rng: random.Random) -> tuple[str, str]:
    """Unrelated texts, texts with a random shared start, or a shared dialogue ending in a turn."""
    kind = rng.randrange(3)
    if kind == 0:
        return _text(rng), _text(rng)
    shared = _text(rng) + (hh.ASSISTANT if kind == 2 else "")
    return shared + _text(rng), shared + _text(rng)


def test_hh_split_pair_properties():
    rng, split = random.Random(0), 0
    for _ in range(CASES):
        chosen, rejected = _two_texts(rng)
        out = hh.split_pair(chosen, rejected)
        if isinstance(out, str):
            assert out in (hh.NO_TURN, hh.EMPTY, hh.DIFFERENT_PROMPTS), (chosen, rejected, out)
            continue
        split += 1
        assert out["prompt"] + out["chosen"] == chosen, (chosen, rejected, out)
        assert out["prompt"] + out["rejected"] == rejected, (chosen, rejected, out)
        assert out["prompt"].endswith(hh.ASSISTANT) and hh.ASSISTANT not in out["chosen"], (chosen, rejected, out)
        assert out["chosen"].strip() and out["rejected"].strip(), (chosen, rejected, out)
    assert split >= CASES // 10  # the property was checked on many pairs, not vacuously


def test_pairs_split_implicit_properties():
    rng, split = random.Random(1), 0
    for _ in range(CASES):
        chosen, rejected = _two_texts(rng)
        out = pairs.split_implicit(chosen, rejected)
        if isinstance(out, str):
            assert out.startswith("no shared prompt"), (chosen, rejected, out)
            continue
        split += 1
        assert out["prompt"] + out["chosen"] == chosen, (chosen, rejected, out)
        assert out["prompt"] + out["rejected"] == rejected, (chosen, rejected, out)
        assert out["prompt"], (chosen, rejected, out)
    assert split >= CASES // 4


def _maybe_wrong(rng: random.Random, value):
    """The value, or (one time in 15) a value of a type no format accepts there."""
    return rng.choice([None, 3, 1.5, ["x"], {"text": "x"}, True]) if rng.randrange(15) == 0 else value


def test_tldr_normalize_properties():
    rng, made = random.Random(2), 0
    for _ in range(CASES):
        info = {
            "post": _maybe_wrong(rng, rng.choice([None, _text(rng)])),
            "title": _maybe_wrong(rng, _text(rng)),
            "subreddit": _maybe_wrong(rng, _text(rng)),
            "article": rng.choice([None, _text(rng)]),
        }
        summaries = [{"text": _maybe_wrong(rng, _text(rng))}, {"text": _maybe_wrong(rng, _text(rng))}]
        row = {
            "info": info,
            "summaries": _maybe_wrong(rng, summaries),
            "choice": _maybe_wrong(rng, rng.choice([0, 1, 0, 1, 2])),
        }
        try:
            out = tldr.normalize(row)
        except RowError as e:
            assert e.field in ("info", "summaries", "choice"), row
            continue
        if isinstance(out, str):
            assert out in (tldr.BAD_CHOICE, tldr.NO_TEXT, tldr.EMPTY, tldr.IDENTICAL), (row, out)
            continue
        made += 1
        choice = row["choice"]
        assert out["chosen"] == " " + summaries[choice]["text"].strip(), (row, out)
        assert out["rejected"] == " " + summaries[1 - choice]["text"].strip(), (row, out)
        assert out["chosen"] != out["rejected"], (row, out)
        if info["post"] is not None:
            expected = f"SUBREDDIT: r/{info['subreddit']}\n\nTITLE: {info['title']}\n\nPOST: {info['post']}\n\nTL;DR:"
        else:
            expected = f"Article:\n{info['article']}\n\nTL;DR:"
        assert out["prompt"] == expected, (row, out)
    assert made >= CASES // 10


def test_shp_normalize_and_finalize_properties():
    rng, made = random.Random(3), []
    for _ in range(CASES):
        row = {
            "post_id": _maybe_wrong(rng, rng.choice("pqrs")),
            "history": _maybe_wrong(rng, _text(rng)),
            "human_ref_A": _maybe_wrong(rng, _text(rng)),
            "human_ref_B": _maybe_wrong(rng, _text(rng)),
            "score_A": _maybe_wrong(rng, rng.choice([rng.randint(-2, 40), rng.uniform(0.1, 40)])),
            "score_B": _maybe_wrong(rng, rng.choice([rng.randint(-2, 40), rng.uniform(0.1, 40)])),
            "labels": _maybe_wrong(rng, rng.choice([0, 1, 0, 1, 2])),
        }
        try:
            out = shp.normalize(row)
        except RowError as e:
            assert e.field in row, row
            continue
        if isinstance(out, str):
            assert out in (shp.LOW_RATIO, shp.NOT_POSITIVE, shp.BAD_LABEL, shp.EMPTY, shp.IDENTICAL), (row, out)
            continue
        made.append(out)
        a, b = row["score_A"], row["score_B"]
        assert max(a / b, b / a) >= 2, (row, out)
        good, bad = ("human_ref_A", "human_ref_B") if row["labels"] == 1 else ("human_ref_B", "human_ref_A")
        whole = "\n\nHuman: " + row["history"] + "\n\nAssistant:"
        assert out["prompt"] + out["chosen"] == whole + " " + row[good], (row, out)
        assert out["prompt"] + out["rejected"] == whole + " " + row[bad], (row, out)
        assert out["_post_id"] == row["post_id"]
    assert len(made) >= CASES // 10
    for cap in (1, 2, 5, None):
        kept, dropped = shp.finalize(made, cap)
        assert dropped == len(made) - len(kept)
        stripped = [{k: v for k, v in p.items() if k != "_post_id"} for p in made]
        posts = [p["_post_id"] for p in made]
        # kept is exactly the pairs whose rank within their post is below the cap, in order
        rank = [posts[:i].count(posts[i]) for i in range(len(posts))]
        assert kept == [s for s, r in zip(stripped, rank, strict=True) if cap is None or r < cap], cap
