"""Model specs, layers, sharding rules and checkpoint I/O for the three families (OPT, GPT-NeoX, LLaMA)."""
from spotserve.models.spec import ModelSpec, get_spec, list_specs

__all__ = ["ModelSpec", "get_spec", "list_specs"]
