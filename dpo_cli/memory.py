"""A memory estimate before launch: what a training run will hold per process, from configs alone.

Parameter counts come from the model built on the meta device (shapes, no storage), so a 7B
model is counted exactly in seconds without reading its weights. Activations and logits are
formulas, not measurements: they say the order of magnitude and how it moves with the micro
batch, the length and gradient checkpointing. Real peak memory also includes the allocator's
overhead and fragmentation, the CUDA context and kernel workspaces.

accelerate, transformers, peft and psutil are imported inside the functions that use them:
the preflight needs them, the CLI's start-up does not.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, is_dataclass
from typing import Any

import torch

from dpo_cli.errors import ModelLoadError
from dpo_cli.modeling import DTYPES, model_config, reference_config, resolve_attention
from dpo_cli.modeling.options import LoraConfig, ModelConfig, QuantizationConfig, peft_kwargs
from dpo_cli.optimizers import StateSize, state_size
from dpo_cli.schema import Config, as_plain

GiB, MiB = 1024**3, 1024**2
# Config keys for the layer shape; the first one a config has counts (GPT-2 names them n_*).
HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")
LAYER_KEYS = ("num_hidden_layers", "n_layer")
HEAD_KEYS = ("num_attention_heads", "n_head")
# Logits: the policy's (N, T, V) float32 logits and their log-softmax are held for backward, where
# the gradient of the log-softmax is one more of the same size. A live reference model's forward
# runs while those are held and makes its own logits and log-softmax (no graph): one more each.
LOGIT_COPIES, LOGIT_COPIES_LIVE_REFERENCE = 3, 4
# With train.logits_chunk, only one chunk's float32 logits and their gradient exist at a time.
CHUNK_COPIES = 2


@dataclass
class MemoryEstimate:
    """Bytes per component for one training process, what each counts, and the device's capacity."""

    weights: int
    gradients: int
    optimizer: int
    reference: int
    activations: int
    logits: int
    what: dict[str, str]  # per component: what the figure counts
    parameters: int  # the policy's, adapters included
    trainable_parameters: int
    device: str
    capacity_bytes: int | None
    hints: list[str] = field(default_factory=list)  # settings that would lower the total
    notes: list[str] = field(default_factory=list)  # assumptions the figures rest on

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.reference + self.activations + self.logits

    def fits(self) -> bool:
        return self.capacity_bytes is None or self.total <= self.capacity_bytes

    def report(self) -> str:
        """A few aligned lines: each component, the total, the device, and a WARNING when the
        total exceeds the device's memory."""
        rows = [(name, getattr(self, name), self.what[name]) for name in COMPONENTS]
        lines = [
            "memory estimate per training process (an estimate: real peak memory also includes "
            "allocator overhead and fragmentation, the CUDA context and kernel workspaces):"
        ]
        lines += [f"  {name:<12}{human(size):>11}  {what}" for name, size, what in rows]
        lines.append(f"  {'total':<12}{human(self.total):>11}")
        capacity = human(self.capacity_bytes) if self.capacity_bytes is not None else "unknown"
        lines.append(f"  {'device':<12}{capacity:>11}  {self.device}")
        lines += [f"  note: {n}" for n in self.notes]
        if not self.fits():
            lines.append(
                f"WARNING: the estimated {human(self.total)} exceeds the {human(self.capacity_bytes or 0)} of "
                f"{self.device}; the run will likely run out of memory. To lower it: {'; '.join(self.hints)}"
            )
        return "\n".join(lines)


COMPONENTS = ("weights", "gradients", "optimizer", "reference", "activations", "logits")


