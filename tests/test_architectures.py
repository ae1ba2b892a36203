"""Pretrained causal LMs of every common architecture, loaded from a local directory.

Each model is a tiny random one (hidden 32, 2 layers) built from its transformers config class
and saved with `save_pretrained`, so nothing is downloaded; what is tested is our loading and
training path (`model=pretrained model.name_or_path=DIR`), not the weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import transformers
from conftest import make_config, read_metrics
from torch.testing import assert_close

from dpo_cli.config import validate
from dpo_cli.data.collate import collate
from dpo_cli.errors import ConfigError
from dpo_cli.logprobs import batch_logps
from dpo_cli.modeling import attention_problem, byte_tokenizer, load_model, load_tokenizer

LLAMA_LIKE = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
GEMMA = dict(LLAMA_LIKE, head_dim=8, sliding_window=16)  # the default head_dim is 256
OPT = dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32)
# transformers config class and the kwargs that make it tiny.
ARCHITECTURES = {
    "llama": ("LlamaConfig", LLAMA_LIKE),
    "qwen2": ("Qwen2Config", LLAMA_LIKE),
    "qwen3": ("Qwen3Config", dict(LLAMA_LIKE, head_dim=8)),
    "mistral": ("MistralConfig", LLAMA_LIKE),
    "gemma2": ("Gemma2Config", GEMMA),
    "gemma3": ("Gemma3TextConfig", GEMMA),  # text-only: Gemma3ForCausalLM
    "phi3": ("Phi3Config", LLAMA_LIKE),
    # Dropout on by default in these three (0.1): the first loss is log 2 only if it is switched off.
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4)),
    "gpt_neox": ("GPTNeoXConfig", dict(LLAMA_LIKE, hidden_dropout=0.1, attention_dropout=0.1)),  # Pythia
    "opt": (
        "OPTConfig",
        dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32),
    ),
    # ALiBi: position biases from the row itself, not from position ids (padded rows only).
    # Bloom takes no position ids and has no sdpa; Falcon takes them but ignores them with alibi.
    "bloom": ("BloomConfig", dict(hidden_size=32, n_layer=2, n_head=4)),
    "falcon_alibi": ("FalconConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True)),
    # Global and local layers; the local ones apply their window by column (no prompt sharing).
    "gpt_neo": (
        "GPTNeoConfig",
        dict(hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]], window_size=16),
    ),
}
POSITIONS = 64
# Two optimizer steps of 4 pairs on the built-in task, every step logged, evaluation on 4 pairs.
TRAIN = [
    "train.max_steps=2",
    "train.batch_size=4",
    "logger.log_every=1",
    "data.format.num_train=32",
    "data.format.num_eval=4",
]


def save_tiny_model(path: Path, arch: str = "llama", pad_token: bool = True, dtype=torch.float32, **config) -> Path:
    """Write a tiny random `arch` model with the byte tokenizer to `path`, as save_pretrained does.
    `pad_token=False` saves a tokenizer without one (as GPT-2's); `config` overrides the
    architecture's kwargs (dropout rates, ...)."""
    tokenizer = byte_tokenizer()
    if not pad_token:
        tokenizer.pad_token = None
    class_name, kwargs = ARCHITECTURES[arch]
    positions = "n_positions" if arch == "gpt2" else "max_position_embeddings"
    cfg = getattr(transformers, class_name)(
        **{**kwargs, positions: POSITIONS, **config},
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).to(dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def pretrained(path: Path, *overrides: str) -> list[str]:
    return ["model=pretrained", f"model.name_or_path={path}", *overrides]


def model_section(path: Path, *overrides: str):
    return make_config(pretrained(path, *overrides)).model


@pytest.mark.integration
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_architecture_trains_from_a_local_directory(train_run, tmp_path, arch):
    """With default settings: the attention back-end each model supports best (Gemma-2 and
    Bloom have no sdpa) and the layout it allows (ALiBi models: padded)."""
    model_dir = save_tiny_model(tmp_path / arch, arch, pad_token=arch != "gpt2")  # GPT-2 has no pad token
    _, run_dir = train_run(pretrained(model_dir, *TRAIN))
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows), rows
    # Policy == reference before the first update, and dropout is off: exactly log 2.
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-6, rows[0]
    saved = transformers.AutoConfig.from_pretrained(run_dir / "final")
    assert saved.model_type == transformers.AutoConfig.from_pretrained(model_dir).model_type


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path):
    model_dir = save_tiny_model(tmp_path / "gpt2", "gpt2", pad_token=False)
    tokenizer = load_tokenizer(model_section(model_dir))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id is not None


def _train_and_eval_logits(policy: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 2]])
    policy.train()
    with torch.no_grad():
        train_logits = policy(ids).logits
        policy.eval()
        return train_logits, policy(ids).logits


def test_dropout_rates_in_the_config_are_zeroed_before_the_model_is_built(tmp_path):
    """OPT applies dropout functionally with rates it copies from the config when its layers are
    built; setting nn.Dropout modules to p=0 afterwards (all that disable_dropout used to do)
    leaves them on, and the first loss is then not log 2 (the OPT case of the test above)."""
    model_dir = save_tiny_model(tmp_path / "opt", "opt")

    before_fix = load_model(model_section(model_dir, "model.disable_dropout=false"), None, 0)
    for module in before_fix.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    train_logits, eval_logits = _train_and_eval_logits(before_fix)
    assert not torch.equal(train_logits, eval_logits)  # still stochastic in train mode

    policy = load_model(model_section(model_dir), None, 0)
    assert (policy.config.dropout, policy.config.attention_dropout) == (0, 0)
    train_logits, eval_logits = _train_and_eval_logits(policy)
    assert torch.equal(train_logits, eval_logits)


