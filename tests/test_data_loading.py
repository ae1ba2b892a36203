"""Loading preference data from files: seeded caps and hold-outs, drop reasons, column mapping,
the `pairs` format, and limits checked before any weights load."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from conftest import data_config
from omegaconf import OmegaConf

from dpo_cli.data import load_pairs
from dpo_cli.data.formats import pairs
from dpo_cli.errors import ConfigError, DataError

ASSISTANT = "\n\nAssistant:"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def hh_row(subset: str, i: int) -> dict:
    prompt = f"\n\nHuman: {subset} question {i}?{ASSISTANT}"
    return {"chosen": prompt + f" good {i}", "rejected": prompt + f" bad {i}"}


def data_cfg(**overrides):
    return data_config(**{**dict(format="hh", eval_holdout=4), **overrides})


def test_caps_take_a_seeded_sample_not_the_first_rows(tmp_path):
    """A file ordered by subset (harmless first, then helpful, as the hub concatenates HH's
    subsets): capped train and eval sets must draw from both subsets, the same way per seed."""
    rows = [hh_row("harmless", i) for i in range(20)] + [hh_row("helpful", i) for i in range(20)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    test = write_jsonl(tmp_path / "test.jsonl", rows)
    cfg = data_cfg(path=str(train), eval_path=str(test), max_train_pairs=10, max_eval_pairs=10)
    a = load_pairs(cfg, seed=1)
    for split in (a.train, a.eval):
        assert len(split) == 10
        subsets = {("harmless" if "harmless" in p["prompt"] else "helpful") for p in split}
        assert subsets == {"harmless", "helpful"}, split
    assert load_pairs(cfg, seed=1).train == a.train
    assert load_pairs(cfg, seed=2).train != a.train


def test_every_row_dropped_names_the_reason_and_a_format_that_fits(tmp_path):
    """Rows that already hold prompt/chosen/rejected, read as HH: none splits, and the message
    says why (per reason, with counts) and suggests data=pairs."""
    rows = [{"prompt": f"Q{i}?", "chosen": "yes", "rejected": "no"} for i in range(5)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_pairs(data_cfg(path=str(path)), seed=0)
    msg = str(e.value)
    assert "no usable training pairs" in msg
    assert "5 rows: no '\\n\\nAssistant:' turn" in msg
    assert "data=pairs" in msg


def test_a_row_missing_a_field_names_the_row_and_the_field(tmp_path):
    rows = [hh_row("a", 0), hh_row("a", 1), {"chosen": "x"}, hh_row("a", 3)]
    path = write_jsonl(tmp_path / "h.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_pairs(data_cfg(path=str(path)), seed=0)
    msg = str(e.value)
    assert "data.path: 'h.jsonl' line 3" in msg or f"data.path: '{path}' line 3" in msg, msg
    assert "'rejected' is missing" in msg and "data.format.columns.rejected" in msg


def test_a_non_string_field_names_the_row_and_the_field(tmp_path):
    rows = [hh_row("a", 0), {"chosen": None, "rejected": "x"}]
    path = write_jsonl(tmp_path / "h.jsonl", rows)
    with pytest.raises(DataError, match=r"line 2: field 'chosen' must be a string, got NoneType"):
        load_pairs(data_cfg(path=str(path)), seed=0)


def test_columns_map_other_names(tmp_path):
    rows = [{"question": f"Q{i}?", "good": "yes", "bad": "no"} for i in range(10)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = data_cfg(format="pairs", path=str(path), columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    got = load_pairs(cfg, seed=0)
    assert sorted(p["prompt"] for p in got.train + got.eval) == sorted(f"Q{i}?" for i in range(10))
    assert {(p["chosen"], p["rejected"]) for p in got.train + got.eval} == {("yes", "no")}


def test_columns_from_the_command_line_and_typos(tmp_path):
    """data.format.columns.FIELD=COLUMN needs no `+`; a field the format does not have fails
    when Hydra composes (the schema types the columns by the format's fields)."""
    from conftest import make_config
    from hydra.errors import ConfigCompositionException

    cfg = make_config(
        [
            "data=pairs",
            "data.path=x.jsonl",
            "data.format.columns={prompt: question, chosen: good}",
            "data.format.columns.rejected=bad",
        ]
    )
    columns = cfg.data.format.columns
    assert (columns.prompt, columns.chosen, columns.rejected) == ("question", "good", "bad")
    assert OmegaConf.to_object(cfg.data).format.columns.chosen == "good"
    for typo in ("data.format.columns.chosn=good", "data.format.columns.score_A=x"):  # score_A: SHP's, not pairs'
        with pytest.raises(ConfigCompositionException, match=typo.split("=")[0].rsplit(".", 1)[1]):
            make_config(["data=pairs", "data.path=x.jsonl", typo])


def test_pairs_explicit_prompt():
    assert pairs.normalize({"prompt": "Q?", "chosen": " A", "rejected": " B"}) == {
        "prompt": "Q?",
        "chosen": " A",
        "rejected": " B",
    }


def test_pairs_implicit_prompt_is_the_shared_dialogue_up_to_the_last_turn():
    """chosen/rejected only: the prompt is the longest common prefix, cut back to the last
    assistant turn (so that a response starting with the same words is not split)."""
    chosen = f"\n\nHuman: hi{ASSISTANT} Hello there, friend."
    rejected = f"\n\nHuman: hi{ASSISTANT} Hello."
    assert pairs.normalize({"chosen": chosen, "rejected": rejected}) == {
        "prompt": f"\n\nHuman: hi{ASSISTANT}",
        "chosen": " Hello there, friend.",
        "rejected": " Hello.",
    }


def test_pairs_implicit_prompt_without_turn_markers_cuts_at_a_word_boundary():
    assert pairs.normalize({"chosen": "Capital of France: Paris", "rejected": "Capital of France: Pisa"}) == {
        "prompt": "Capital of France:",
        "chosen": " Paris",
        "rejected": " Pisa",
    }
    assert (
        pairs.normalize({"chosen": "same", "rejected": "other"})
        == "no shared prompt (chosen and rejected differ from the start)"
    )


def test_max_length_beyond_the_models_positions_is_refused_before_loading():
    from conftest import make_config

    from dpo_cli.config import validate

    cfg = make_config(["data.max_length=1500"])  # model=tiny has max_position_embeddings: 1024
    with pytest.raises(ConfigError, match=r"data.max_length=1500 is longer than the model's 1024 positions"):
        validate(cfg)


def test_pairs_truncated_to_identical_responses_are_refused(train_run):
    """data.max_length=5 cuts every pair of the built-in task to identical responses; that used
    to train at loss log 2 forever with exit 0."""
    with pytest.raises(
        DataError, match=r"pairs dropped \(identical after truncation: 256\), 0 left; raise data.max_length"
    ):
        train_run(["data.max_length=5", "data.max_prompt_length=4"])


def test_a_mixture_takes_each_sources_share_and_reports_each(tmp_path):
    """hh (10 usable pairs, 2 held out) at weight 0.5 and pairs (10, 2 held out) at 1.0."""
    from conftest import make_config

    from dpo_cli.config import validate

    hh_rows = [hh_row("a", i) for i in range(10)]
    simple = [{"prompt": f"Q{i}?", "chosen": " yes", "rejected": " no"} for i in range(10)]
    args = [
        "data=mix",
        "+data@data.mixture.hh=hh",
        f"data.mixture.hh.path={write_jsonl(tmp_path / 'hh.jsonl', hh_rows)}",
        "data.mixture.hh.eval_holdout=2",
        "+data@data.mixture.simple=pairs",
        f"data.mixture.simple.path={write_jsonl(tmp_path / 'p.jsonl', simple)}",
        "data.mixture.simple.eval_holdout=2",
        "+data.weights.hh=0.5",
    ]
    cfg = make_config(args)
    validate(cfg)
    got = load_pairs(OmegaConf.to_object(cfg.data), seed=0)
    assert got.sources == {"hh": (4, 2), "simple": (8, 2)}
    assert len(got.train) == 12 and len(got.eval) == 4
    assert got.rows == {"hh/train": 10, "simple/train": 10}
    assert sum("a question" in p["prompt"] for p in got.train) == 4

    bad = make_config([*args, "+data.weights.shp=0.5", "data.weights.hh=2"])
    with pytest.raises(ConfigError) as e:
        validate(bad)
    assert any("data.weights.shp=0.5 names no source" in p for p in e.value.problems)
    assert any("data.weights.hh=2.0 must be in (0, 1]" in p for p in e.value.problems)


def test_tokenization_cache_hits_and_misses(tmp_path, monkeypatch):
    """The second prepare() of the same data, tokenizer and lengths reads the cache (no
    tokenizer call); changing the data, a length or the tokenizer misses it."""
    from dpo_cli.data import prepare as prep
    from dpo_cli.modeling import byte_tokenizer

    rows = [hh_row("a", i) for i in range(12)]
    cfg = data_cfg(path=str(write_jsonl(tmp_path / "h.jsonl", rows)), cache_dir=str(tmp_path / "cache"))
    tok = byte_tokenizer()
    first = prep.prepare(cfg, tok, seed=0)
    assert not first.cached and len(list((tmp_path / "cache").glob("*.pt"))) == 1

    calls = []
    real = prep.tokenize_pairs
    monkeypatch.setattr(prep, "tokenize_pairs", lambda *a, **k: calls.append(1) or real(*a, **k))
    second = prep.prepare(cfg, tok, seed=0)
    assert second.cached and calls == []
    assert second.train == first.train and second.eval == first.eval
    assert second.train_stats == first.train_stats

    for changed, other_tok in (
        (dataclasses.replace(cfg, max_length=100), tok),  # a setting that changes the ids
        (cfg, byte_tokenizer()),  # an equal tokenizer: still a hit
    ):
        calls.clear()
        again = prep.prepare(changed, other_tok, seed=0)
        assert again.cached is (changed is cfg), changed
    other = byte_tokenizer()
    other.add_tokens(["Human"])  # a different tokenizer
    assert not prep.prepare(cfg, other, seed=0).cached
    write_jsonl(tmp_path / "h.jsonl", rows[:-1])  # different data
    assert not prep.prepare(cfg, tok, seed=0).cached
    (tmp_path / "cache" / "junk.pt").write_text("x")  # a damaged file never breaks a run
    for f in (tmp_path / "cache").glob("*.pt"):
        f.write_bytes(b"not a torch file")
    assert not prep.prepare(cfg, tok, seed=0).cached


def test_cache_packing_round_trips_pairs_and_unpaired_examples():
    from dpo_cli.data.prepare import _pack, _unpack

    pairs_ = [
        {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5, 6]},
        {"prompt_ids": [], "chosen_ids": [7, 8], "rejected_ids": [9]},
    ]
    unpaired = [
        {"prompt_ids": [1], "chosen_ids": [2, 3], "rejected_ids": []},
        {"prompt_ids": [4, 5], "chosen_ids": [], "rejected_ids": [6]},
    ]
    for examples in (pairs_, unpaired, []):
        assert _unpack(_pack(examples)) == examples


