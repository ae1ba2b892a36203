"""The data-format interface: one module per format under dpo_cli/data/formats/, found without a
list; each format's options refuse what it does not have; the loader never compares format
names; conf/data/*.yaml hold only what differs from the schema; and a format defined outside
the package (here, in this file) trains through `_target_` alone."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
from dataclasses import dataclass
from dataclasses import field as option
from pathlib import Path
from typing import ClassVar

import pytest
from conftest import QUIET, data_config, make_config, run_cli, yaml_leaves
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from dpo_cli import cli
from dpo_cli.data import load_pairs
from dpo_cli.data.formats import Format, format_class, format_classes, format_names, hints, make_format
from dpo_cli.data.options import RENAMED, DataConfig, SourceConfig, data_problems, format_schema, unpaired
from dpo_cli.errors import ConfigError

PACKAGE = Path(__file__).resolve().parents[1] / "dpo_cli"
CONF = Path(cli.config_dir())
ROW_FORMATS = [cls for cls in format_classes() if cls.reads_rows]


@dataclass
class Toy(Format):
    """A format defined outside dpo_cli: rows {"q", "good", "bad"}; equal answers are dropped."""

    columns: dict[str, str] = option(default_factory=dict)  # source column of a field
    prefix: str = " "  # put before each answer

    name: ClassVar[str] = "toy"
    fields: ClassVar[tuple[str, ...]] = ("q", "good", "bad")

    def normalize(self, row: dict) -> dict | str:
        if row["good"] == row["bad"]:
            return "same answers"
        return {"prompt": row["q"], "chosen": self.prefix + row["good"], "rejected": self.prefix + row["bad"]}


def test_the_formats_are_found_by_module():
    """Every module of dpo_cli/data/formats (but the base) holds one format, named as the module."""
    modules = sorted(p.stem for p in (PACKAGE / "data" / "formats").glob("*.py") if p.stem not in ("__init__", "base"))
    assert format_names() == modules
    assert {"hh", "pairs", "tldr", "shp", "ultrafeedback", "kto", "synthetic"} <= set(modules)
    for name in modules:
        assert format_class(name).__module__ == f"dpo_cli.data.formats.{name}"
        assert isinstance(make_format(name), format_class(name))
    with pytest.raises(ValueError, match=r"data.format='hhh' is not one of hh, kto, .*set data=<one of them>"):
        format_class("hhh")


def test_hints_come_from_the_formats_most_specific_first():
    found = [(cls.name, len(columns)) for columns, cls, _ in hints()]
    assert {name for name, _ in found} == {"tldr", "ultrafeedback", "shp", "kto", "pairs"}
    assert [n for _, n in found] == sorted((n for _, n in found), reverse=True)
    assert found[0][0] == "ultrafeedback" and found[-1][0] == "pairs"  # a superset of pairs' columns first


@pytest.mark.parametrize("cls", ROW_FORMATS, ids=lambda c: c.name)
def test_each_format_refuses_a_column_it_does_not_have(cls):
    """In code (a built format's problems) and when Hydra composes (the schema's columns)."""
    field = cls.fields[0]
    assert cls(columns={field: "other"}).problems() == []
    (problem,) = cls(columns={"no_such_field": "x"}).problems()
    assert problem.startswith(f"data.format.columns.no_such_field='x': format {cls.name!r} has no field")
    assert field in problem
    assert [f.name for f in dataclasses.fields(format_schema(cls)().columns)] == [*cls.fields, *cls.optional]
    required = ["data.path=x.jsonl", "loss=kto"] if not cls.paired else ["data.path=x.jsonl"]
    cfg = make_config([f"data={cls.name}", f"data.format.columns.{field}=other", *required])
    assert OmegaConf.to_object(cfg.data).format.columns.__dict__[field] == "other"
    with pytest.raises(ConfigCompositionException, match="no_such_field"):
        make_config([f"data={cls.name}", "data.format.columns.no_such_field=x", *required])


def test_format_options_are_checked_by_the_format():
    shp, synthetic = format_class("shp"), format_class("synthetic")
    assert shp().max_pairs_per_post == 5 and shp(max_pairs_per_post=None).problems() == []
    assert shp(max_pairs_per_post=0).problems() == ["data.format.max_pairs_per_post=0 must be > 0 (or null: no cap)"]
    assert synthetic(min_digits=1).problems() == ["data.format needs 2 <= min_digits <= max_digits, got 1, 8"]
    assert synthetic(num_eval=0).problems() == ["data.format.num_eval=0 must be > 0"]


def test_data_problems_name_the_keys_of_a_mixture_source(tmp_path):
    bad_shp = SourceConfig(format=format_class("shp")(max_pairs_per_post=-1), path="x.jsonl")
    kto = SourceConfig(format="kto", path="k.jsonl")
    d = DataConfig(format=None, mixture={"s": bad_shp, "k": kto}, weights={"nope": 0.5})
    problems = data_problems(d)
    assert "data.mixture.s.format.max_pairs_per_post=-1 must be > 0 (or null: no cap)" in problems
    assert "data.mixture mixes paired and unpaired (kto) sources; a run trains on one kind" in problems
    assert any(p.startswith("data.weights.nope=0.5 names no source") for p in problems)
    assert unpaired(DataConfig(format=None, mixture={"k": kto})) and not unpaired(DataConfig(format="hh"))
    assert data_problems(DataConfig(format=None, mixture={}))[0].startswith("data=mix needs sources")
    assert data_problems(DataConfig(format="nope"))[0].startswith("data.format='nope' is not one of hh")


def _compares_a_format_name(node: ast.AST, names: set[str]) -> bool:
    """A comparison (==, !=, in, not in) with a format's name as a string constant on either
    side, or inside a tuple/list/set on either side."""
    if not isinstance(node, ast.Compare):
        return False
    for side in (node.left, *node.comparators):
        items = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
        if any(isinstance(i, ast.Constant) and i.value in names for i in items):
            return True
    return False


def test_no_format_name_is_compared_outside_the_format_modules():
    names = {*format_names(), "mix"}
    found = []
    for path in PACKAGE.rglob("*.py"):
        if (PACKAGE / "data" / "formats") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if _compares_a_format_name(node, names):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert found == []
    assert _compares_a_format_name(ast.parse('x.format == "shp"').body[0].value, names)  # the check bites
    assert _compares_a_format_name(ast.parse('f in ("synthetic", "mix")').body[0].value, names)


DATA_FILES = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))
REQUIRED = {
    "kto": ["data.path=x.jsonl", "loss=kto"],
    "pairs": ["data.path=x.jsonl"],
    "mix": ["+data@data.mixture.hh=hh"],
}


@pytest.mark.parametrize("name", DATA_FILES)
def test_every_data_file_composes_and_holds_only_what_differs_from_the_schema(name):
    cfg = make_config([f"data={name}", *REQUIRED.get(name, [])])
    data = OmegaConf.to_object(cfg.data)
    assert isinstance(data, DataConfig) and data_problems(data) == []
    raw = OmegaConf.to_container(OmegaConf.load(CONF / "data" / f"{name}.yaml"), resolve=False)
    raw.pop("defaults", None)
    schema = OmegaConf.structured(DataConfig)
    for key, value in yaml_leaves(raw):
        if key.startswith("format.") and not isinstance(data.format, str):
            default = OmegaConf.select(OmegaConf.structured(format_schema(type(make_format(data.format)))), key[7:])
        else:
            default = OmegaConf.select(schema, key, default="MISSING") if key != "format" else "MISSING"
        assert value != default, f"conf/data/{name}.yaml: {key}: {value!r} is the schema's default"


def test_a_bare_format_name_still_works(tmp_path):
    """`data.format: hh` (a user's own YAML, or data.format=hh) is the module of that name."""
    turn = "\n\nHuman: q{}?\n\nAssistant:"
    rows = [{"chosen": turn.format(i) + " yes", "rejected": turn.format(i) + " no"} for i in range(4)]
    path = tmp_path / "h.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_config(["data=pairs", "data.format=hh", f"data.path={path}", "data.eval_holdout=1"])
    data = OmegaConf.to_object(cfg.data)
    assert data.format == "hh" and data_problems(data) == []
    got = load_pairs(data, seed=0)
    assert (len(got.train), len(got.eval)) == (3, 1) and got.train[0]["chosen"] == " yes"
    with pytest.raises(ConfigError, match="data.format='hhh' is not one of"):
        load_pairs(DataConfig(format="hhh", path=str(path), cache_dir=None), seed=0)


def test_a_format_defined_elsewhere_loads_through_its_target(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [{"q": f"Q{i}?", "good": "yes", "bad": "no"} for i in range(6)] + [{"q": "Q?", "good": "a", "bad": "a"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    toy = make_format({"_target_": f"{__name__}.Toy", "prefix": "> "})
    got = load_pairs(data_config(format=toy, path=str(path), eval_holdout=2), seed=0)
    assert (len(got.train), len(got.eval)) == (4, 2) and got.dropped == {"train": {"same answers": 1}}
    assert {p["chosen"] for p in got.train} == {"> yes"}


def test_old_spellings_map_to_the_new_keys():
    assert RENAMED["data.columns"] == "data.format.columns"
    assert RENAMED["data.shp_max_pairs_per_post"] == "data.format.max_pairs_per_post"
    assert RENAMED["data.synthetic"] == "data.format"
    cfg = make_config(["data.format.num_train=7"])
    assert OmegaConf.to_object(cfg.data).format.num_train == 7  # data.synthetic.num_train, renamed


@pytest.mark.integration
def test_a_toy_format_in_a_test_file_inspects_through_dpo_train(tmp_path):
    """One class in this file, selected by data.format._target_: `dpo-train mode=inspect` reads,
    normalizes (dropping and counting a row), tokenizes and exports its pairs; no other file
    names it."""
    path = tmp_path / "toy.jsonl"
    rows = [{"q": f"sort {i}{i + 1}:", "good": f"{i}{i + 1}", "bad": f"{i + 1}{i}"} for i in range(1, 9)]
    rows.append({"q": "sort 11:", "good": "11", "bad": "11"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    export = tmp_path / "pairs.jsonl"
    args = ["dpo-train", "mode=inspect", "debug=default", "data=pairs", f"data.path={path}", "data.eval_holdout=2"]
    args += ["data.format._target_=test_format_modules.Toy", f"inspect.export={export}", *QUIET]
    args += ["train.batch_size=4", "train.micro_batch_size=2", f"hydra.run.dir={tmp_path}/r"]
    tests = str(Path(__file__).parent)
    env = {"PYTHONPATH": os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)}
    proc = run_cli(args, cwd=tmp_path, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "rows read: train 9; pairs kept: 6 train, 2 eval" in out
    assert "'same answers': 1" in out
    exported = [json.loads(line) for line in export.read_text().splitlines()]
    assert len(exported) == 8 and all(p["chosen"].startswith(" ") for p in exported)


def test_tldr_templates_are_options():
    tldr = format_class("tldr")
    row = {
        "info": {"post": "P", "title": "T", "subreddit": "s"},
        "summaries": [{"text": " a"}, {"text": "b"}],
        "choice": 1,
    }
    assert tldr().normalize(row)["prompt"].startswith("SUBREDDIT: r/s\n\nTITLE: T")
    short = tldr(post_template="{title}: {post}\nTL;DR:")
    assert short.normalize(row) == {"prompt": "T: P\nTL;DR:", "chosen": " b", "rejected": " a"}
    (problem,) = tldr(post_template="{titel}").problems()
    assert problem.startswith("data.format.post_template='{titel}' cannot be filled") and "{title}" in problem
    cfg = make_config(["data=tldr", "data.format.article_template='News: {article} TL;DR:'"])
    assert make_format(OmegaConf.to_object(cfg.data).format).article_template == "News: {article} TL;DR:"


def test_mixtures_do_not_nest():
    """A source is a SourceConfig, which has no mixture of its own: Hydra refuses one."""
    with pytest.raises(ConfigCompositionException, match="mixture"):
        make_config(["data=mix", "+data@data.mixture.hh=hh", "+data@data.mixture.inner=mix"])
    cfg = make_config(["data=mix", "+data@data.mixture.hh=hh", "data.mixture.hh.path=x.jsonl"])
    data = OmegaConf.to_object(cfg.data)
    assert type(data.mixture["hh"]) is SourceConfig and data.mixture["hh"].path == "x.jsonl"
