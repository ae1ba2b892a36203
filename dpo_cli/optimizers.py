"""Low-memory AdamW from bitsandbytes (8-bit, paged) and torchao (8-bit, 4-bit, CPU offload).

Each is a conf/optimizer/<name>.yaml naming its class in `_target_`, like torch's optimizers. The
files extend no /schema/ node: a schema registered at start-up would import bitsandbytes and
torchao (about 3 s each) on every command. Their keys are checked against the class's signature
when the config is validated (`config.typed_node`, `config.target_key_problems`), which imports
the package only when it is chosen. Here: the checks that refuse an optimizer this machine
cannot run (`optimizer_problems`), before any weights load, and how many bytes per trainable
parameter each keeps (`state_size`, which the memory estimate reads).

This module imports neither library at import time (torchao brings torch's inductor with it).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch

from dpo_cli.distributed import world_size_from_env
from dpo_cli.schema import TrainConfig

# The pip requirement for each optional optimizer package (what `make install` installs).
PACKAGES = {"bitsandbytes": "bitsandbytes>=0.50.2", "torchao": "dpo-cli[torchao]"}
# bitsandbytes' 8-bit optimizers quantize each state in blocks of this many values, with a float32
# absmax per block and a 256-entry float32 code map per state and tensor.
BNB_BLOCK = 256
QMAP_BYTES = 256 * 4
# torchao quantizes only tensors of at least this many values (and a multiple of block_size).
AO_MIN_SIZE = 4096
OFFLOAD = "dpo_cli.optimizers.cpu_offload_adamw"


def cpu_offload_adamw(
    params: Any,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    amsgrad: bool = False,
    offload_gradients: bool = False,
    minimal_size: int = 4096,
) -> torch.optim.Optimizer:
    """torch.optim.AdamW stepping on the CPU with its states in host RAM (torchao's
    CPUOffloadOptimizer): each parameter of at least `minimal_size` values is copied to pinned
    host memory with its gradient, which a backward hook copies there as soon as it is
    accumulated; the step runs on the CPU and the parameter is copied back. Smaller parameters
    keep an AdamW of their own on the device. `offload_gradients` frees the device gradient
    after its copy (not with gradient accumulation). A function, not a subclass, so that
    torchao is imported only when this optimizer is built; its keys are this signature's."""
    from torchao.optim import CPUOffloadOptimizer

    return CPUOffloadOptimizer(
        params,
        torch.optim.AdamW,
        offload_gradients=offload_gradients,
        minimal_size=minimal_size,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
    )


def package_of(target: str) -> str | None:
    """The optional package a `_target_` needs (bitsandbytes, torchao), or None."""
    root = target.partition(".")[0]
    if root in PACKAGES:
        return root
    return "torchao" if target == OFFLOAD else None


def missing_package(target: str) -> str | None:
    """The optional package a `_target_` needs when it is not installed, else None."""
    package = package_of(target)
    return package if package is not None and importlib.util.find_spec(package) is None else None


def run_device() -> str:
    """The device type a run on this machine trains on (as accelerate picks it): cuda, xpu,
    mps, ... or cpu."""
    accel = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    if accel is not None:
        return accel.type
    return "cuda" if torch.cuda.is_available() else "cpu"


def optimizer_problems(fields: dict[str, Any], device: str, train: TrainConfig) -> list[str]:
    """What refuses the optimizer node `fields` on `device` before any weights load: its package
    missing (with the pip command), a bitsandbytes optimizer on a device bitsandbytes has no
    kernel for, CPU offload where it cannot run or would skip a setting. Empty when none: the
    node's keys are then checked against its signature and the object built (config.py)."""
    target = str(fields.get("_target_", ""))
    package = package_of(target)
    if package is None:
        return []
    if missing_package(target):
        return [
            f"optimizer._target_={target} needs the {package} package, which is not installed; "
            f"install it with: pip install '{PACKAGES[package]}' (or choose optimizer=adamw)"
        ]
    if package == "bitsandbytes":
        return bnb_problems(target, device)
    if target == OFFLOAD:
        return offload_problems(fields, device, train)
    return []


