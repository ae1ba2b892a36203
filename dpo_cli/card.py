"""final/README.md: a Hugging Face model card for the trained policy, made with huggingface_hub's
own `ModelCard` and `ModelCardData` (the metadata the Hub reads: base model, datasets, library,
tags, license) and a body that says how it was trained, how it scored on the held-out pairs,
and the command that trains it again.

It is built from the typed config (as plain dicts), the run directory's files (metrics.jsonl,
Hydra's .hydra/overrides.yaml and hydra.yaml) and the number of examples the run kept, so that a
run directory holds everything a card needs.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from omegaconf import OmegaConf

from dpo_cli import __version__
from dpo_cli.hub import looks_like_path
from dpo_cli.report import read_jsonl

CARD_NAME = "README.md"
# (metric, label, format) of the held-out row shown in the card; absent metrics are left out.
HELD_OUT = (
    ("eval_loss", "loss", "{:.4f}"),
    ("eval_rewards/accuracies", "reward accuracy", "{:.4f}"),
    ("eval_rewards/margins", "reward margin", "{:.4f}"),
    ("eval_accuracy", "accuracy (reward model: chosen scored higher)", "{:.4f}"),
    ("eval_margin", "margin (reward model: mean chosen - rejected score)", "{:.4f}"),
    ("eval_win_rate", "win rate against the reference (judge)", "{:.4f}"),
    ("eval_tie_rate", "tie rate", "{:.4f}"),
)


OPTIMIZER_KEYS = ("lr", "betas", "weight_decay", "momentum", "alpha")  # the optimizer's settings worth a line
# What final/ is, by the config's `task`: the transformers and peft classes that load it, its Hub pipeline.
KINDS = {
    "dpo": ("AutoModelForCausalLM", "AutoPeftModelForCausalLM", "text-generation"),
    "reward": ("AutoModelForSequenceClassification", "AutoPeftModelForSequenceClassification", "text-classification"),
    "iterative": ("AutoModelForCausalLM", "AutoPeftModelForCausalLM", "text-generation"),
}


def _reward(config: dict[str, Any]) -> bool:
    """Whether the run trained a reward model (task=reward) rather than a policy."""
    return config.get("task", "dpo") == "reward"


def base_model(model: dict[str, Any]) -> str | None:
    """model.name_or_path when it is a hub id. A local directory is not written (the Hub refuses a
    base_model that is not a repo id, as TRL leaves it out too); the body names it instead."""
    name = model.get("name_or_path")
    return name if name and not looks_like_path(name) else None


def hub_datasets(data: dict[str, Any]) -> list[str]:
    """The hub datasets the run trained on: data.hub_id (read when data.path is null), or each
    mixture source's."""
    sources = list((data.get("mixture") or {}).values()) or [data]
    return [s["hub_id"] for s in sources if s.get("hub_id") and not s.get("path")]


def base_license(model: dict[str, Any]) -> str | None:
    """The base model's license, from its model card when one is on this machine (the local
    directory's README.md, or the hub id's in the local Hugging Face cache); else None."""
    name = model.get("name_or_path")
    if not name:
        return None
    path: Any = Path(name).expanduser() / CARD_NAME if looks_like_path(name) else None
    if path is None:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(name, CARD_NAME, revision=model.get("revision"))
    if not isinstance(path, (str, Path)) or not Path(path).is_file():
        return None
    try:
        return ModelCard.load(path).data.license
    except Exception:  # noqa: BLE001 - a malformed card: no license rather than no card
        return None


def _read_yaml(path: Path) -> Any:
    """A YAML file Hydra wrote (as plain lists and dicts, unresolved), or None when it is not there."""
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) if path.is_file() else None


def loss_name(run_dir: Path, loss: dict[str, Any], reward: bool = False) -> str:
    """The conf/loss choice (dpo, simpo, ...) Hydra recorded; else the class's name without Loss;
    a reward model's: bradley_terry."""
    if reward:
        return "bradley_terry"
    choices = ((_read_yaml(run_dir / ".hydra" / "hydra.yaml") or {}).get("hydra") or {}).get("runtime", {})
    chosen = (choices.get("choices") or {}).get("loss")
    if chosen:
        return str(chosen)
    return str(loss.get("_target_", "loss")).rpartition(".")[2].removesuffix("Loss").lower() or "loss"