def human(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def short_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_dtype(name: str | None, config: Any) -> torch.dtype:
    """`name` (float32, bfloat16, float16), or for auto the dtype the checkpoint's config names
    (float32 when it names none, as transformers then loads float32)."""
    if name in DTYPES:
        return DTYPES[name]
    named = getattr(config, "dtype", None)
    if isinstance(named, str):
        named = DTYPES.get(named)
    return named if isinstance(named, torch.dtype) else torch.float32


def meta_model(config: Any, dtype: torch.dtype, trust_remote_code: bool = False) -> torch.nn.Module:
    """The causal LM for `config` on the meta device: every parameter with its shape and dtype,
    no storage, so counting a large model costs nothing."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, ImportError) as e:
        raise ModelLoadError(f"could not build a causal LM from the config of {config.model_type!r}: {e}") from None
    # Under init_empty_weights the tying done at construction is lost (the head gets a meta
    # tensor of its own), which would count tied embeddings twice; tie again as loading does.
    model.tie_weights()
    return model.to(dtype)


def add_lora(model: torch.nn.Module, lora: LoraConfig) -> tuple[torch.nn.Module, str]:
    """`model` with peft's LoRA adapters (base frozen, adapters trainable), as training applies
    them; or, where peft cannot wrap the meta model, `model` with its parameters frozen and the
    adapter count computed from the target layers' shapes (returned as the second value)."""
    from peft import LoraConfig, get_peft_model

    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and embed is not None and head.weight is embed.weight
    peft_config = LoraConfig(**peft_kwargs(lora, tied))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft's notes on fan_in_fan_out etc.; not for this count
            return get_peft_model(model, peft_config), "peft on the meta model"
    except Exception as e:  # noqa: BLE001 - any peft failure falls back to the shape count
        model.requires_grad_(False)
        return model, f"from the target layers' shapes, r*(in+out) each (peft on the meta model failed: {e})"


def _linear_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, int, int]]:
    """(name, module, in, out) of every linear layer, GPT-2's transposed Conv1D ones included."""
    from transformers.pytorch_utils import Conv1D

    layers = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            layers.append((name, module, module.in_features, module.out_features))
        elif isinstance(module, Conv1D):
            layers.append((name, module, *module.weight.shape))
    return layers


def lora_parameters(model: torch.nn.Module, lora: LoraConfig) -> int:
    """LoRA's trainable parameters computed from shapes: r * (in + out) per targeted linear
    layer, plus its out_features DoRA magnitudes with use_dora, plus a whole copy of each module
    of modules_to_save. all-linear targets every linear layer but the output head, as peft does."""
    head = model.get_output_embeddings()
    total = 0
    for name, module, d_in, d_out in _linear_layers(model):
        if lora.target_modules == "all-linear":
            hit = module is not head
        else:
            names = [lora.target_modules] if isinstance(lora.target_modules, str) else list(lora.target_modules)
            hit = any(name == t or name.endswith(f".{t}") for t in names)
        total += (lora.r * (d_in + d_out) + (d_out if lora.use_dora else 0)) if hit else 0
    saved = set(lora.modules_to_save or [])
    copies = {
        id(p): p.numel() for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in saved for p in m.parameters()
    }
    return total + sum(copies.values())  # a weight shared by two saved modules (tied) is one copy


# bitsandbytes' 4-bit layout: one absmax per 64-weight block; double quantization stores those
# as 8 bits with one float32 absmax per 256 blocks, a 256-value float32 code and an offset.
QUANT_BLOCK, NESTED_BLOCK = 64, 256