def bnb_kernels(target: str) -> list[str]:
    """The bitsandbytes operators a bitsandbytes optimizer steps with: the 32-bit update, and for
    an 8-bit one the blockwise 8-bit update too (parameters under min_8bit_size use the 32-bit)."""
    ops = ["bitsandbytes::optimizer_update_32bit"]
    if "8bit" in target.rpartition(".")[2]:
        ops.append("bitsandbytes::optimizer_update_8bit_blockwise")
    return ops


def bnb_problems(target: str, device: str) -> list[str]:
    """A refusal when bitsandbytes has no kernel on `device` for an operator the optimizer uses.
    Asked of bitsandbytes' own operators in torch's dispatcher (they register a kernel per device
    type they support, CUDA's only when a CUDA device is present), not of a hard-coded list."""
    import bitsandbytes

    key = torch._C._dispatch_key_for_device(device)
    missing = [
        op
        for op in bnb_kernels(target)
        if not any(torch._C._dispatch_has_kernel_for_dispatch_key(op, k) for k in (key, "CompositeExplicitAutograd"))
    ]
    if not missing:
        return []
    return [
        f"optimizer._target_={target}: bitsandbytes {bitsandbytes.__version__} has no {', '.join(missing)} kernel "
        f"for this machine's {device} device, so the optimizer cannot step here; choose optimizer=adamw or "
        "optimizer=ao_adamw8bit"
    ]


