"""Quantized base weights under LoRA (model.quantization, QLoRA) and the LoRA options DoRA,
rsLoRA and modules_to_save, with the real bitsandbytes (its 4-bit and 8-bit layers run on CPU)
and peft, on the tiny model (conf/model/tiny.yaml: Llama, h=128, MLP 256, 2 layers, 4 heads,
tied embeddings over the 259-token byte vocabulary)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import FAST, QUIET, make_config, read_metrics, train_once
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dpo_cli import memory
from dpo_cli.config import validate
from dpo_cli.errors import ConfigError
from dpo_cli.lmhead import Head, chunked_logps
from dpo_cli.lora import apply_lora
from dpo_cli.modeling import byte_tokenizer, load_model, quantized
from dpo_cli.modeling.quantize import is_quantized, merged_dequantized

QLORA = ["model.quantization.bits=4", "model.lora.r=8"]


def section(overrides: list[str]):
    """The typed model section for these overrides of the tiny model."""
    return OmegaConf.to_object(make_config([*QUIET, *FAST, *overrides])).model


def policy(overrides: list[str]) -> torch.nn.Module:
    """The policy as training builds it: loaded, quantized, wrapped with LoRA."""
    m = section(overrides)
    model = quantized(load_model(m, byte_tokenizer(), seed=0), m)
    return apply_lora(model, m.lora, gradient_checkpointing=False)


def batch(n: int = 2, t: int = 12) -> torch.Tensor:
    return torch.randint(3, 259, (n, t), generator=torch.Generator().manual_seed(0))


def logps(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs of `ids` (next-token), float32."""
    logits = model(ids).logits[:, :-1].float()
    return logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def step(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """One AdamW step on the log-likelihood of `ids`; returns the loss."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = -logps(model, ids).mean()
    loss.backward()
    optimizer.step()
    return loss.detach()


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


@pytest.mark.parametrize(
    "overrides, layer",
    [
        (["model.quantization.quant_type=nf4", "model.quantization.double_quant=true"], "Linear4bit"),
        (["model.quantization.bits=8"], "Linear8bitLt"),
    ],
)
def test_a_training_step_changes_only_the_adapters_and_the_base_stays_quantized(overrides, layer):
    """After a step: the loss is finite, every adapter tensor changed (lora_B starts at zero, so
    lora_A moves from the second step: two steps), no base tensor changed, and the base's linear
    layers are still bitsandbytes' quantized ones, their weights in 8 bits or packed 4 bits."""
    model = policy([*QLORA, *overrides])
    ids = batch()
    before = snapshot(model)
    losses = [step(model, ids) for _ in range(2)]
    assert all(torch.isfinite(loss) for loss in losses)
    after = snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    adapters = {k for k in before if "lora_" in k}
    assert adapters and changed == adapters
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert type(q_proj).__name__ == layer and is_quantized(model)
    assert q_proj.weight.dtype == (torch.int8 if layer == "Linear8bitLt" else torch.uint8)


@pytest.mark.gpu
@pytest.mark.parametrize("overrides", [[], ["model.quantization.bits=8", "model.lora.use_dora=true"]])
def test_a_step_on_a_gpu_changes_only_the_adapters(overrides):
    """On CUDA, bitsandbytes' own kernels: 4-bit QLoRA, and DoRA over 8-bit layers (refused on a
    CPU, where bitsandbytes fails inside it)."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (scripts/gpu/wheels.sh carries it)")
    model = policy([*QLORA, *overrides]).cuda()
    ids = batch().cuda()
    before = snapshot(model)
    losses = [step(model, ids) for _ in range(2)]
    assert all(torch.isfinite(loss) for loss in losses)
    after = snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed) and is_quantized(model)


def test_gradient_checkpointing_survives_quantizing_a_model_built_in_memory():
    """A random-init model is quantized by a save and reload, which builds new modules: the
    checkpointing that load_model switched on is switched on again, and the adapters train."""
    model = policy([*QLORA, "model.gradient_checkpointing=true"])
    assert model.get_base_model().is_gradient_checkpointing
    before = snapshot(model)
    step(model, batch())
    step(model, batch())
    after = snapshot(model)
    assert all(not torch.equal(before[k], after[k]) for k in before if "lora_" in k)


def test_the_reference_is_the_quantized_base_itself():
    """The adapter-disabled reference (reference.AdapterReference's forward) of a trained
    adapter gives exactly the log-probs of the quantized base before LoRA was applied."""
    m = section(QLORA)
    base = quantized(load_model(m, byte_tokenizer(), seed=0), m)
    ids = batch()
    with torch.no_grad():
        own = logps(base.eval(), ids)
    model = apply_lora(base, m.lora, gradient_checkpointing=False)
    for _ in range(2):
        step(model, ids)
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        reference = logps(model, ids)
    with torch.no_grad():
        trained = logps(model, ids)
    assert torch.equal(reference, own)
    assert not torch.equal(trained, own)  # the adapter is on again and has moved


def test_an_eval_forward_does_not_change_later_training_gradients():
    """bitsandbytes 0.50 repacks 4-bit weights for a bf16 kernel on a CPU with AVX512-BF16 at the
    first eval-mode forward without gradients, and that kernel lets no gradient through to the
    layer's input (quantize.exact_cpu_matmuls turns it off). The reference and evaluation make
    such forwards: training gradients afterwards must equal those of a model that never made one."""

    def grads(eval_first: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = policy(QLORA)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)  # non-zero, so that lora_A gets gradients
        ids = batch()
        if eval_first:
            with torch.no_grad():
                model.eval()(ids)
        model.train()
        logps(model, ids).mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, after_eval = grads(False), grads(True)
    assert all(torch.equal(plain[n], after_eval[n]) for n in plain)


def test_dora_and_rslora_change_the_layers_as_peft_says():
    """use_dora: peft's DoRA layer with a magnitude vector of out_features values per targeted
    layer; rslora: the update scaled by alpha / sqrt(r) = 16 / sqrt(4) = 8 (not alpha / r = 4)."""
    model = policy([*QLORA, "model.lora.r=4", "model.lora.use_dora=true", "model.lora.rslora=true"])
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert type(q_proj.lora_magnitude_vector["default"]).__name__ == "DoraLinearLayer"
    assert q_proj.lora_magnitude_vector["default"].weight.shape == (128,)
    assert q_proj.scaling["default"] == 8.0
    assert torch.isfinite(step(model, batch()))


def test_a_saved_lm_head_trains_its_copy_through_the_chunked_head():
    """model.lora.modules_to_save=[lm_head]: the chunked head (lmhead.Head) reads the trained
    copy's weight while the adapter is on and the original's while it is off (the reference);
    a step through it moves the copy, never the original. The tiny model ties its embeddings:
    peft's ensure_weight_tying keeps the copy tied to the input embedding's copy."""
    model = policy([*QLORA, "model.lora.modules_to_save=[lm_head]"])
    head, why = Head.find(model, chunk=8)
    assert head is not None, why
    wrapper = model.get_base_model().lm_head
    copy, original = wrapper.modules_to_save["default"].weight, wrapper.original_module.weight
    assert head.linear.weight is copy and model.get_input_embeddings().weight is copy
    with model.disable_adapter():
        assert head.linear.weight is original
    before, original_before = copy.detach().clone(), original.detach().clone()
    ids = batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with head.capture() as hidden:
        model(ids)
    h = hidden()[:, :-1].reshape(-1, hidden().shape[-1])
    loss = -chunked_logps(h, head.linear.weight, head.linear.bias, ids[:, 1:].reshape(-1), chunk=8).mean()
    loss.backward()
    optimizer.step()
    assert not torch.equal(copy, before) and torch.equal(original, original_before)


def test_a_module_to_save_that_does_not_exist_is_refused():
    with pytest.raises(ConfigError, match=r"model.lora.modules_to_save=\['lm_haed'\]: this model has no module"):
        policy([*QLORA, "model.lora.modules_to_save=[lm_haed]"])


@pytest.mark.parametrize("bits, tolerance", [(4, 1e-5), (8, 2e-2)])
def test_the_merged_model_is_a_plain_model_with_the_quantized_models_outputs(tmp_path, bits, tolerance):
    """merged = dequantized base + adapter update, in float32 (model.quantization.compute_dtype's
    default: model.dtype), saved without a quantization_config, loaded by plain from_pretrained.
    4-bit: its logits equal the quantized model's within 1e-5 (the layers dequantize and multiply
    the same way; only summation order differs). 8-bit: LLM.int8() also rounds the activations
    to 8 bits in each matmul, which the merged model does not; measured max difference 6e-3 on
    logits of magnitude ~1 (tolerance 2e-2)."""
    from transformers import AutoModelForCausalLM

    model = policy([*QLORA, f"model.quantization.bits={bits}", "model.lora.modules_to_save=[lm_head]"])
    step(model, batch())
    step(model, batch())
    ids = batch()
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")
    merged = merged_dequantized(model, tmp_path / "adapter")
    merged.save_pretrained(tmp_path / "merged")
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(loaded.model.layers[0].self_attn.q_proj) is torch.nn.Linear and loaded.dtype == torch.float32
    with torch.no_grad():
        got = loaded(ids).logits
    assert (got - expected).abs().max() < tolerance


def test_the_quantized_size_formula_matches_bitsandbytes_own_tensors():
    """`memory.quantized_bytes` against what bitsandbytes holds per layer: the packed weight and
    its quant_state's tensors (absmax, code, and with double quantization the second level's)."""
    for overrides in (["model.quantization.double_quant=true"], ["model.quantization.double_quant=false"]):
        m = section([*QLORA, *overrides])
        model = quantized(load_model(m, byte_tokenizer(), seed=0), m)
        layer = model.model.layers[0].mlp.down_proj
        qs = layer.weight.quant_state
        tensors = [layer.weight, qs.absmax, qs.code]
        if qs.nested:
            tensors += [qs.state2.absmax, qs.state2.code, qs.offset]
        real = sum(t.numel() * t.element_size() for t in tensors)
        assert memory.quantized_bytes(128 * 256, 128, m.quantization) == real


# The tiny model's weights by hand. Quantized (4-bit, double quant): per layer q, k, v, o
# (128 x 128 = 16384 values: 8192 bytes + 256 uint8 absmax + 4 (1 second-level absmax) + 1024
# (256-value code) + 4 (offset) + 64 (16-value code) = 9544) and gate, up, down (32768 values:
# 16384 + 512 + 8 + 1024 + 4 + 64 = 17996): 4 x 9544 + 3 x 17996 = 92164; two layers 184328.
# In float32: embeddings (tied head) 259 x 128 = 33152 and norms 5 x 128 = 640 -> 135168 bytes.
# LoRA r=8 on every linear layer: 34816 values (test_memory.py) -> 139264 bytes.
QUANTIZED_4BIT, UNQUANTIZED, ADAPTERS = 184328, 4 * 33792, 34816
# DoRA: out_features per targeted layer: 4 x 128 + 2 x 256 + 128 = 1152 per layer, 2304.
DORA = 2304


@pytest.mark.parametrize(
    "overrides, weights, trainable",
    [
        ([], QUANTIZED_4BIT + UNQUANTIZED + 4 * ADAPTERS, ADAPTERS),
        (["model.lora.use_dora=true"], QUANTIZED_4BIT + UNQUANTIZED + 4 * (ADAPTERS + DORA), ADAPTERS + DORA),
        (  # a trained copy of the (tied) head and embedding: 33152 values more, trainable
            ["model.lora.modules_to_save=[lm_head]"],
            QUANTIZED_4BIT + UNQUANTIZED + 4 * (ADAPTERS + 33152),
            ADAPTERS + 33152,
        ),
        (  # 8-bit: a byte per value (4 x 16384 + 3 x 32768 = 163840 per layer) and a float32
            # scale per output row (4 x 128 + 2 x 256 + 128 = 1152 rows per layer)
            ["model.quantization.bits=8"],
            2 * (163840 + 4 * 1152) + UNQUANTIZED + 4 * ADAPTERS,
            ADAPTERS,
        ),
    ],
)
def test_the_memory_estimate_counts_quantized_weights_by_hand(overrides, weights, trainable):
    cfg = make_config([*QUIET, *FAST, *QLORA, *overrides])
    est = memory.estimate(cfg, byte_tokenizer(), instantiate(cfg.loss), capacity_bytes=1 << 40)
    assert est.weights == weights
    assert est.trainable_parameters == trainable
    assert est.gradients == 4 * trainable and est.optimizer == 2 * est.gradients  # float32 adapters, AdamW
    assert "-bit" in est.what["weights"]


def test_the_memory_estimate_agrees_with_the_real_quantized_model():
    """The estimate's weights equal the real model's bytes: quantized layers' tensors (weights and
    quant_state) plus every other parameter's."""
    cfg = make_config([*QUIET, *FAST, *QLORA])
    est = memory.estimate(cfg, byte_tokenizer(), instantiate(cfg.loss), capacity_bytes=1 << 40)
    model = policy(QLORA)
    real = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        real += p.numel() * p.element_size()
        if state is not None:
            real += sum(t.numel() * t.element_size() for t in (state.absmax, state.code))
            real += sum(t.numel() * t.element_size() for t in (state.state2.absmax, state.state2.code, state.offset))
    assert est.weights == real


