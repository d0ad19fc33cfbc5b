"""Model adapters, one module per LVLM family (`base.py` holds the interface and the registry)."""

# Importing the package registers every family (each module's `@register` fills the registry).
from . import internvl, qwen2_5_vl, qwen3_vl  # noqa: E402,F401
