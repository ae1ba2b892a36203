"""The memory estimate (dpo_cli/memory.py): parameter counts from the meta device equal the real
model's, each reference source is counted as what it holds, and the formulas move as stated."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST, QUIET, make_config
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_preflight import HH_SAMPLE, weightless_model

from dpo_cli import memory, preflight
from dpo_cli.config import validate
from dpo_cli.errors import ModelLoadError, UserError
from dpo_cli.modeling import byte_tokenizer, count_parameters, load_model

# The tiny model (conf/model/tiny.yaml) on the synthetic data: data.max_length=32.
BASE = [*QUIET, *FAST]  # train.micro_batch_size=4: N = 8 sequences


def estimate_for(overrides: list[str], tokenizer=None, capacity_bytes: int | None = 1 << 40):
    cfg = make_config([*BASE, *overrides])
    tokenizer = tokenizer or byte_tokenizer()
    return memory.estimate(cfg, tokenizer, instantiate(cfg.loss), capacity_bytes=capacity_bytes), cfg


def real_bytes(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad or not trainable_only)


@pytest.mark.parametrize("overrides", [[], ["model.random_init.model_type=gpt2"], ["model.dtype=bfloat16"]])
def test_meta_parameter_count_equals_the_real_models(overrides):
    """Full fine-tuning: every parameter trains; tied embeddings are counted once, as
    `parameters()` yields them once. GPT-2 reads hidden_size etc. through its attribute map."""
    est, cfg = estimate_for(overrides)
    tokenizer = byte_tokenizer()
    real = load_model(cfg.model, tokenizer, seed=0)
    trainable, total = count_parameters(real)
    assert (est.parameters, est.trainable_parameters) == (total, trainable)
    assert est.weights == real_bytes(real) and est.gradients == real_bytes(real, trainable_only=True)
    assert est.optimizer == 2 * est.gradients  # AdamW: exp_avg and exp_avg_sq, in the parameter's dtype


def test_lora_counts_the_adapters_as_peft_makes_them_on_the_real_model():
    from peft import LoraConfig, get_peft_model

    est, cfg = estimate_for(["model.lora.r=8"])
    real = load_model(cfg.model, byte_tokenizer(), seed=0)
    lora = cfg.model.lora
    peft_config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    real = get_peft_model(real, peft_config)
    trainable, total = count_parameters(real)
    assert (est.parameters, est.trainable_parameters) == (total, trainable)
    assert 0 < trainable < total / 5  # adapters only: the base is frozen
    assert est.gradients == real_bytes(real, trainable_only=True) and est.optimizer == 2 * est.gradients
    assert "counted by peft on the meta model" in est.what["weights"]


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
def test_the_shape_fallback_for_lora_agrees_with_peft(targets):
    """r * (in + out) per targeted linear layer. The tiny Llama (h=128, MLP 256, 2 layers, 4 kv
    heads of 32) with all-linear: per layer q, k, v, o 8*(128+128) each = 8192, gate and up
    8*(128+256) = 3072 each, down 3072: 17408 per layer, 34816 for two. [q_proj, v_proj]: 2 x 2 x 2048 = 8192."""
    from peft import LoraConfig, get_peft_model

    cfg = make_config([*BASE, "model.lora.r=8"])
    config = memory.model_config(cfg.model, byte_tokenizer())
    section = OmegaConf.to_object(cfg).model.lora
    section.target_modules = targets
    shapes = memory.lora_parameters(memory.meta_model(config, torch.float32), section)
    peft_model = get_peft_model(
        memory.meta_model(config, torch.float32), LoraConfig(r=8, target_modules=targets, task_type="CAUSAL_LM")
    )
    assert shapes == count_parameters(peft_model)[0] == (34816 if targets == "all-linear" else 8192)


def test_the_shape_fallback_is_used_when_peft_fails(monkeypatch):
    import peft

    def fail(*args, **kwargs):
        raise RuntimeError("no meta support")

    monkeypatch.setattr(peft, "get_peft_model", fail)
    est, _ = estimate_for(["model.lora.r=8"])
    assert est.trainable_parameters == 34816 and est.gradients == 4 * 34816  # adapters in float32
    assert "r*(in+out) each (peft on the meta model failed: no meta support)" in est.what["weights"]


def test_reference_lines_for_each_source(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    live, _ = estimate_for([])
    assert "frozen copy of the initial policy: 0.36M parameters in float32" in live.what["reference"]
    assert live.reference == live.weights
    half, _ = estimate_for(["reference.dtype=bfloat16"])
    assert half.reference == live.weights // 2 and "in bfloat16" in half.what["reference"]
    none, _ = estimate_for(["loss=simpo"])
    assert none.reference == 0 and none.what["reference"].startswith("none: no loss term needs")
    cached, _ = estimate_for(["reference.precompute=true"])
    assert cached.reference == 0 and cached.what["reference"].startswith("precomputed cache")
    adapter, _ = estimate_for(["model.lora.r=8"])
    assert adapter.reference == 0 and adapter.what["reference"].startswith("adapter disabled")

    ref_dir = tmp_path / "sft"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=256)  # fmt: skip
    sft = AutoModelForCausalLM.from_config(config)
    sft.save_pretrained(ref_dir)
    n = count_parameters(sft)[1]
    separate, _ = estimate_for([f"reference.name_or_path={ref_dir}"])
    assert separate.reference == 4 * n and f"separate model {ref_dir}" in separate.what["reference"]
    separate16, _ = estimate_for([f"reference.name_or_path={ref_dir}", "reference.dtype=bfloat16"])
    assert separate16.reference == 2 * n
    # A live reference model runs forward while the policy's logits are held: 4 copies, not 3
    # (full logits, train.logits_chunk=null).
    full = [
        estimate_for(o + ["train.logits_chunk=null"])[0] for o in ([], ["loss=simpo"], ["reference.precompute=true"])
    ]
    assert full[0].logits * 3 == full[1].logits * 4 == full[2].logits * 4
    suggests_precompute = ["reference.precompute=true" in " ".join(e.hints) for e in (live, none, cached)]
    assert suggests_precompute == [True, False, False]


def test_a_missing_model_or_reference_is_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match=r"reference.name_or_path=.*no such directory"):
        estimate_for([f"reference.name_or_path={tmp_path / 'nothing'}"])
    with pytest.raises(ModelLoadError, match=r"model.name_or_path=.*no such directory"):
        estimate_for(["model=pretrained", f"model.name_or_path={tmp_path / 'nothing'}"])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("no config.json here")
    with pytest.raises(ModelLoadError, match=r"model.name_or_path=.*notes'?: .*config"):
        estimate_for(["model=pretrained", f"model.name_or_path={tmp_path / 'notes'}"])


def test_the_warning_appears_when_the_device_is_too_small():
    fits, _ = estimate_for(["model.gradient_checkpointing=true"])
    assert fits.fits() and "WARNING" not in fits.report()
    est, _ = estimate_for(["model.gradient_checkpointing=true"], capacity_bytes=fits.total - 1)
    text = est.report()
    assert not est.fits() and "WARNING: the estimated" in text and "of the given capacity" in text
    assert "lower train.micro_batch_size" in text and "model.lora.r=16" in text and "reference.precompute=true" in text
    assert "model.gradient_checkpointing=true" not in text  # already set: not suggested
    assert "reference.dtype=bfloat16" in text


def test_the_report_lists_every_component_and_says_it_is_an_estimate():
    est, _ = estimate_for(["train.logits_chunk=null"])
    text = est.report()
    assert "memory estimate per training process (an estimate: real peak memory also includes allocator" in text
    for name in (*memory.COMPONENTS, "total", "device"):
        assert f"\n  {name} " in text, name
    assert "Korthikanti et al. 2022" in text and "N*T*V*4 bytes (float32) x 4" in text
    assert est.total == sum(getattr(est, c) for c in memory.COMPONENTS)


def test_logits_scale_linearly_in_micro_batch_and_vocabulary():
    """N*T*V*4 bytes x 4 copies (live reference): micro batch 4, T=32, V=259 (byte tokenizer):
    8 * 32 * 259 * 4 * 4 = 1,060,864 bytes."""
    full = ["train.logits_chunk=null"]
    small, _ = estimate_for(full)
    assert small.logits == 8 * 32 * 259 * 4 * 4
    double, _ = estimate_for(full + ["train.micro_batch_size=8"])
    assert double.logits == 2 * small.logits
    tokenizer = byte_tokenizer()
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(259)])  # 518 tokens: twice the vocabulary
    wide, _ = estimate_for(full, tokenizer=tokenizer)
    assert len(tokenizer) == 518 and wide.logits == 2 * small.logits


def test_the_chunked_head_holds_one_chunk_of_logits_whatever_the_batch():
    """train.logits_chunk=64: 64 positions x V=259 x 4 bytes x 2 (logits and their gradient),
    the same at micro batch 4 and 8; a chunk larger than the batch's N*T = 256 positions is cut to it."""
    chunked, _ = estimate_for(["train.logits_chunk=64"])
    assert chunked.logits == 64 * 259 * 4 * 2
    assert estimate_for(["train.logits_chunk=64", "train.micro_batch_size=8"])[0].logits == chunked.logits
    assert estimate_for(["train.logits_chunk=100000"])[0].logits == 8 * 32 * 259 * 4 * 2
    assert "the full logits never exist" in chunked.report()


