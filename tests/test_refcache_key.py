"""The reference log-prob cache's key: everything that decides the reference's weights (the
warm start included) and its inputs changes it; the same inputs give the same key."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import read_metrics

STEPS = ["train.max_steps=1", "train.eval_every=null", "judge=none"]


def _cache_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.pt"))


@pytest.mark.integration
def test_a_run_with_another_warm_start_misses_the_cache(train_run, tmp_path, caplog):
    """The review's repro, tiny: two runs sharing a cache that differ only in
    model.warm_start.steps. The second one's reference is its own warm-started policy, so
    its first step (before any update) compares the policy with itself: log 2, no change."""
    cache = tmp_path / "cache"
    common = [*STEPS, "reference.precompute=true", f"reference.cache_dir={cache}"]
    train_run([*common, "model.warm_start.steps=2", "model.warm_start.batch_size=8"], tmp_path / "a")
    assert len(_cache_files(cache)) == 1
    caplog.set_level("INFO", logger="dpo_cli.refcache")
    _, run_dir = train_run([*common, "model.warm_start.steps=6", "model.warm_start.batch_size=8"], tmp_path / "b")
    first = read_metrics(run_dir)[0]
    assert first["step"] == 1
    assert first["logps/chosen_change"] == pytest.approx(0.0, abs=1e-5)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert "cache hit" not in caplog.text
    assert len(_cache_files(cache)) == 2


SMALL = ["data.format.num_train=48", "data.format.num_eval=8"]
WARM = ["model.warm_start.steps=2", "model.warm_start.batch_size=4"]


def _key(overrides: list[str], data: list[str] = SMALL) -> str:
    """The cache key a run with these overrides computes, its initial policy built as
    train.build builds it: loaded, warm-started, then wrapped with LoRA when asked."""
    from conftest import FAST, QUIET, make_config

    from dpo_cli.config import validate
    from dpo_cli.data.prepare import prepare
    from dpo_cli.lora import apply_lora
    from dpo_cli.modeling import load_model, load_tokenizer
    from dpo_cli.refcache import entry_key
    from dpo_cli.warmstart import warm_start

    fast = [o for o in FAST if not o.startswith("data.format.")]  # `data` says which data
    cfg = validate(make_config([*QUIET, *fast, *data, *overrides]))
    tokenizer = load_tokenizer(cfg.model)
    data = prepare(cfg.data, tokenizer, cfg.train.seed)
    policy = load_model(cfg.model, tokenizer, cfg.train.seed)
    if cfg.model.warm_start.steps:
        warm_start(policy, data.train, cfg.model.warm_start, cfg.train.seed, tokenizer.pad_token_id)
    if cfg.model.lora.r is not None:
        policy = apply_lora(policy, cfg.model.lora, False)
    return entry_key(cfg, tokenizer, policy, data.train, data.eval, "cpu", {})[0]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> list[str]:
    """A saved tiny model and pair files that do not depend on train.seed (the built-in
    task draws its pairs from it), as overrides."""
    import json

    from test_architectures import save_tiny_model

    from dpo_cli.data.formats.synthetic import make_pairs

    root = tmp_path_factory.mktemp("pretrained")
    for name, n, seed in (("train", 48, 1), ("eval", 8, 2)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in make_pairs(n, seed, 3, 5)))
    model = save_tiny_model(root / "m")
    return ["model=pretrained", f"model.name_or_path={model}", "data=pairs", f"data.path={root / 'train.jsonl'}",
            f"data.eval_path={root / 'eval.jsonl'}", "data.max_length=32", "data.max_prompt_length=16"]  # fmt: skip


@pytest.mark.parametrize(
    ("base", "change"),
    [
        (WARM, ["model.warm_start.steps=3"]),
        (WARM, ["model.warm_start.lr=3e-3"]),
        (WARM, ["model.warm_start.batch_size=6"]),
        (WARM, ["model.warm_start.responses=chosen"]),
        (WARM, ["train.seed=7"]),  # random init and warm start
        ([], ["train.seed=7"]),  # random init alone
        ([], ["model.random_init.hidden_size=64"]),
        (WARM, ["model.random_init.num_hidden_layers=1"]),
        ([], ["reference.dtype=bfloat16"]),
        (WARM, ["reference.dtype=bfloat16"]),
        ([], ["data.format.num_train=40"]),
        (WARM, ["data.max_length=24"]),
    ],
    ids=lambda v: " ".join(v) or "no warm start",
)
def test_each_input_of_the_reference_changes_the_key(base, change):
    same = _key(base)
    assert _key(base) == same, "the same inputs must give the same key"
    assert _key([*base, *change]) != same


def test_a_pretrained_models_warm_start_and_its_seed_change_the_key(pretrained):
    plain = _key([], pretrained)
    warm = _key(WARM, pretrained)
    assert len({plain, warm, _key([*WARM, "train.seed=7"], pretrained)}) == 3
    assert _key(WARM, pretrained) == warm
    # Without a warm start the seed does not touch a pretrained reference: a cache hit.
    assert _key(["train.seed=7"], pretrained) == plain


def test_the_lora_adapter_is_not_part_of_the_reference():
    """Under LoRA the reference is the base with the adapter off: its key is the base's, the
    adapter's settings and values left out."""
    import torch

    from dpo_cli.refcache import tensors_digest

    warm = _key(WARM)
    assert _key([*WARM, "model.lora.r=4"]) == warm
    assert _key([*WARM, "model.lora.r=8", "model.lora.target_modules=[q_proj]"]) == warm
    from conftest import make_config

    from dpo_cli.config import validate
    from dpo_cli.lora import apply_lora
    from dpo_cli.modeling import byte_tokenizer, load_model

    cfg = validate(make_config(["model.lora.r=4"]))
    policy = apply_lora(load_model(cfg.model, byte_tokenizer(), 0), cfg.model.lora, False)
    before = tensors_digest(policy)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_()
    assert tensors_digest(policy) == before
    with torch.no_grad():
        next(p for n, p in policy.named_parameters() if "lora_" not in n).add_(1e-3)
    assert tensors_digest(policy) != before