def command(run_dir: Path) -> str:
    """The dpo-train command line of the run: its overrides as Hydra recorded them at the first
    start (a resume's own overrides are in .hydra/resume-N/)."""
    overrides = _read_yaml(run_dir / ".hydra" / "overrides.yaml") or []
    return " ".join(["dpo-train", *(shlex.quote(str(o)) for o in overrides)])


def held_out(run_dir: Path) -> tuple[int | None, list[tuple[str, str]]]:
    """The last evaluation's step and its (label, value) lines, from metrics.jsonl."""
    evals = [r for r in read_jsonl(run_dir / "metrics.jsonl") if any(k.startswith("eval_") for k in r)]
    if not evals:
        return None, []
    row = {k: v for r in evals if r.get("step") == evals[-1].get("step") for k, v in r.items()}
    lines = [(label, fmt.format(row[key])) for key, label, fmt in HELD_OUT if isinstance(row.get(key), (int, float))]
    if "eval_win_rate_low" in row and "eval_win_rate_high" in row:
        lines.append(("win rate interval", f"{row['eval_win_rate_low']:.4f}-{row['eval_win_rate_high']:.4f}"))
    return row.get("step"), lines


def _params(node: dict[str, Any], keys: tuple[str, ...] | None = None) -> str:
    shown = [k for k in node if not k.startswith("_") and (keys is None or k in keys)]
    return ", ".join(f"{k}={node[k]}" for k in shown) or "defaults"


def _model_line(model: dict[str, Any]) -> str:
    name = model.get("name_or_path")
    if name and looks_like_path(name):
        return f"the local directory `{Path(name).expanduser().resolve()}`"
    if name:
        return f"[{name}](https://huggingface.co/{name})"
    return f"a randomly initialised {(model.get('random_init') or {}).get('model_type', 'model')} (model.random_init)"


def _training(config: dict[str, Any], name: str, steps: int, kept: dict[str, int], unit: str) -> list[str]:
    """The body's training section: model, loss and its parameters, data, optimization."""
    model, data, t = config["model"], config["data"], config["train"]
    loss, opt, sched = config["loss"], config["optimizer"], config["scheduler"]
    lora = model.get("lora") or {}
    where = data.get("path") or ", ".join(hub_datasets(data)) or "built-in synthetic task"
    lines = [f"- base model: {_model_line(model)}"]
    if lora.get("r"):
        lines.append(f"- LoRA: r={lora['r']}, alpha={lora.get('alpha')}, target modules {lora.get('target_modules')}")
    if _reward(config):
        loss = {"center_coefficient": (config.get("reward") or {}).get("center_coefficient")}
    if config.get("task") == "iterative":
        it = config.get("iterative") or {}
        lines.append(
            f"- iterative DPO: {it.get('rounds')} rounds, each on pairs of the policy's own samples ({it.get('samples')} "
            f"per prompt, pairs {it.get('pairs')}, min_gap {it.get('min_gap')}) scored by the judge "
            f"`{str((config.get('judge') or {}).get('_target_')).rpartition('.')[2]}`; reference: {it.get('reference')}"
        )
    return [
        *lines,
        f"- loss: `{name}` ({loss.get('_target_', 'dpo_cli.reward.bradley_terry')}): {_params(loss)}",
        f"- data: `{where}`; {kept.get('train', 0)} training {unit} kept, {kept.get('eval', 0)} held out; "
        f"max_length {data.get('max_length')}, max_prompt_length {data.get('max_prompt_length')}",
        f"- optimization: {steps} optimizer steps of {t['batch_size']} {unit} (micro batch {t['micro_batch_size']}); "
        f"optimizer {str(opt.get('_target_')).rpartition('.')[2]} ({_params(opt, OPTIMIZER_KEYS)}); "
        f"scheduler {sched.get('name')}; seed {t.get('seed')}",
    ]