def test_gradient_checkpointing_lowers_the_activation_estimate():
    """N=8 sequences x T=32 tokens = 256 tokens, h=128, 2 layers, float32 (2 x the 16-bit figure):
    full: 2 layers x 256*128*34*2 = 4,456,448; checkpointed: 2 x 256*128*4 (layer inputs)
    + one layer's 256*128*34*2 = 262,144 + 2,228,224 = 2,490,368."""
    full, _ = estimate_for([])
    ckpt, _ = estimate_for(["model.gradient_checkpointing=true"])
    assert full.activations == 4_456_448 and ckpt.activations == 2_490_368
    half, _ = estimate_for(["train.mixed_precision=bf16"])
    assert half.activations == full.activations // 2
    eager, _ = estimate_for(["model.attn_implementation=eager"])
    # + 5*a*T per token and layer (stored attention scores): 2 x 256 * 5*4*32 * 2 = 655,360.
    assert eager.activations == full.activations + 655_360 and "a*T*T" in eager.report()


def test_optimizer_states():
    def states(**node):
        return memory.optimizer_states(OmegaConf.create(node))

    assert states(_target_="torch.optim.AdamW").states == 2
    assert states(_target_="torch.optim.SGD").states == 0
    assert states(_target_="torch.optim.SGD", momentum=0.9).states == 1
    assert states(_target_="torch.optim.RMSprop", alpha=0.99).states == 1
    unknown = states(_target_="lion_pytorch.Lion")
    assert unknown.states == 2 and "unknown optimizer, assumed 2 states" in unknown.what
    assert states(_target_="bitsandbytes.optim.AdamW8bit").state_bytes == 1 + 4 / 256  # tests/test_optimizers.py
    rms, _ = estimate_for(["optimizer=rmsprop"])
    assert rms.optimizer == rms.gradients