def quantized_bytes(numel: int, out_features: int, q: QuantizationConfig) -> int:
    """The bytes bitsandbytes stores one linear weight of `numel` values in. 4-bit: two values
    per byte, a float32 absmax per block of 64 (or, with double quantization, a uint8 one plus
    the second level's constants) and the 16-value float32 code; 8-bit: one byte per value and
    a float32 scale per output row (LLM.int8()'s SCB)."""
    if q.bits == 8:
        return numel + 4 * out_features
    blocks = -(-numel // QUANT_BLOCK)
    if q.double_quant:
        constants = blocks + 4 * -(-blocks // NESTED_BLOCK) + 4 * NESTED_BLOCK + 4
    else:
        constants = 4 * blocks
    return -(-numel // 2) + constants + 4 * 16


def _quantized_weights(model: torch.nn.Module) -> dict[int, int]:
    """{id(weight): out_features} of the layers bitsandbytes quantizes: every linear layer but the
    output head (and what is tied to it), as transformers' quantizer leaves those out."""
    head = model.get_output_embeddings()
    kept = {id(p) for p in head.parameters()} if head is not None else set()
    return {
        id(m.weight): d_out for _, m, _, d_out in _linear_layers(model) if m is not head and id(m.weight) not in kept
    }


def _weight_bytes(params: list[torch.nn.Parameter], quantized: dict[int, int], q: QuantizationConfig) -> int:
    """The policy's weight bytes: quantized layers as `quantized_bytes` counts them; under
    quantization every other tensor in float32, where peft's prepare_model_for_kbit_training
    puts the unquantized base (embeddings, norms, head) and where the adapters and trained
    copies stay; without it, every tensor in its own dtype."""
    if q.bits is None:
        return _bytes(params)
    return sum(quantized_bytes(p.numel(), quantized[id(p)], q) if id(p) in quantized else 4 * p.numel() for p in params)


def optimizer_states(node: object) -> StateSize:
    """What the optimizer keeps per trainable parameter, and a line saying so: torch's optimizers
    keep whole tensors in the parameter's dtype; the low-memory ones (`dpo_cli.optimizers`) fewer
    bytes per value, or keep them in host RAM."""
    fields = as_plain(node) if is_dataclass(node) else dict(node) if isinstance(node, Mapping) else {}
    target = str(fields.get("_target_", ""))
    low = state_size(fields)
    if low is not None:
        return low
    name = target.rpartition(".")[2]
    momentum = bool(fields.get("momentum", 0))
    known = {
        "torch.optim.AdamW": 2 + bool(fields.get("amsgrad", False)),
        "torch.optim.Adam": 2 + bool(fields.get("amsgrad", False)),
        "torch.optim.SGD": int(momentum),
        "torch.optim.RMSprop": 1 + momentum + bool(fields.get("centered", False)),
        "torch.optim.Adagrad": 1,
    }
    if target in known:
        return StateSize(known[target], None, f"{name}: {known[target]} state(s) per trainable parameter, in its dtype")
    return StateSize(2, None, f"{target}: unknown optimizer, assumed 2 states per trainable parameter (as AdamW)")


def activation_bytes(
    config: Any, n_seqs: int, seq_len: int, element_bytes: int, checkpointing: bool, fused_attention: bool
) -> int:
    """Activations held for backward, after Korthikanti et al. 2022 ("Reducing Activation
    Recomputation in Large Transformer Models", Eq. 1): one transformer layer over N sequences
    of T tokens, hidden size h and a heads, stores about

        N * T * h * (34 + 5 * a * T / h)  bytes in 16-bit  (x2 in float32)

    where the 5aT/h term is the attention scores, softmax and its dropout mask; sdpa and
    flash attention do not store those (`fused_attention`), leaving 34 * N * T * h. With
    gradient checkpointing only each layer's input (N * T * h values) is kept, plus one layer's
    full activations while it is recomputed in backward. The model's L layers multiply the rest.
    It assumes a GPT-style layer (4h MLP); SwiGLU MLPs and grouped-query attention differ a little.
    """
    h, layers, heads = layer_shape(config)
    tokens = n_seqs * seq_len
    scores = 0 if fused_attention else 5 * heads * seq_len
    per_layer = tokens * (34 * h + scores) * element_bytes // 2
    if checkpointing:
        return layers * tokens * h * element_bytes + per_layer
    return layers * per_layer


def layer_shape(config: Any) -> tuple[int, int, int]:
    """(hidden size, layers, attention heads) of a transformers config; 0 for what it lacks."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config

    def first(keys: tuple[str, ...]) -> int:
        return next((getattr(text, k) for k in keys if getattr(text, k, None)), 0)

    return first(HIDDEN_KEYS), first(LAYER_KEYS), first(HEAD_KEYS)


def _activation_what(config: Any, n_seqs: int, seq_len: int, sixteen: bool, checkpointing: bool, fused: bool) -> str:
    """What the activation line counts, with its formula (see `activation_bytes`)."""
    h, layers, heads = layer_shape(config)
    full = ("34*N*T*h" if fused else "N*T*h*(34 + 5*a*T/h)") + ("" if sixteen else " x 2")
    if checkpointing:
        full = f"N*T*h*{2 if sixteen else 4} (layer inputs) + 1 x {full}"
    precision = "16-bit" if sixteen else "float32: 2 x the 16-bit figure"
    return (
        f"{layers} layers x {full} bytes ({precision}, Korthikanti et al. 2022); N={n_seqs} sequences "
        f"(2 x train.micro_batch_size), T={seq_len} (data.max_length), h={h}" + ("" if fused else f", a={heads}")
    )


def logits_bytes(n_seqs: int, seq_len: int, vocab: int, copies: int) -> int:
    """`copies` float32 (N, T, V) tensors: logits, log-softmax and more (see LOGIT_COPIES)."""
    return n_seqs * seq_len * vocab * 4 * copies


def device_capacity() -> tuple[str, int]:
    """The memory of the device training will use: the current CUDA device, else physical RAM."""
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        return f"GPU {index} ({torch.cuda.get_device_name(index)}; {human(free)} free now)", total
    import psutil

    return "CPU RAM (no CUDA device)", psutil.virtual_memory().total


def _bytes(params: list[torch.nn.Parameter]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _dtype_names(params: list[torch.nn.Parameter]) -> str:
    return "/".join(sorted({dtype_name(p.dtype) for p in params})) or "-"


def _policy(m: ModelConfig, tokenizer: Any) -> tuple[Any, dict[str, Any]]:
    """The policy's config and its counts, from the model on the meta device with LoRA applied:
    parameters, weight bytes, trainable parameters and their bytes, the output vocabulary."""
    config = model_config(m, tokenizer)
    dtype = resolve_dtype(m.dtype, config)
    model = meta_model(config, dtype, m.trust_remote_code and m.random_init is None)
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None else config.get_text_config().vocab_size
    base = list(model.parameters())
    c = dict(dtype=dtype, vocab=vocab, base_numel=sum(p.numel() for p in base), how=None)
    quantized = _quantized_weights(model) if m.quantization.bits is not None else {}
    if m.lora.r is not None:
        model, c["how"] = add_lora(model, m.lora)
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    fp32 = m.quantization.bits is not None  # prepare_model_for_kbit_training: the trainable copies in float32
    c.update(
        numel=sum(p.numel() for p in params),
        weights=_weight_bytes(params, quantized, m.quantization),
        trainable=sum(p.numel() for p in trainable),
        trainable_bytes=4 * sum(p.numel() for p in trainable) if fp32 else _bytes(trainable),
        trainable_dtype="float32" if fp32 and trainable else _dtype_names(trainable),
    )
    if m.lora.r is not None and not trainable:
        # peft could not wrap the meta model: adapters from shapes, in float32 as peft keeps
        # them (its autocast_adapter_dtype) even on a 16-bit base.
        adapters = lora_parameters(model, m.lora)
        c.update(trainable=adapters, trainable_bytes=4 * adapters, trainable_dtype="float32")
        c.update(numel=c["numel"] + adapters, weights=c["weights"] + 4 * adapters)
    return config, c


def _reference(
    cfg: Config, loss: Any, policy_numel: int, policy_dtype: torch.dtype
) -> tuple[int, str, bool, torch.dtype | None]:
    """(bytes, what, whether a reference model runs forward passes during training, the dtype
    of a reference model of its own)."""
    r = cfg.reference
    if not loss.requires_reference:
        return 0, "none: no loss term needs a reference model", False, None
    if r.precompute:
        return (
            0,
            "precomputed cache: log-probs computed before training; no reference model during training",
            False,
            None,
        )
    if r.name_or_path is not None:
        trust = cfg.model.trust_remote_code
        config = reference_config(r, trust)
        dtype = resolve_dtype(r.dtype or cfg.model.dtype, config)
        params = list(meta_model(config, dtype, trust).parameters())
        n = sum(p.numel() for p in params)
        what = f"separate model {r.name_or_path}: {short_count(n)} parameters in {dtype_name(dtype)}"
        return _bytes(params), what, True, dtype
    if cfg.model.lora.r is not None:
        return 0, "adapter disabled: the LoRA base model with its adapter off (no second copy)", True, None
    dtype = policy_dtype if r.dtype in (None, "auto") else DTYPES[r.dtype]
    what = f"frozen copy of the initial policy: {short_count(policy_numel)} parameters in {dtype_name(dtype)}"
    return policy_numel * dtype.itemsize, what, True, dtype


def _hints(cfg: Config, live_reference: bool, reference_dtype: torch.dtype | None) -> list[str]:
    """The settings that would lower the estimate, leaving out those already set."""
    m = cfg.model
    hints = [f"lower train.micro_batch_size (now {cfg.train.micro_batch_size}; activations and logits scale with it)"]
    if not m.gradient_checkpointing:
        hints.append("model.gradient_checkpointing=true (keeps one input per layer, recomputes the rest)")
    if m.lora.r is None:
        hints.append("model.lora.r=16 (train adapters only: no full gradients or optimizer state)")
    if m.quantization.bits is None:
        hints.append("model.quantization.bits=4 with LoRA (QLoRA: base linear layers in about 0.5 byte per weight)")
    if live_reference:
        hints.append("reference.precompute=true (no reference model during training)")
    if reference_dtype == torch.float32:
        hints.append("reference.dtype=bfloat16 (halves the reference's weights)")
    return hints


def _weights_dtype(m: ModelConfig, dtype: torch.dtype) -> str:
    """How the policy's weights are stored, for the estimate's weights line."""
    q = m.quantization
    if q.bits is None:
        return dtype_name(dtype)
    how = f"{q.quant_type}{' + double quant' if q.double_quant else ''}" if q.bits == 4 else "LLM.int8()"
    return f"{q.bits}-bit ({how}) linear layers, the rest float32 (model.quantization)"


def estimate(cfg: Config, tokenizer: Any, loss: Any, capacity_bytes: int | None = None) -> MemoryEstimate:
    """The memory one training process will hold, for the composed config `cfg`, the run's
    tokenizer and loss object (for `requires_reference`), without loading any weights.
    `capacity_bytes` replaces the device's memory (default: the current CUDA device's, else
    physical RAM). Raises ModelLoadError when a model's config cannot be had."""
    m = cfg.model
    config, c = _policy(m, tokenizer)
    states = optimizer_states(cfg.optimizer)
    ref_bytes, ref_what, live, ref_dtype = _reference(cfg, loss, c["base_numel"], c["dtype"])
    n_seqs, seq_len = 2 * cfg.train.micro_batch_size, cfg.data.max_length
    sixteen = c["dtype"] != torch.float32 or cfg.train.mixed_precision in ("bf16", "fp16")
    fused = resolve_attention(config, m.attn_implementation) != "eager"  # null: as loading resolves it
    act = activation_bytes(config, n_seqs, seq_len, 2 if sixteen else 4, m.gradient_checkpointing, fused)
    copies = LOGIT_COPIES_LIVE_REFERENCE if live else LOGIT_COPIES
    chunk = cfg.train.logits_chunk
    if chunk is None:
        logits = logits_bytes(n_seqs, seq_len, c["vocab"], copies)
        logits_what = f"N*T*V*4 bytes (float32) x {copies}, V={c['vocab']}: logits, log-softmax, its gradient" + (
            ", the reference's logits and log-softmax" if live else ""
        )
    else:  # the chunked head (dpo_cli.lmhead): one chunk's logits and their gradient at a time
        logits = logits_bytes(1, min(chunk, n_seqs * seq_len), c["vocab"], CHUNK_COPIES)
        logits_what = (
            f"C*V*4 bytes (float32) x {CHUNK_COPIES}, C=train.logits_chunk={chunk} positions, V={c['vocab']}: one "
            "chunk's logits and their gradient (the full logits never exist)"
        )
    lora = f"; LoRA r={m.lora.r} adapters, counted by {c['how']}" if m.lora.r is not None else ""
    what = {
        "weights": f"policy: {short_count(c['numel'])} parameters in {_weights_dtype(m, c['dtype'])}{lora}",
        "gradients": f"{short_count(c['trainable'])} trainable parameters in {c['trainable_dtype']}",
        "optimizer": states.what,
        "reference": ref_what,
        "activations": _activation_what(config, n_seqs, seq_len, sixteen, m.gradient_checkpointing, fused),
        "logits": logits_what,
    }
    if capacity_bytes is None:
        device, capacity_bytes = device_capacity()
    else:
        device = "the given capacity"
    estimate = MemoryEstimate(
        weights=c["weights"],
        gradients=c["trainable_bytes"],
        optimizer=states.device_bytes(c["trainable"], c["trainable_bytes"]),
        reference=ref_bytes,
        activations=act,
        logits=logits,
        what=what,
        parameters=c["numel"],
        trainable_parameters=c["trainable"],
        device=device,
        capacity_bytes=capacity_bytes,
    )
    estimate.hints = _hints(cfg, live, ref_dtype)
    host = states.host_bytes(c["trainable"], c["trainable_bytes"])
    estimate.notes.append(states.where + (f": {human(host)} of host RAM, not counted above" if host else ""))
    if not fused:
        estimate.notes.append("eager attention stores the T x T attention scores (a*T*T per sequence); sdpa does not")
    return estimate