@pytest.mark.parametrize(
    "overrides, env, message",
    [
        (["model.quantization.bits=4"], {}, "model.quantization.bits=4 needs LoRA.*set model.lora.r"),
        ([*QLORA, "model.quantization.bits=3"], {}, r"model.quantization.bits=3 is not one of 4, 8"),
        ([*QLORA, "model.quantization.quant_type=int4"], {}, "model.quantization.quant_type='int4' is not one of"),
        ([*QLORA, "model.quantization.bits=8", "model.quantization.quant_type=fp4"], {}, "are 4-bit settings"),
        pytest.param(
            [*QLORA, "model.quantization.bits=8", "model.lora.use_dora=true"],
            {},
            "fails on CPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="refused on CPU only"),
        ),
        ([*QLORA], {"ACCELERATE_USE_FSDP": "true"}, "under FSDP.*cannot shard.*DDP"),
        (
            [*QLORA],
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
            "under DeepSpeed ZeRO-3.*stage 1 or 2",
        ),
    ],
)
def test_what_cannot_run_is_refused_before_any_weights_load(monkeypatch, overrides, env, message):
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=message):
        validate(make_config([*QUIET, *FAST, *overrides]))


def test_a_zero_2_launch_is_allowed():
    """DeepSpeed ZeRO-2 partitions gradients and optimizer state only: the adapters'."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        mp.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        validate(make_config([*QUIET, *FAST, *QLORA]))


# --- one short run: 4-bit + LoRA + a saved lm_head, merged export, checkpoints every step -----

RUN = [*QLORA, "model.lora.modules_to_save=[lm_head]", "export.merge_lora=true", "train.max_steps=2"]
RUN += ["train.save_every=1", "train.eval_every=null"]


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    """The run, and the same run resumed from its step-1 checkpoint (as after a kill between
    the two steps: step 2's checkpoint and final/ gone)."""
    root = tmp_path_factory.mktemp("qlora")
    _, run_dir = train_once(root / "run", RUN)
    resumed = root / "resumed"
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-2")
    shutil.rmtree(resumed / "final")
    train_once(resumed, [*RUN, "train.resume=auto"])
    return run_dir, resumed


@pytest.mark.integration
def test_the_run_trains_from_log_2_and_resumes_bit_exactly(qlora_run):
    """Step 1's loss is log 2 (policy = reference: the quantized base, adapter off); the resumed
    run's step-2 metrics and final adapter equal the uninterrupted run's, bit for bit: the
    checkpoint holds the trainable tensors only, and the base is quantized again, identically."""
    run_dir, resumed = qlora_run
    first, second = read_metrics(run_dir)[:2]
    assert first["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    timing = ("time", "per_s", "tflops", "mfu")
    same = lambda row: {k: v for k, v in row.items() if not any(t in k for t in timing)}  # noqa: E731
    assert same(read_metrics(resumed)[1]) == same(second)
    final = "final/adapter_model.safetensors"
    assert (run_dir / final).read_bytes() == (resumed / final).read_bytes()


@pytest.mark.integration
def test_checkpoints_hold_the_trainable_tensors_only(qlora_run):
    from safetensors.torch import load_file

    state = load_file(qlora_run[0] / "checkpoints" / "step-1" / "model.safetensors")
    assert state and all("lora_" in k or "modules_to_save" in k for k in state)


@pytest.mark.integration
def test_the_merged_export_loads_without_bitsandbytes_and_matches_the_adapter(qlora_run):
    """final/merged loads with plain from_pretrained (no quantization_config); final/ (the
    adapter over its quantized base, final/base) gives the same log-probs within 1e-5."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    final = qlora_run[0] / "final"
    assert "quantization_config" not in json.loads((final / "merged" / "config.json").read_text())
    assert "quantization_config" in json.loads((final / "base" / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(final / "merged")
    adapter = AutoPeftModelForCausalLM.from_pretrained(final)
    ids = batch()
    with torch.no_grad():
        assert (logps(merged, ids) - logps(adapter.train(), ids)).abs().max() < 1e-5
