"""dpo-cli: a config-driven trainer for Direct Preference Optimization and its variants."""

__version__ = "0.1.0"