def test_eval_holdout_below_one_is_a_share(tmp_path):
    rows = [hh_row("a", i) for i in range(40)]
    cfg = data_cfg(path=str(write_jsonl(tmp_path / "h.jsonl", rows)), eval_holdout=0.25)
    got = load_pairs(cfg, seed=0)
    assert (len(got.train), len(got.eval)) == (30, 10)


def test_hh_unicode_dialogues_split_and_tokenize_back_to_the_text(tmp_path):
    from dpo_cli.data.tokenize import tokenize_pairs
    from dpo_cli.modeling import byte_tokenizer

    prompt = f"\n\nHuman: Wie heißt „Katze“ auf Japanisch? 🐱{ASSISTANT}"
    rows = [{"chosen": prompt + " 猫 (neko).", "rejected": prompt + " Keine Ahnung…"}] * 4
    got = load_pairs(data_cfg(path=str(write_jsonl(tmp_path / "u.jsonl", rows)), eval_holdout=0), seed=0)
    assert got.train[0] == {"prompt": prompt, "chosen": " 猫 (neko).", "rejected": " Keine Ahnung…"}
    tok = byte_tokenizer()
    ids, _ = tokenize_pairs(got.train[:1], tok, max_length=512, max_prompt_length=256)
    text = tok.decode(ids[0]["prompt_ids"] + ids[0]["chosen_ids"], skip_special_tokens=True)
    assert text == prompt + " 猫 (neko)."