def body(run_dir: Path, config: dict[str, Any], steps: int, kept: dict[str, int], unit: str, adapter: bool) -> str:
    """The card's text below the metadata; named after the Hub repo it is pushed to, if any."""
    name = loss_name(run_dir, config["loss"], _reward(config))
    repo = (config.get("export") or {}).get("push_to_hub")
    model_id = repo or str(run_dir.resolve() / "final")
    step, results = held_out(run_dir)
    table = ["| metric | value |", "|---|---|", *(f"| {label} | {value} |" for label, value in results)]
    auto, peft_auto, _ = KINDS[config.get("task", "dpo")]
    loader = f"peft import {peft_auto}" if adapter else f"transformers import {auto}"
    cls = loader.rpartition(" ")[2]
    lora = bool((config["model"].get("lora") or {}).get("r"))
    what = "A LoRA adapter" if adapter else "The base model with a LoRA adapter merged in," if lora else "A model"
    what += " (a reward model: one score per sequence)" if _reward(config) else ""
    local_base = adapter and base_model(config["model"]) is None
    note = "adapter_config.json names its base by a local path: where that is missing, point it at a copy."
    return "\n".join(
        [
            f"# {repo.rpartition('/')[2] if repo else run_dir.name}",
            "",
            f"{what} {'trained on' if _reward(config) else 'aligned to'} preference data with the `{name}` loss by "
            f"[dpo-cli](https://pypi.org/project/dpo-cli/) {__version__}.",
            "",
            "## Training",
            "",
            *_training(config, name, steps, kept, unit),
            "",
            f"## Held-out results (step {step})" if results else "## Held-out results",
            "",
            *(table if results else ["No evaluation was logged (metrics.jsonl has no eval row)."]),
            "",
            "## Reproduce",
            "",
            "```bash",
            command(run_dir),
            "```",
            "",
            "## Use",
            "",
            *([note, ""] if local_base else []),
            "```python",
            f"from {loader}\nfrom transformers import AutoTokenizer\n",
            f"model = {cls}.from_pretrained({model_id!r})",
            f"tokenizer = AutoTokenizer.from_pretrained({model_id!r})",
            "```",
            "",
        ]
    )


def build(
    run_dir: Path,
    config: dict[str, Any],
    steps: int,
    kept: dict[str, int],
    unit: str = "pairs",
    adapter: bool = False,
) -> ModelCard:
    """The model card of the run in `run_dir`. `config`: the typed config as plain dicts;
    `kept`: how many examples it trained on ("train") and held out ("eval"); `adapter`: final/
    holds a LoRA adapter (peft) rather than a whole model (transformers)."""
    model = config["model"]
    reward = _reward(config)
    kind = ["reward-model"] if reward else ["dpo"]
    tags = ["dpo-cli", *kind, loss_name(run_dir, config["loss"], reward)] + (["lora"] if adapter else [])
    data = ModelCardData(
        base_model=base_model(model),
        datasets=hub_datasets(config["data"]) or None,
        library_name="peft" if adapter else "transformers",
        license=base_license(model),
        pipeline_tag=KINDS[config.get("task", "dpo")][2],
        tags=list(dict.fromkeys(tags)),
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body(run_dir, config, steps, kept, unit, adapter)}")


def write(
    final_dir: Path, run_dir: Path, config: dict[str, Any], steps: int, kept: dict[str, int], unit: str = "pairs"
) -> list[Path]:
    """final/README.md (library peft for a LoRA adapter) and, for a merged export,
    final/merged/README.md (transformers); returns the cards written."""
    adapter = (final_dir / "adapter_config.json").is_file()
    targets = [(final_dir, adapter)] + ([(final_dir / "merged", False)] if (final_dir / "merged").is_dir() else [])
    written = []
    for directory, is_adapter in targets:
        path = directory / CARD_NAME
        tmp = path.with_name(f".{CARD_NAME}.tmp")
        build(run_dir, config, steps, kept, unit, is_adapter).save(tmp)
        tmp.replace(path)  # a reader (an upload) never sees half a card
        written.append(path)
    return written
