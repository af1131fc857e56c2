"""einstruct: declare structured linear layers as einsums, compile their costs and muP, run them in torch."""

from . import presets
from .errors import SpecError
from .spec import CoreSpec, Spec
from .structure import Core, Structure, compile
from .theta import theta

__all__ = ["Core", "CoreSpec", "Spec", "SpecError", "Structure", "compile", "presets", "theta"]
__version__ = "0.1.0"