DATA_FIXTURES = {
    "hh": ["data.path=tests/fixtures/hh_sample.jsonl"],
    "pairs": ["data.path=tests/fixtures/hh_sample.jsonl"],  # implicit prompt: chosen/rejected dialogues
    "tldr": ["data.path=tests/fixtures/tldr_sample.jsonl"],
    "shp": ["data.path=tests/fixtures/shp_sample.jsonl"],
    "kto": ["data.path=tests/fixtures/kto_sample.jsonl", "loss=kto"],
    "mix": [
        "+data@data.mixture.hh=hh",
        "data.mixture.hh.path=tests/fixtures/hh_sample.jsonl",
        "+data@data.mixture.shp=shp",
        "data.mixture.shp.path=tests/fixtures/shp_sample.jsonl",
    ],
}


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(DATA_FIXTURES))
def test_every_data_config_trains_from_its_fixture(name, train_run, monkeypatch):
    """(ultrafeedback, which needs a chat template, is in test_preflight.py.) With debug=default
    (FAST): no warm start of model=tiny first, which is not what this test is about."""
    from conftest import REPO

    args = [a.replace("tests/fixtures", str(REPO / "tests" / "fixtures")) for a in DATA_FIXTURES[name]]
    result, run_dir = train_run(
        [
            f"data={name}",
            *args,
            "data.cache_dir=null",
            "train.batch_size=2",
            "train.micro_batch_size=2",
            "train.max_steps=2",
        ]
    )
    assert result["step"] == 2 and math.isfinite(result["loss"]) and math.isfinite(result["eval_loss"])


