"""The training step through its seams, without a whole run: `train_step` on the tiny model
(a finite loss, every weight updated, micro batches that add up to one big batch), the
non-finite guard (a skipped step leaves the weights and is counted; its limit stops the loop
with a checkpoint), and the loop's due-rules as tables."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import FAST, make_config
from hydra.utils import instantiate

from dpo_cli import step as step_module
from dpo_cli import train
from dpo_cli.data.prepare import prepare
from dpo_cli.errors import NonFiniteError
from dpo_cli.guard import Guard, all_finite
from dpo_cli.launch import accumulation_plugin
from dpo_cli.metrics import MetricLogger
from dpo_cli.modeling import byte_tokenizer, load_model
from dpo_cli.parts import Cadence, Data, Models, Optimization, Outputs, Run
from dpo_cli.reference import ModelReference
from dpo_cli.schedule import make_scheduler
from dpo_cli.signals import StopOnSignal
from dpo_cli.step import train_step
from dpo_cli.throughput import Window
from dpo_cli.train import eval_due, every, generate_due, log_due, save_due

BATCH = 8
LR = 0.1


@pytest.fixture(scope="module")
def tiny():
    """The tiny model's initial weights, the built-in task's training pairs and plain DPO."""
    cfg = make_config(FAST)
    tokenizer = byte_tokenizer()
    examples = prepare(cfg.data, tokenizer, cfg.train.seed).train
    model = load_model(cfg.model, tokenizer, cfg.train.seed)
    return model, examples, tokenizer, instantiate(cfg.loss)


def _parts(tiny, micro_batch_size: int, limit: int | None = None):
    """An accelerator (accumulating BATCH / micro_batch_size micro batches) and the step's parts:
    a fresh copy of the initial policy under SGD (an update proportional to the gradient, so
    that a wrongly scaled gradient shows), the initial policy as the reference."""
    model, examples, tokenizer, loss = tiny
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True, gradient_accumulation_plugin=accumulation_plugin(BATCH // micro_batch_size))
    policy = copy.deepcopy(model)
    optimizer = torch.optim.SGD(policy.parameters(), lr=LR)
    scheduler = make_scheduler(optimizer, "constant", 0, 10)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    data = Data(examples, [], tokenizer, BATCH, seed=0, per_epoch=len(examples) // BATCH)
    reference = ModelReference(copy.deepcopy(model), "the initial policy")
    models = Models(policy, accelerator.unwrap_model(policy), loss, reference)
    return accelerator, data, models, Optimization(optimizer, scheduler, Guard(limit), micro_batch_size)


def _weights(models: Models) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in models.unwrapped.named_parameters()}


def test_a_step_trains_every_weight_from_a_finite_loss(tiny):
    """Step 1 from policy = reference: the DPO loss is log 2, the update changes every weight
    tensor, the gradients are cleared, the schedule moves on, and the window holds the step."""
    accelerator, data, models, opt = _parts(tiny, micro_batch_size=4)
    before, window = _weights(models), Window(accelerator.device)
    grad_norm, lr = train_step(accelerator, data, models, opt, 0, window)
    assert lr == LR and math.isfinite(float(grad_norm)) and float(grad_norm) > 0
    row = window.metrics.reduce(accelerator)
    assert row["loss"] == pytest.approx(math.log(2), abs=1e-6)
    after = _weights(models)
    assert [n for n in before if torch.equal(before[n], after[n])] == []
    assert all(p.grad is None for p in models.unwrapped.parameters())
    assert opt.scheduler.last_epoch == 1 and (opt.guard.total, opt.guard.consecutive) == (0, 0)
    tokens = dict(zip(Window.COUNTERS, window.counts.tolist(), strict=True))
    assert window.steps == 1 and window.seconds > 0 and tokens["tokens"] > 0


def test_micro_batches_add_up_to_one_big_batch(tiny):
    """The same step as 1, 2 or 4 micro batches: the same loss, gradient norm and weights
    (backward divides each micro batch's mean loss by their number)."""
    results = []
    for micro in (8, 4, 2):
        accelerator, data, models, opt = _parts(tiny, micro_batch_size=micro)
        window = Window(accelerator.device)
        grad_norm, _ = train_step(accelerator, data, models, opt, 3, window)
        results.append((float(grad_norm), window.metrics.reduce(accelerator)["loss"], _weights(models)))
    (norm, loss, weights), *others = results
    for other_norm, other_loss, other_weights in others:
        assert other_norm == pytest.approx(norm, rel=1e-5)
        assert other_loss == pytest.approx(loss, rel=1e-6)
        for name, w in weights.items():
            torch.testing.assert_close(other_weights[name], w, rtol=1e-5, atol=1e-6)


def test_a_non_finite_step_is_skipped_and_counted(tiny, monkeypatch, caplog):
    """A NaN loss: no update, no schedule step, no metrics in the window, the guard counts it
    and the step's pairs are logged; the next finite step updates and resets the run of them."""
    accelerator, data, models, opt = _parts(tiny, micro_batch_size=4)
    real = step_module.batch_loss

    def nan_loss(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        return loss * float("nan"), parts

    monkeypatch.setattr(step_module, "batch_loss", nan_loss)
    before, window = _weights(models), Window(accelerator.device)
    with caplog.at_level("WARNING", logger="dpo_cli.step"):
        train_step(accelerator, data, models, opt, 0, window)
    after = _weights(models)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert (opt.guard.total, opt.guard.consecutive) == (1, 1) and opt.scheduler.last_epoch == 0
    assert window.metrics.parts == {} and window.steps == 1
    assert all(p.grad is None for p in models.unwrapped.parameters())
    assert "step 1: non-finite loss or gradient norm (tensor(nan)); update skipped" in caplog.text
    assert f"the step's pairs: {sorted(data.indices(0))}" in caplog.text

    monkeypatch.setattr(step_module, "batch_loss", real)
    train_step(accelerator, data, models, opt, 1, window)
    assert (opt.guard.total, opt.guard.consecutive) == (1, 0) and opt.scheduler.last_epoch == 1
    assert not torch.equal(next(iter(after.values())), next(iter(_weights(models).values())))


class OneProcess:
    """What the guard and the loop ask of an accelerator, for one process."""

    device = torch.device("cpu")
    num_processes = 1
    is_main_process = True

    def reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        return x


def test_the_guard_counts_a_run_of_skipped_steps_up_to_its_limit():
    guard = Guard(limit=3)
    verdicts = [guard.check(OneProcess(), torch.tensor(v)) for v in (0.0, 0.0, 1.0, 0.0, 0.0)]
    assert verdicts == [False, False, True, False, False]
    assert (guard.total, guard.consecutive, guard.exhausted) == (4, 2, False)
    assert guard.check(OneProcess(), torch.tensor(0.0)) is False and guard.exhausted
    restored = Guard(limit=3)
    restored.restore(guard.state())
    assert restored.state() == {"total": 5, "consecutive": 3} and restored.exhausted
    for never in (None, 0):
        unlimited = Guard(limit=never, consecutive=1000)
        assert not unlimited.exhausted
    assert all_finite(OneProcess(), torch.tensor(1.0)) and not all_finite(OneProcess(), torch.tensor(0.0))


class Checkpoints:
    """A checkpointer that records what the loop saves."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.saved, self.exported = run_dir, [], 0

    def save(self, done: int, loop: dict) -> Path:
        self.saved.append((done, loop["nonfinite"]["consecutive"]))
        return self.run_dir / f"step-{done}"

    def path(self, done: int) -> Path:
        return self.run_dir / f"step-{done}"

    def export(self, policy: torch.nn.Module, tokenizer: object) -> None:
        self.exported += 1


def _loop_run(tmp_path: Path, cadence: Cadence, limit: int | None = None) -> Run:
    """A run whose parts are only what the loop itself touches (train_step is replaced)."""
    models = Models(torch.nn.Linear(1, 1), None, None)
    opt = Optimization(None, None, Guard(limit), micro_batch_size=1)
    data = Data([], [], None, batch_size=BATCH, seed=0, per_epoch=4)
    outputs = Outputs(tmp_path, lambda: MetricLogger([]), Checkpoints(tmp_path), report=False)
    return Run(OneProcess(), data, models, opt, outputs, cadence)


def test_the_loop_logs_evaluates_and_saves_when_due(tmp_path, monkeypatch):
    """Eight steps, a row every 3, an evaluation every 4 (and both at the last step), a
    checkpoint every 2; then final/."""
    calls = {"rows": [], "evals": [], "finished": []}
    monkeypatch.setattr(train, "train_step", lambda acc, data, models, opt, step, window: (torch.tensor(1.0), LR))
    monkeypatch.setattr(train, "_log", lambda r, metrics, window, done, *_: calls["rows"].append(done) or {})
    monkeypatch.setattr(train, "_evaluate", lambda r, metrics, done, *_: calls["evals"].append(done) or {})
    monkeypatch.setattr(train, "_finish", lambda r, last: calls["finished"].append(True))
    r = _loop_run(tmp_path, Cadence(8, log_every=3, eval_every=4, save_every=2))
    train.train(r, StopOnSignal())
    assert calls == {"rows": [3, 6, 8], "evals": [4, 8], "finished": [True]}
    assert [done for done, _ in r.outputs.checkpointer.saved] == [2, 4, 6, 8]
    assert r.outputs.checkpointer.exported == 1  # final/


def test_the_end_benchmarks_run_before_final_and_their_error_waits_for_it(tmp_path, monkeypatch):
    """export.merge_lora takes the policy apart in memory, so eval.harness.at_end's benchmarks run
    first; when they fail, final/ is still written, and then their error ends the run."""
    from dpo_cli import harness
    from dpo_cli.schema import EvalConfig, HarnessConfig

    order = []

    def benchmarks(*args):
        order.append("benchmarks")
        raise RuntimeError("lm_eval failed")

    monkeypatch.setattr(train, "train_step", lambda acc, data, models, opt, step, window: (torch.tensor(1.0), LR))
    monkeypatch.setattr(train, "_log", lambda *args: {})
    monkeypatch.setattr(harness, "check_launch", lambda h, accelerator: None)
    monkeypatch.setattr(harness, "evaluate", benchmarks)
    r = _loop_run(tmp_path, Cadence(2))
    r.outputs.eval_settings = EvalConfig(harness=HarnessConfig(tasks=["sort_choice"], at_end=True))
    monkeypatch.setattr(r.outputs.checkpointer, "export", lambda policy, tokenizer: order.append("final/"))
    with pytest.raises(RuntimeError, match="lm_eval failed"):
        train.train(r, StopOnSignal())
    assert order == ["benchmarks", "final/"]


def test_the_loop_stops_at_the_guards_limit_with_a_checkpoint(tmp_path, monkeypatch):
    """Every step non-finite, train.max_nonfinite_steps=3: the loop saves after step 3 and
    raises NonFiniteError naming that checkpoint; final/ is not written."""
    finished = []

    def skipped(acc, data, models, opt, step, window):
        opt.guard.check(acc, torch.tensor(0.0))
        return torch.tensor(float("nan")), LR

    monkeypatch.setattr(train, "train_step", skipped)
    monkeypatch.setattr(train, "_log", lambda *_: {})
    monkeypatch.setattr(train, "_finish", lambda r, last: finished.append(True))
    r = _loop_run(tmp_path, Cadence(10, save_every=None), limit=3)
    stopped = re.escape(f"last good weights in {tmp_path / 'step-3'} (final/ not written)")
    with pytest.raises(NonFiniteError, match="^3 optimizer steps in a row .*" + stopped):
        train.train(r, StopOnSignal())
    assert r.outputs.checkpointer.saved == [(3, 3)] and finished == [] and r.outputs.checkpointer.exported == 0


@pytest.mark.parametrize(
    ("done", "period", "due"),
    [(1, 1, True), (7, 1, True), (2, 2, True), (3, 2, False), (4, 2, True), (9, 3, True), (10, 3, False),
     (5, None, False), (5, 0, False)],
)  # fmt: skip
def test_every(done, period, due):
    assert every(done, period) is due


CADENCE = Cadence(10, log_every=3, eval_every=4, generate_every=5, save_every=4, generate=True)


@pytest.mark.parametrize(
    ("rule", "cadence", "due_steps"),
    [
        (log_due, CADENCE, [3, 6, 9, 10]),  # every 3, and the last step
        (log_due, Cadence(10, log_every=1), list(range(1, 11))),
        (eval_due, CADENCE, [4, 8, 10]),
        (eval_due, Cadence(10, eval_every=None), [10]),  # only the last step
        (generate_due, CADENCE, [5, 10]),
        (generate_due, Cadence(10, generate_every=5, generate=False), []),  # no judge: never
        (save_due, CADENCE, [4, 8]),  # not the last step: its model is final/
        (save_due, Cadence(10, save_every=None), []),
    ],
)
def test_due_rules(rule, cadence, due_steps):
    assert [done for done in range(1, cadence.n_steps + 1) if rule(done, cadence)] == due_steps
