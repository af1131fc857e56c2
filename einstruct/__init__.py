"""einstruct: declare structured linear layers as einsums, compile their costs and muP, run them in torch.

The compiler (Spec, theta, presets, compile) does not import torch; the torch parts load on first use.
"""

from importlib import import_module

from . import presets, rules
from .compiler import Core, Structure, compile
from .errors import CostTableError, EinstructError, MemoryLimitError, MupError, SpecError
from .spec import CoreSpec, Spec
from .theta import theta

_LAZY = {
    "check_rank": ".rank",
    "StructuredLinear": ".layers.linear",
    "inference_cache": ".layers.inference",
    "from_dense": ".layers.projection",
    "structure": ".layers.model",
    "summary": ".layers.model",
    "param_groups": ".mup",
    "mup_init": ".mupinit",
    "coord_check": ".coordcheck",
    "StructureConfig": ".config",
    "save": ".saving",
    "load": ".saving",
    "merge": ".merging",
    "BTTMoE": ".layers.moe",
    "MoE": ".layers.moe",
    "MoEConfig": ".layers.moe",
    "moe_aux_loss": ".layers.moe",
    "AUX_WEIGHT": ".layers.moe",
    "is_btt_expert_spec": ".layers.moe",
    "training_memory_limit": ".limits",
    "human_bytes": ".limits",
    "count": ".limits",
    "CostTable": ".layers.costs",
    "cost_table": ".layers.costs",
    "use_cost_table": ".layers.costs",
}

__all__ = [
    "Core",
    "CoreSpec",
    "CostTableError",
    "EinstructError",
    "MemoryLimitError",
    "MupError",
    "Spec",
    "SpecError",
    "Structure",
    "compile",
    "presets",
    "rules",
    "theta",
    *_LAZY,
]
__version__ = "0.1.0"


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'einstruct' has no attribute {name!r}")