def test_a_directory_of_split_files_reads_the_train_split_and_evaluates_on_the_eval_split(tmp_path):
    """A hub repo's folder (train-*.jsonl, test-*.jsonl): test rows must not leak into training."""
    d = tmp_path / "repo"
    d.mkdir()
    write_jsonl(d / "train-00000.jsonl", [hh_row("train", i) for i in range(6)])
    write_jsonl(d / "test-00000.jsonl", [hh_row("test", i) for i in range(3)])
    (d / "README.md").write_text("card")
    got = load_pairs(data_cfg(path=str(d), eval_split="test"), seed=0)
    assert len(got.train) == 6 and all("train" in p["prompt"] for p in got.train)
    assert len(got.eval) == 3 and all("test" in p["prompt"] for p in got.eval)
    with pytest.raises(DataError, match=r"holds files of the splits test, train but none of 'train_prefs'"):
        load_pairs(data_cfg(path=str(d), train_split="train_prefs"), seed=0)


def test_an_explicit_eval_file_with_no_usable_pair_is_an_error(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [hh_row("a", i) for i in range(6)])
    bad = write_jsonl(tmp_path / "e.jsonl", [{"chosen": "no turns", "rejected": "here"}])
    with pytest.raises(DataError, match=r"no usable eval pairs in data.eval_path \(dropped: 1 rows: no"):
        load_pairs(data_cfg(path=str(train), eval_path=str(bad)), seed=0)


def test_mixture_sources_are_validated_and_counted_after_the_cap(tmp_path):
    from conftest import make_config
    from hydra.errors import ConfigCompositionException

    from dpo_cli.config import validate

    hh_file = write_jsonl(tmp_path / "hh.jsonl", [hh_row("a", i) for i in range(10)])
    base = ["data=mix", "+data@data.mixture.hh=hh", f"data.mixture.hh.path={hh_file}", "data.mixture.hh.eval_holdout=2"]
    with pytest.raises(ConfigError) as e:
        validate(make_config([*base, "data.mixture.hh.max_eval_pairs=-3"]))
    assert any("data.mixture.hh.max_eval_pairs=-3 must be > 0" in p for p in e.value.problems)
    # A mixture's sources are typed (SourceConfig): a wrong type fails when Hydra composes.
    with pytest.raises(ConfigCompositionException, match="data.mixture.hh.max_train_pairs=abc"):
        make_config([*base, "data.mixture.hh.max_train_pairs=abc"])
    got = load_pairs(OmegaConf.to_object(make_config([*base, "data.max_train_pairs=3"]).data), seed=0)
    assert len(got.train) == 3 and got.sources == {"hh": (3, 2)}


def test_pairs_dropped_as_identical_when_read_count_towards_the_refusal(tmp_path):
    """8 of 10 conversational pairs have identical responses: dropped while reading, and the
    run is refused as mostly degenerate, as the same pairs as text would be."""
    from dpo_cli.data.prepare import prepare
    from dpo_cli.modeling import byte_tokenizer

    def row(i, same):
        user = [{"role": "user", "content": f"q{i}"}]
        return {
            "chosen": user + [{"role": "assistant", "content": "a"}],
            "rejected": user + [{"role": "assistant", "content": "a" if same else "b"}],
        }

    path = write_jsonl(tmp_path / "c.jsonl", [row(i, i < 8) for i in range(10)])
    tok = byte_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    with pytest.raises(DataError, match=r"8 of 10 training pairs dropped \(identical"):
        prepare(data_cfg(format="pairs", path=str(path), eval_holdout=0), tok, seed=0)