def _collated_pairs() -> dict[str, torch.Tensor]:
    pairs = [
        {"prompt_ids": [1, 40, 41], "chosen_ids": [42, 43, 2], "rejected_ids": [44, 2]},
        {"prompt_ids": [1, 50], "chosen_ids": [51, 2], "rejected_ids": [52, 53, 54, 2]},
    ]
    return collate(pairs, pad_id=0)


def _layer_grads(policy: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    policy.get_input_embeddings().requires_grad_(False)  # frozen, as the base weights under LoRA
    policy.train()
    out = batch_logps(policy, _collated_pairs()).logps
    (out["chosen"].logps - out["rejected"].logps).sum().backward()
    layers = policy.model.layers
    return {name: p.grad for name, p in layers.named_parameters() if p.requires_grad}


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_checkpointed_blocks_get_gradients_with_frozen_embeddings(tmp_path):
    model_dir = save_tiny_model(tmp_path / "llama")
    policy = load_model(model_section(model_dir, "model.gradient_checkpointing=true"), None, 0)
    assert all(layer.gradient_checkpointing for layer in policy.model.layers)
    grads = _layer_grads(policy)
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values()), grads.keys()

    # The defect this guards against: reentrant checkpointing (transformers' default before v5)
    # gives blocks no gradient when nothing makes their inputs require grad.
    plain = load_model(model_section(model_dir), None, 0)
    plain.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    plain.disable_input_require_grads()  # transformers < 5 did not enable it
    with pytest.warns(UserWarning, match="requires_grad"):
        assert all(g is None for g in _layer_grads(plain).values())


@pytest.mark.integration
def test_gradient_checkpointing_trains_to_the_same_losses(train_run, tmp_path):
    model_dir = save_tiny_model(tmp_path / "llama")
    losses = {}
    for on in ("true", "false"):
        _, run_dir = train_run(pretrained(model_dir, *TRAIN, f"model.gradient_checkpointing={on}"), tmp_path / on)
        losses[on] = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    assert len(losses["true"]) == 2
    assert_close(losses["true"], losses["false"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dtype_loads_the_weights_in_that_dtype(tmp_path, dtype):
    model_dir = save_tiny_model(tmp_path / "llama")
    policy = load_model(model_section(model_dir, f"model.dtype={dtype}"), None, 0)
    assert policy.dtype == getattr(torch, dtype)


def test_dtype_auto_is_the_checkpoints_own_or_float32_for_random_init(tmp_path):
    model_dir = save_tiny_model(tmp_path / "bf16", dtype=torch.bfloat16)
    assert load_model(model_section(model_dir, "model.dtype=auto"), None, 0).dtype == torch.bfloat16
    assert load_model(model_section(model_dir, "model.dtype=float32"), None, 0).dtype == torch.float32
    cfg = make_config(["model.dtype=auto"])  # model=tiny: random_init
    assert load_model(cfg.model, load_tokenizer(cfg.model), 0).dtype == torch.float32


def test_attention_implementations_give_the_same_logps(tmp_path):
    model_dir = save_tiny_model(tmp_path / "llama")
    batch = _collated_pairs()
    logps = {}
    for impl in ("sdpa", "eager", "null"):
        policy = load_model(model_section(model_dir, f"model.attn_implementation={impl}"), None, 0).eval()
        assert policy.config._attn_implementation == ("sdpa" if impl == "null" else impl)  # null: transformers' pick
        with torch.no_grad():
            logps[impl] = batch_logps(policy, batch).logps["chosen"].logps
    assert_close(logps["sdpa"], logps["eager"], atol=1e-5, rtol=0)


def test_unknown_attention_implementation_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        validate(make_config(["model.attn_implementation=flash"]))
    (problem,) = info.value.problems
    assert "model.attn_implementation='flash' is not one of sdpa, eager, flash_attention_2" in problem


def test_flash_and_flex_attention_need_what_they_run_on(monkeypatch):
    import importlib.util

    def machine(gpu: bool, package: bool) -> str | None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
        monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if package else None)
        return attention_problem("flash_attention_2")

    assert machine(gpu=True, package=True) is None
    no_package = machine(gpu=True, package=False)
    assert "the flash_attn package (pip install flash-attn" in no_package and "a CUDA GPU" not in no_package
    assert "leave model.attn_implementation unset (null:" in no_package  # sdpa would fail on Gemma-2
    no_gpu = machine(gpu=False, package=True)
    assert "a CUDA GPU (none found)" in no_gpu and "flash_attn" not in no_gpu
    monkeypatch.setattr("dpo_cli.distributed.cpu_only", lambda: True)
    assert "flex_attention cannot train on a CPU" in attention_problem("flex_attention")
    monkeypatch.undo()
    if not torch.cuda.is_available():  # this machine, through validate: before any weights load
        with pytest.raises(ConfigError, match="flash_attention_2 needs a CUDA GPU"):
            validate(make_config(["model.attn_implementation=flash_attention_2"]))
