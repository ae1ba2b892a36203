"""Config schemas: one dataclass per section, registered in Hydra's ConfigStore.

They make an unknown key or a wrongly typed value fail when Hydra composes the config; what
types cannot express (ranges, cross-field rules, `_target_` nodes) is `config.validate`'s.
Comments on the meaning of each key live in the YAML files under `conf/`. This module imports
no other part of dpo_cli: any part can read the schema (a section's shape, a key's default)
without importing the validation, which reads every part.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


@dataclass
class LoraConfig:
    r: Optional[int] = None  # null = full fine-tuning
    alpha: float = 16
    dropout: float = 0.0
    target_modules: Any = "all-linear"  # peft's names: "all-linear" or a list of module names


@dataclass
class WarmStartConfig:
    steps: int = 0  # 0 = none
    lr: float = 1e-3
    batch_size: int = 32
    responses: str = "both"  # both, chosen


@dataclass
class ModelConfig:
    name_or_path: Optional[str] = None
    revision: Optional[str] = None
    gguf_file: Optional[str] = None
    tokenizer: Optional[str] = None
    random_init: Optional[dict[str, Any]] = None
    dtype: str = "float32"
    attn_implementation: Optional[str] = None  # null: the best the model supports (modeling.resolve_attention)
    trust_remote_code: bool = False
    disable_dropout: bool = True
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)


@dataclass
class ReferenceConfig:
    name_or_path: Optional[str] = None  # null = the initial policy (or the base model under LoRA)
    revision: Optional[str] = None
    gguf_file: Optional[str] = None
    dtype: Optional[str] = None  # null = model.dtype
    precompute: bool = False
    cache_dir: Optional[str] = None


@dataclass
class ExportConfig:
    merge_lora: bool = False


@dataclass
class SyntheticConfig:
    num_train: int = 4096
    num_eval: int = 256
    min_digits: int = 3
    max_digits: int = 8


@dataclass
class ColumnsConfig:
    """Source column names for the formats' fields (null = the field's own name)."""

    prompt: Optional[str] = None
    chosen: Optional[str] = None
    rejected: Optional[str] = None
    completion: Optional[str] = None
    label: Optional[str] = None
    score_chosen: Optional[str] = None  # ultrafeedback
    score_rejected: Optional[str] = None
    info: Optional[str] = None  # tldr
    summaries: Optional[str] = None
    choice: Optional[str] = None
    post_id: Optional[str] = None  # shp
    history: Optional[str] = None
    human_ref_A: Optional[str] = None
    human_ref_B: Optional[str] = None
    score_A: Optional[str] = None
    score_B: Optional[str] = None
    labels: Optional[str] = None


@dataclass
class DataConfig:
    format: str = MISSING
    hub_id: Optional[str] = None
    hub_config: Optional[str] = None
    hub_data_dir: Optional[str] = None
    path: Optional[str] = None
    eval_path: Optional[str] = None
    train_split: str = "train"
    eval_split: Optional[str] = None
    eval_holdout: float = 256
    max_train_pairs: Optional[int] = None
    max_eval_pairs: Optional[int] = None
    max_length: int = 512
    max_prompt_length: int = 256
    truncation_mode: str = "keep_end"
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    chat_template: Optional[str] = None
    cache_dir: Optional[str] = None
    synthetic: Optional[SyntheticConfig] = None
    shp_max_pairs_per_post: Optional[int] = None
    mixture: Optional[dict[str, Any]] = None
    weights: dict[str, float] = field(default_factory=dict)


@dataclass
class SchedulerConfig:
    name: str = "cosine"
    warmup_steps: Optional[int] = None
    warmup_ratio: float = 0.1


@dataclass
class TrainConfig:
    batch_size: int = 64
    micro_batch_size: int = 8
    max_steps: Optional[int] = None
    epochs: int = 1
    eval_every: Optional[int] = 100
    save_every: Optional[int] = 500
    keep_checkpoints: Optional[int] = 2
    resume: Optional[str] = None
    seed: int = 42
    mixed_precision: str = "no"
    max_grad_norm: Optional[float] = 1.0
    max_nonfinite_steps: Optional[int] = 10
    layout: str = "auto"
    logits_chunk: Optional[int] = 1024
    sort_by_length: bool = True


@dataclass
class WandbConfig:
    mode: str = "online"
    project: str = "dpo-cli"
    entity: Optional[str] = None
    name: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    log_every: int = 1
    progress: bool = True
    report: bool = True
    peak_tflops: Optional[float] = None
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class InspectConfig:
    export: Optional[str] = None
    overwrite: bool = False
    examples: int = 3


@dataclass
class EvalConfig:
    generate_every: Optional[int] = None
    prompts: int = 64
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 16
    confidence: float = 0.95


@dataclass
class Config:
    mode: str = "train"
    inspect: InspectConfig = field(default_factory=InspectConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # Loss and optimizer are `_target_` nodes whose keys depend on the target class, so their
    # keys are checked against the target's signature in `validate` rather than by a schema.
    loss: Any = MISSING
    optimizer: Any = MISSING
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # A judge is a `_target_` node (conf/judge/), checked like the loss; null = no generation evaluation.
    judge: Any = None


def register_configs() -> None:
    """Register the schema that `conf/config.yaml` names first in its defaults list, and the
    loss classes' schemas that conf/loss/*.yaml extend (/schema/loss/<ClassName>)."""
    from dpo_cli.losses.options import register_schemas  # here: the losses import torch

    ConfigStore.instance().store(name="dpo_cli_schema", node=Config)
    register_schemas()


def schema_default(key: str, missing: Any) -> Any:
    """The schema's default for a dotted key (e.g. train.seed), or `missing` if it has none."""
    node: Any = OmegaConf.structured(Config)
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node or OmegaConf.is_missing(node, part):
            return missing
        node = node[part]
    return OmegaConf.to_container(node) if isinstance(node, DictConfig) else node


def source_config(source: Any) -> DictConfig:
    """A mixture source as a typed data section (schema defaults for keys it leaves out)."""
    return OmegaConf.merge(OmegaConf.structured(DataConfig), source)  # type: ignore[return-value]


def import_target(path: str) -> Callable[..., Any]:
    """The class or function a `_target_` names (a dotted path)."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)