def test_an_unwritable_cache_is_a_warning_not_a_failure(tmp_path, caplog):
    from dpo_cli.data.prepare import prepare
    from dpo_cli.modeling import byte_tokenizer

    path = write_jsonl(tmp_path / "h.jsonl", [hh_row("a", i) for i in range(6)])
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    got = prepare(data_cfg(path=str(path), cache_dir=str(blocker / "sub")), byte_tokenizer(), seed=0)
    assert len(got.train) == 3 and "could not write the tokenization cache" in caplog.text


def test_report_percentiles_are_nearest_rank_and_the_truncated_share_is_at_most_all():
    from dpo_cli.data.summary import _percentiles

    assert _percentiles([1, 100]) == "p50=1 p90=100 p99=100 max=100"
    assert _percentiles(list(range(1, 11))) == "p50=5 p90=9 p99=10 max=10"


# --- messages that name the right cause; held-out data that cannot evaluate --------------------


def test_all_empty_responses_under_data_pairs_are_not_told_to_use_data_pairs(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "", "rejected": " "} for i in range(3)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_pairs(data_cfg(format="pairs", path=str(path)), seed=0)
    msg = str(e.value)
    assert "3 rows: empty response (chosen or rejected is empty or only white space)" in msg, msg
    assert "use data=pairs" not in msg and "messages" not in msg


def test_a_row_missing_several_fields_names_them_all(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}])
    with pytest.raises(DataError) as e:
        load_pairs(data_cfg(format="pairs", path=str(path)), seed=0)
    msg = str(e.value)
    assert "fields 'chosen' and 'rejected' are missing (the row has: text)" in msg, msg
    assert "data.format.columns.chosen=COLUMN data.format.columns.rejected=COLUMN" in msg
    path = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "a", "text": "b"}])
    with pytest.raises(DataError, match="fields 'completion' and 'label' are missing"):
        load_pairs(data_cfg(format="kto", path=str(path)), seed=0)


def test_a_missing_data_file_says_relative_to_what_only_for_a_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        load_pairs(data_cfg(path="nothing.jsonl"), seed=0)
    assert f"data.path='nothing.jsonl' (relative to {tmp_path}): no such file" in str(e.value)
    with pytest.raises(DataError) as e:
        load_pairs(data_cfg(path=str(tmp_path / "nothing.jsonl")), seed=0)
    assert "relative to" not in str(e.value)


def test_the_offline_hint_is_not_offered_when_offline_mode_is_already_on(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The libraries read HF_HUB_OFFLINE when first imported (by an earlier test, in a suite):
    # offline as a process started with it is, not 23 s of retries against an unreachable hub.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as e:
        load_pairs(data_cfg(format="hh", hub_id="nobody/no-such-dataset", eval_split="test"), seed=0)
    msg = str(e.value)
    assert "set HF_HUB_OFFLINE=1" not in msg, msg
    assert "HF_HUB_OFFLINE is set: only the local Hugging Face cache is read, and it does not hold it" in msg


def test_eval_path_that_is_data_path_warns(tmp_path, caplog, monkeypatch):
    """The same file under two spellings: the 'held-out' pairs are training pairs."""
    from dpo_cli.data.prepare import prepare
    from dpo_cli.modeling import byte_tokenizer

    monkeypatch.chdir(tmp_path)
    path = write_jsonl(tmp_path / "h.jsonl", [hh_row("a", i) for i in range(8)])
    with caplog.at_level("WARNING"):
        prepare(data_cfg(path=str(path), eval_path="./h.jsonl"), byte_tokenizer(), 0)
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(lines) == 1 and "data.eval_path='./h.jsonl' is the training file data.path" in lines[0], lines
    caplog.clear()
    other = write_jsonl(tmp_path / "e.jsonl", [hh_row("b", i) for i in range(4)])
    with caplog.at_level("WARNING"):
        prepare(data_cfg(path=str(path), eval_path=str(other)), byte_tokenizer(), 0)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_no_held_out_pairs_warns_that_evaluation_is_skipped(tmp_path, caplog):
    from dpo_cli.data.prepare import prepare
    from dpo_cli.modeling import byte_tokenizer

    path = write_jsonl(tmp_path / "h.jsonl", [hh_row("a", i) for i in range(8)])
    for holdout, why in ((0, "data.eval_holdout=0"), (0.01, "data.eval_holdout=0.01 of 8 pairs")):
        caplog.clear()
        with caplog.at_level("WARNING"):
            data = prepare(data_cfg(path=str(path), eval_holdout=holdout), byte_tokenizer(), 0)
        assert data.eval == []
        lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(lines) == 1 and lines[0].startswith(f"no held-out pairs ({why})"), lines
        assert "held-out evaluation (eval_loss, eval_rewards/*) is skipped" in lines[0]
