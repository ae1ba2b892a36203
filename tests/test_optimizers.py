"""Low-memory optimizers (conf/optimizer/, dpo_cli/optimizers.py): each builds from its YAML through
the real config path and steps with quantized states, its state goes through the checkpointer and
continues bit-equal, a resumed run equals the uninterrupted one, the memory estimate counts their
bytes, and what this machine cannot run is refused before any weights load."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import make_config, read_metrics, resumed_like_uninterrupted, train_once
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_memory import BASE, estimate_for

from dpo_cli import checkpoint, cli, memory, optimizers, options
from dpo_cli.config import typed, validate
from dpo_cli.errors import ConfigError
from dpo_cli.modeling import byte_tokenizer
from dpo_cli.schedule import make_scheduler
from dpo_cli.schema import TrainConfig

# Every option that steps on a CPU; conf/optimizer/cpu_offload_adamw.yaml needs a GPU (refused here).
CPU_OPTIONS = ["adamw8bit", "paged_adamw", "paged_adamw8bit", "ao_adamw8bit", "ao_adamw4bit"]
# Which of their states are quantized (at 8 or 4 bits) on a large enough tensor.
QUANTIZED = {"adamw8bit": 8, "paged_adamw8bit": 8, "ao_adamw8bit": 8, "ao_adamw4bit": 4}
CONF = Path(cli.config_dir()) / "optimizer"


def tiny() -> torch.nn.Linear:
    """A 64 x 128 weight (8192 values: at least bitsandbytes' min_8bit_size and torchao's 4096, so
    quantized) and a bias of 64 (too small: kept in 32 bits)."""
    torch.manual_seed(0)
    return torch.nn.Linear(128, 64)


def train_steps(model: torch.nn.Module, optimizer, scheduler, steps: range) -> None:
    """Optimizer steps `steps` of a fixed regression, each batch drawn from the step's own seed."""
    for step in steps:
        x = torch.randn(4, 128, generator=torch.Generator().manual_seed(step))
        model(x.to(model.weight.device)).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def prepared(cfg):
    """A fresh accelerator with the tiny model, the optimizer built from `cfg` and the run's
    schedule registered for checkpointing, as build.py does."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True)
    model = tiny()
    optimizer = instantiate(cfg.optimizer)(params=[p for p in model.parameters() if p.requires_grad])
    scheduler = make_scheduler(optimizer, "cosine", 1, 4)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    return accelerator, model, optimizer, scheduler


def weight_state(optimizer) -> dict:
    return optimizer.optimizer.state[optimizer.optimizer.param_groups[0]["params"][0]]


def state_bits(state: dict) -> int:
    """The bits per value of the first moment: bitsandbytes names it state1, torchao exp_avg (a
    tensor subclass holding its codes)."""
    first = state.get("state1", state.get("exp_avg"))
    name = type(first).__name__
    return {"OptimState8bit": 8, "OptimState4bit": 4}.get(name, first.element_size() * 8)


@pytest.mark.parametrize("name", CPU_OPTIONS)
def test_each_option_steps_and_resumes_bit_equal_through_the_checkpointer(name, tmp_path):
    """Built from conf/optimizer/<name>.yaml (composed and validated: keys checked against the
    class), 2 steps, a checkpoint (accelerate's save_state: torch.save of the state, tensor
    subclasses included), 2 more; a fresh model and optimizer loading it (torch.load with
    weights_only, as accelerate's load_state does) and taking the same 2 steps end bit-equal."""
    cfg = validate(make_config([f"optimizer={name}"]))
    assert cfg.optimizer["_target_"] == OmegaConf.load(CONF / f"{name}.yaml")["_target_"]
    accelerator, model, optimizer, scheduler = prepared(cfg)
    initial = model.weight.detach().clone()
    train_steps(model, optimizer, scheduler, range(2))
    assert state_bits(weight_state(optimizer)) == QUANTIZED.get(name, 32)
    checkpoint.save(accelerator, tmp_path, 2, {}, keep=None)
    train_steps(model, optimizer, scheduler, range(2, 4))
    assert not torch.equal(model.weight, initial)

    accelerator, resumed, optimizer, scheduler = prepared(cfg)
    checkpoint.load(accelerator, tmp_path / "checkpoints" / "step-2")
    train_steps(resumed, optimizer, scheduler, range(2, 4))
    assert torch.equal(resumed.weight, model.weight) and torch.equal(resumed.bias, model.bias)


def test_option_files_hold_only_values_that_differ_from_the_signature():
    for name in [*CPU_OPTIONS, "cpu_offload_adamw"]:
        raw = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
        schema = options.options_of(raw["_target_"], partial=True, skip=("params",))()
        assert [k for k, v in raw.items() if getattr(schema, k) == v] == ["_target_", "_partial_"], name


@pytest.mark.parametrize(
    ("name", "key"), [("adamw8bit", "fused"), ("paged_adamw", "foreach"), ("ao_adamw8bit", "fused")]
)
def test_arguments_the_class_does_not_take_are_refused(name, key):
    with pytest.raises(ConfigError, match=rf"optimizer\.{key} is not a parameter of") as e:
        validate(make_config([f"optimizer={name}", f"+optimizer.{key}=true"]))
    assert len(e.value.problems) == 1


@pytest.mark.parametrize(("name", "package"), [("adamw8bit", "bitsandbytes"), ("ao_adamw4bit", "torchao")])
def test_a_missing_package_is_one_message_with_the_pip_command(name, package, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now fails, as when not installed
    with pytest.raises(ConfigError) as e:
        validate(make_config([f"optimizer={name}"]))
    assert e.value.problems == [
        f"optimizer._target_={OmegaConf.load(CONF / f'{name}.yaml')._target_} needs the {package} "
        f"package, which is not installed; install it with: pip install '{optimizers.PACKAGES[package]}' "
        "(or choose optimizer=adamw)"
    ]


def test_bitsandbytes_is_asked_which_devices_its_optimizer_kernels_run_on():
    """bitsandbytes 0.50 registers its 8-bit optimizer update for CPU (and CUDA/XPU when present),
    not for Apple's MPS; its 32-bit update has a device-independent kernel."""
    assert optimizers.bnb_problems("bitsandbytes.optim.AdamW8bit", "cpu") == []
    (refusal,) = optimizers.bnb_problems("bitsandbytes.optim.PagedAdamW8bit", "mps")
    assert "no bitsandbytes::optimizer_update_8bit_blockwise kernel for this machine's mps device" in refusal
    assert optimizers.bnb_problems("bitsandbytes.optim.PagedAdamW", "mps") == []


def test_cpu_offload_is_refused_without_a_gpu_and_with_settings_it_would_skip():
    with pytest.raises(ConfigError, match="this machine trains on cpu, where there is nothing to offload") as e:
        validate(make_config(["optimizer=cpu_offload_adamw", "train.max_grad_norm=null"]))
    assert len(e.value.problems) == 1
    fields = {"_target_": optimizers.OFFLOAD, "offload_gradients": True}
    found = optimizers.offload_problems(fields, "cuda", TrainConfig(batch_size=8, micro_batch_size=4))
    assert [p.split(" ")[0] for p in found] == ["optimizer=cpu_offload_adamw", "optimizer.offload_gradients=true"]
    assert "set train.max_grad_norm=null" in found[0]
    assert optimizers.offload_problems({}, "cuda", TrainConfig(max_grad_norm=None)) == []


def test_cpu_offload_is_refused_on_several_processes(monkeypatch):
    """Its hook copies each process's own gradient before DDP averages them: the processes would
    train apart."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    found = optimizers.offload_problems({}, "cuda", TrainConfig(max_grad_norm=None))
    assert len(found) == 1 and "before the 2 processes average it" in found[0] and "launch one process" in found[0]


@pytest.mark.gpu
def test_cpu_offload_steps_on_a_gpu():
    pytest.importorskip("torchao", reason="torchao is not installed (scripts/gpu/wheels.sh does not carry it)")
    cfg = validate(make_config(["optimizer=cpu_offload_adamw", "train.max_grad_norm=null"]))
    model = tiny().cuda()
    optimizer = instantiate(cfg.optimizer)(params=list(model.parameters()))
    before = model.weight.detach().clone()
    train_steps(model, optimizer, make_scheduler(optimizer, "constant", 0, 2), range(2))
    assert not torch.equal(model.weight, before)


@pytest.mark.gpu
def test_cpu_offload_resumes_from_the_restored_parameters_not_its_stale_host_copies():
    """torchao's CPUOffloadOptimizer steps host copies of the parameters taken when it was built,
    and its load_state_dict restores the AdamW states only: after a checkpoint restored the
    parameters, optimizers.sync_offloaded refreshes those copies. Two steps in a row equal one
    step, a save, a fresh model and optimizer loaded from it, and one more step."""
    pytest.importorskip("torchao", reason="torchao is not installed (scripts/gpu/wheels.sh does not carry it)")
    cfg = validate(make_config(["optimizer=cpu_offload_adamw", "train.max_grad_norm=null"]))

    def fresh():
        model = tiny().cuda()
        optimizer = instantiate(cfg.optimizer)(params=list(model.parameters()))
        return model, optimizer, make_scheduler(optimizer, "constant", 0, 2)

    model, optimizer, scheduler = fresh()
    train_steps(model, optimizer, scheduler, range(1))
    saved = ({k: v.clone() for k, v in model.state_dict().items()}, optimizer.state_dict())
    train_steps(model, optimizer, scheduler, range(1, 2))
    again, optimizer2, scheduler2 = fresh()
    again.load_state_dict(saved[0])
    optimizer2.load_state_dict(saved[1])
    optimizers.sync_offloaded(optimizer2)
    train_steps(again, optimizer2, scheduler2, range(1, 2))
    assert torch.equal(again.weight, model.weight)


@pytest.mark.gpu
def test_paged_8bit_states_step_on_a_gpu():
    """On CUDA the paged optimizer's states live in unified memory (on a CPU it falls back)."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (scripts/gpu/wheels.sh carries it)")
    cfg = validate(make_config(["optimizer=paged_adamw8bit"]))
    model = tiny().cuda()
    optimizer = instantiate(cfg.optimizer)(params=list(model.parameters()))
    before = model.weight.detach().clone()
    train_steps(model, optimizer, make_scheduler(optimizer, "constant", 0, 2), range(2))
    assert not torch.equal(model.weight, before)
    assert optimizer.state[model.weight]["state1"].dtype == torch.uint8  # 8-bit states


def measured_bytes(state: dict) -> int:
    """Bytes of an optimizer state's tensors but its step count (a torchao subclass counted by
    the tensors it holds)."""
    return sum(optimizers.tensor_bytes(v) for v in state.values() if isinstance(v, torch.Tensor) and v.numel() > 1)


@pytest.mark.parametrize("name", ["adamw8bit", "paged_adamw", "ao_adamw8bit", "ao_adamw4bit"])
def test_the_bytes_per_parameter_are_what_the_library_allocates(name):
    """The estimate's bytes for the 8192-value weight, by hand: 8-bit, 2 x 8192 x (1 + 4/256) =
    16640; 4-bit (blocks of 128), 2 x 8192 x (0.5 + 4/128) = 8704; 32-bit, 2 x 8192 x 4 = 65536.
    The library allocates that, plus each quantized state's code map (256 or 16 float32 values)."""
    cfg = validate(make_config([f"optimizer={name}"]))
    model = tiny()
    optimizer = instantiate(cfg.optimizer)(params=list(model.parameters()))
    train_steps(model, optimizer, make_scheduler(optimizer, "constant", 0, 1), range(1))
    size = memory.optimizer_states(cfg.optimizer)
    expected = {"adamw8bit": 16640, "ao_adamw8bit": 16640, "ao_adamw4bit": 8704, "paged_adamw": 65536}[name]
    assert size.bytes(8192, 8192 * 4) == expected
    code_maps = {"adamw8bit": 2 * 256 * 4, "ao_adamw8bit": 2 * 256 * 4, "ao_adamw4bit": 2 * 16 * 4}.get(name, 0)
    assert measured_bytes(optimizer.state[model.weight]) == expected + code_maps


def test_the_memory_estimate_counts_them_and_says_where_the_states_live():
    adamw, _ = estimate_for([])
    n = adamw.trainable_parameters  # the tiny model's, in float32
    eight, _ = estimate_for(["optimizer=adamw8bit"])
    assert eight.optimizer == round(2 * n * (1 + 4 / 256)) and adamw.optimizer == 2 * 4 * n
    assert "optimizer states on the training device" in eight.report()
    paged, _ = estimate_for(["optimizer=paged_adamw8bit"])
    assert paged.optimizer == eight.optimizer and "paged (CUDA unified memory" in paged.report()
    four, _ = estimate_for(["optimizer=ao_adamw4bit", "+optimizer.block_size=256"])
    assert four.optimizer == round(2 * n * (0.5 + 4 / 256))
    # CPU offload (typed without validating: this machine refuses it): nothing on the device.
    cfg = make_config([*BASE, "optimizer=cpu_offload_adamw", "train.max_grad_norm=null"])
    offload = memory.estimate(typed(cfg), byte_tokenizer(), instantiate(cfg.loss), capacity_bytes=1 << 40)
    assert offload.optimizer == 0 and offload.total == adamw.total - adamw.optimizer
    host = memory.human(4 * 4 * n)  # 2 states, the parameter's copy and its gradient's, float32
    assert "optimizer states in host RAM (torchao CPUOffloadOptimizer)" in offload.report()
    assert f"{host} of host RAM, not counted above" in offload.report()


# --- one resumed run, bit-equal to the uninterrupted one (2 short runs) ---------------------------

# bitsandbytes' 8-bit AdamW here; torchao's (its step compiled, its learning rate a tensor) resumes
# bit-equal through the checkpointer above. The tiny model's embedding (4096+ values) is quantized.
RUN = ["optimizer=adamw8bit", "train.max_steps=2", "train.save_every=1", "train.keep_checkpoints=null"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """2 steps with bitsandbytes' 8-bit AdamW, a checkpoint after each."""
    return train_once(tmp_path_factory.mktemp("bnb") / "run", [*RUN, "train.eval_every=null"])


@pytest.mark.integration
def test_a_run_resumed_with_8bit_states_is_bit_equal_to_the_uninterrupted_one(uninterrupted, tmp_path):
    full_dir = uninterrupted[1]
    assert isinstance(read_metrics(full_dir)[0]["lr"], float)
    resumed_like_uninterrupted(full_dir, 1, tmp_path / "resumed", [*RUN, "train.eval_every=null"])