def test_the_device_capacity_is_the_gpu_or_the_physical_ram():
    import psutil

    device, capacity = memory.device_capacity()
    if torch.cuda.is_available():
        assert device.startswith("GPU") and capacity == torch.cuda.mem_get_info()[1]
    else:
        assert device.startswith("CPU RAM") and capacity == psutil.virtual_memory().total


def test_the_preflight_reports_memory():
    text = preflight.run(validate(make_config([*BASE, "mode=inspect"])))
    assert "optimizer steps of" in text  # the data report comes first
    assert "\n\nmemory estimate per training process" in text and "\n  total " in text


def test_the_preflight_of_a_pretrained_model_counts_it_from_its_config_alone(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = weightless_model(tmp_path)  # config.json and a tokenizer, no weights
    args = ["model=pretrained", f"model.name_or_path={model_dir}", "data=hh", f"data.path={HH_SAMPLE}"]
    cfg = make_config([*QUIET, *args, "data.eval_holdout=2", "train.batch_size=4", "train.micro_batch_size=2"])
    text = preflight.run(validate(OmegaConf.merge(cfg, {"mode": "inspect"})))
    n = count_parameters(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)))[1]
    assert f"policy: {n / 1e6:.2f}M parameters in float32" in text
    est = memory.estimate(cfg, byte_tokenizer(), instantiate(cfg.loss), capacity_bytes=1 << 40)
    assert est.parameters == n


def test_the_preflight_of_a_missing_model_directory_is_still_one_clear_error(tmp_path):
    args = ["model=pretrained", f"model.name_or_path={tmp_path / 'nothing'}", "mode=inspect"]
    with pytest.raises(UserError, match=r"model.name_or_path=.*nothing'?: no such directory"):
        preflight.run(validate(make_config([*BASE, *args])))


def test_a_gguf_model_is_counted_from_the_files_metadata(tmp_path):
    """A Llama GGUF with h=64, 2 layers, MLP 96, vocabulary 300, tied head: embeddings 300*64 =
    19,200; per layer attention 4*64*64 = 16,384, MLP 3*64*96 = 18,432, two norms 128, so
    34,944; final norm 64: 19,200 + 2*34,944 + 64 = 89,152. Only the metadata is read."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    h, layers, heads, ff, vocab = 64, 2, 4, 96, 300
    w = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    w.add_context_length(256)
    w.add_embedding_length(h)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}" for i in range(vocab)])
    w.add_tensor("token_embd.weight", np.zeros((vocab, h), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    overrides = ["model=pretrained", f"model.name_or_path={tmp_path}", "model.gguf_file=tiny.gguf"]
    est, _ = estimate_for(overrides + ["train.logits_chunk=null"])
    assert est.parameters == 89_152 and est.weights == 4 * 89_152
    assert est.logits == 8 * 32 * vocab * 4 * 4  # V from the model's head, not the (byte) tokenizer