def sync_offloaded(optimizer: Any) -> None:
    """After a checkpoint restored the parameters in place: torchao's CPUOffloadOptimizer steps a
    host copy of each offloaded parameter, taken when it was built, and copies it back; its
    load_state_dict restores the AdamW states only. The copies are refreshed from the restored
    parameters, or the first resumed step would undo the training before the checkpoint. Any
    other optimizer is left as it is."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    with torch.no_grad():
        for device_param, host_param in getattr(inner, "param_d2h_map", {}).items():
            host_param.copy_(device_param.detach())


def offload_problems(fields: dict[str, Any], device: str, train: TrainConfig) -> list[str]:
    """CPU offload needs a CUDA (or XPU) device to offload from, and copies each gradient to the
    host inside backward, before clipping and fp16 unscaling change it: both would be skipped for
    the offloaded parameters without a word, so they are refused, as is offload_gradients with
    gradient accumulation (the device gradient is freed after the first micro batch). One process
    only: the hook copies each process's own gradient, before DDP averages it, so processes
    would train apart."""
    p = []
    processes = world_size_from_env()
    if processes > 1:
        p.append(
            f"optimizer=cpu_offload_adamw copies each gradient to the host before the {processes} processes average "
            "it, so each would train on its own gradients; launch one process (torchao's CPUOffloadOptimizer is "
            "for single-GPU training), or choose optimizer=adamw8bit"
        )
    if device not in ("cuda", "xpu"):
        return p + [
            f"optimizer=cpu_offload_adamw moves the optimizer state from a GPU to host RAM; this machine trains on "
            f"{device}, where there is nothing to offload (torchao's CPUOffloadOptimizer needs CUDA or XPU); "
            "choose optimizer=adamw"
        ]
    if train.max_grad_norm is not None:
        p.append(
            "optimizer=cpu_offload_adamw copies each gradient to the host during backward, before clipping: "
            f"train.max_grad_norm={train.max_grad_norm} would not clip the offloaded parameters; "
            "set train.max_grad_norm=null"
        )
    if train.mixed_precision == "fp16":
        p.append(
            "optimizer=cpu_offload_adamw copies each gradient to the host before the fp16 loss scale is removed; "
            "use train.mixed_precision=bf16 or no"
        )
    if fields.get("offload_gradients") and train.batch_size > train.micro_batch_size:
        p.append(
            "optimizer.offload_gradients=true frees each gradient after the first micro batch, which gradient "
            f"accumulation (train.batch_size={train.batch_size} > train.micro_batch_size={train.micro_batch_size}) "
            "adds to; set optimizer.offload_gradients=false or train.micro_batch_size=train.batch_size"
        )
    return p


@dataclass(frozen=True)
class StateSize:
    """What an optimizer keeps for each trainable parameter: `states` tensors of its size, each of
    `state_bytes` bytes per value (None: in the parameter's own dtype), held on the training
    device or in host RAM (`on_host`), plus `host_copies` host copies of the parameter (and its
    gradient) in its dtype; `what` says so in a line, `where` where the states live."""

    states: int
    state_bytes: float | None
    what: str
    where: str = "optimizer states on the training device"
    on_host: bool = False
    host_copies: int = 0

    def bytes(self, numel: int, param_bytes: int) -> int:
        """Bytes of state for `numel` trainable parameters taking `param_bytes` bytes."""
        if self.state_bytes is None:
            return self.states * param_bytes
        return round(self.states * self.state_bytes * numel)

    def device_bytes(self, numel: int, param_bytes: int) -> int:
        return 0 if self.on_host else self.bytes(numel, param_bytes)

    def host_bytes(self, numel: int, param_bytes: int) -> int:
        return self.bytes(numel, param_bytes) + self.host_copies * param_bytes if self.on_host else 0


def state_size(fields: dict[str, Any]) -> StateSize | None:
    """The StateSize of the low-memory optimizers this module offers (None for another target):
    8-bit states take 1 byte per value plus a float32 scale per block (bitsandbytes: blocks of
    256 and an absmax each; torchao: `block_size`, 256 by default), 4-bit ones half a byte plus a
    float32 scale per block (torchao's default block: 128)."""
    target = str(fields.get("_target_", ""))
    name = target.rpartition(".")[2]
    states = 2 + bool(fields.get("amsgrad", False))
    if target.startswith("bitsandbytes.optim."):
        return _bnb_size(name, fields)
    if target.startswith("torchao.optim.") and name in ("AdamW8bit", "AdamW4bit"):
        bits = 8 if name == "AdamW8bit" else 4
        block = int(fields.get("block_size", 256 if bits == 8 else 128))
        what = (
            f"{name}: {states} states per trainable parameter in {bits} bits + a float32 scale per block of "
            f"{block} ({bits / 8:g} + 4/{block} bytes each); tensors under {AO_MIN_SIZE} values (or not a "
            "multiple of the block) keep them in their dtype"
        )
        return StateSize(states, bits / 8 + 4 / block, what)
    if target == OFFLOAD:
        what = f"AdamW offloaded to the CPU: {states} states per trainable parameter, in host RAM (0 on the device)"
        where = (
            f"optimizer states in host RAM (torchao CPUOffloadOptimizer): {states} AdamW states and a pinned copy "
            "of each parameter and of its gradient, in its dtype; parameters under optimizer.minimal_size "
            f"({fields.get('minimal_size', 4096)}) values keep theirs on the device"
        )
        return StateSize(states, None, what, where, on_host=True, host_copies=2)
    return None


def _bnb_size(name: str, fields: dict[str, Any]) -> StateSize:
    """bitsandbytes' AdamW variants: 8-bit blockwise, or 32-bit (float32 states whatever the
    parameter's dtype); paged ones allocate the states in CUDA unified memory."""
    paged = name.startswith("Paged")
    where = (
        "optimizer states on the training device, paged (CUDA unified memory: moved to host RAM when the "
        "GPU runs short; on a CPU bitsandbytes does not page)"
        if paged
        else "optimizer states on the training device"
    )
    if "8bit" in name:
        small = fields.get("min_8bit_size", 4096)
        what = (
            f"{name}: 2 states per trainable parameter in 8 bits + a float32 absmax per block of {BNB_BLOCK} "
            f"(1 + 4/{BNB_BLOCK} bytes each); tensors under min_8bit_size={small} values keep float32 states"
        )
        return StateSize(2, 1 + 4 / BNB_BLOCK, what, where)
    return StateSize(2, 4.0, f"{name}: 2 float32 states per trainable parameter", where)


def tensor_bytes(value: torch.Tensor) -> int:
    """The bytes a tensor holds; a tensor subclass (torchao's quantized states) by the plain
    tensors inside it, since its own numel and dtype describe the values it stands for."""
    if type(value) is torch.Tensor or not hasattr(value, "__tensor_flatten__"):
        return value.nbytes
    return sum(tensor_bytes(getattr(value, name)) for name in value.__tensor_flatten__()[0])


def state_bytes(state: Any) -> int:
    """The bytes of every tensor in an optimizer's state (or state_dict), nested dicts and lists
    included (bitsandbytes keeps its quantization state in one)."""
    if isinstance(state, torch.Tensor):
        return tensor_bytes(state)
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0
