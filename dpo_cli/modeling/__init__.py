"""The policy's tokenizer and model, and what is checked about them before any weights load.

Three parts, lowest first:
- `sources`: where a model's files come from (a local directory, the hub cache, the Hub) and
  what stops them loading; its transformers config without its weights;
- `diagnostics`: what the config and this machine allow (attention back-end, sequence length);
- `load`: the tokenizer and the policy, in model.dtype, dropout off.

The names below are the package's interface (`from dpo_cli.modeling import load_model`).
"""

from dpo_cli.modeling.diagnostics import (
    attention_problem,
    check_max_length,
    max_positions,
    position_problem,
    resolve_attention,
)
from dpo_cli.modeling.load import (
    DTYPES,
    byte_tokenizer,
    count_parameters,
    load_model,
    load_tokenizer,
    quantized,
)
from dpo_cli.modeling.sources import (
    TOKENIZER_PROBE,
    WEIGHT_SUFFIXES,
    local_dir_problem,
    model_config,
    random_init_config,
    reference_config,
    source_kwargs,
)

__all__ = [
    "DTYPES",
    "TOKENIZER_PROBE",
    "WEIGHT_SUFFIXES",
    "attention_problem",
    "byte_tokenizer",
    "check_max_length",
    "count_parameters",
    "load_model",
    "load_tokenizer",
    "quantized",
    "local_dir_problem",
    "max_positions",
    "model_config",
    "position_problem",
    "random_init_config",
    "reference_config",
    "resolve_attention",
    "source_kwargs",
]
