"""MoE settings without torch: MoEConfig (how structure() builds MoE layers) and the argument checks."""

from __future__ import annotations

from dataclasses import dataclass

from ... import presets
from ...errors import SpecError
from ...spec import Spec
from ..checks import check_features

DISPATCHES = ("dense", "sparse", "tiled")
KINDS = ("btt", "ffn")
AUX_WEIGHT = 0.01  # weight of aux_loss() in the training loss (THEORY 6)
Z_LOSS_WEIGHT = 0.1  # weight of the z-loss inside aux_loss()


@dataclass(frozen=True)
class MoEConfig:
    """How :func:`einstruct.structure` turns each selected nn.Linear into an MoE layer.

    ``kind="btt"``: a :class:`BTTMoE` (the structure spec must be None, 'btt' or btt(rank=1): the experts
    are rank-1 BTTs). ``kind="ffn"``: an :class:`MoE` of FFNs with hidden width ``hidden_ratio * d_in``
    whose linears have the structure spec (None or dense: nn.Linear).
    """

    experts: int = 8
    active: int = 2
    kind: str = "btt"
    dispatch: str = "dense"
    hidden_ratio: int = 4

    def __post_init__(self):
        _check_experts(self.experts, self.active, "MoEConfig")
        if self.kind not in KINDS:
            raise SpecError(f"MoEConfig: kind {self.kind!r} is not known; use 'btt' (BTT-MoE) or 'ffn' (standard MoE)")
        _check_dispatch(self.dispatch, "MoEConfig")
        check_features(self.hidden_ratio, "hidden_ratio")

    @property
    def label(self) -> str:
        name = "btt_moe" if self.kind == "btt" else "moe"
        return f"{name}(E={self.experts},k={self.active})"

    @property
    def weight_spec(self) -> Spec:
        """The structure of the layer's weights: a rank-E BTT for BTT-MoE; dense experts for the FFN MoE."""
        return presets.btt(rank=self.experts) if self.kind == "btt" else presets.dense()

    @classmethod
    def of(cls, value) -> MoEConfig:
        """A MoEConfig from a MoEConfig, a dict of its fields, or an int (the number of experts)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = [k for k in value if k not in cls.__dataclass_fields__]
            if unknown:
                raise SpecError(
                    f"moe= got an unknown setting {unknown[0]!r}; settings are {', '.join(cls.__dataclass_fields__)}"
                )
            return cls(**value)
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(experts=value)
        raise SpecError(
            f"moe= must be an es.MoEConfig, a dict such as {{'experts': 8, 'active': 2}}, or an int "
            f"(the number of experts); got {type(value).__name__}"
        )


def _check_experts(experts, active, who: str) -> None:
    if isinstance(experts, bool) or not isinstance(experts, int) or experts < 1:
        raise SpecError(f"{who}: experts must be a positive integer (the number of experts), got {experts!r}")
    if isinstance(active, bool) or not isinstance(active, int) or active < 1:
        raise SpecError(f"{who}: active must be a positive integer (experts chosen per token), got {active!r}")
    if active > experts:
        raise SpecError(
            f"{who}: active={active} is more than experts={experts}; each token chooses at most all "
            f"experts, so use active <= {experts}"
        )


def _check_dispatch(dispatch, who: str) -> None:
    if dispatch not in DISPATCHES:
        raise SpecError(
            f"{who}: dispatch {dispatch!r} is not known; use 'dense' (all experts, the default), 'sparse' "
            "(tokens grouped per expert) or 'tiled' (the same in fixed-size tiles, no host read)"
        )


def is_btt_expert_spec(spec) -> bool:
    """Whether ``spec`` names a rank-1 BTT (None, 'btt' or es.presets.btt(rank=1)): the expert of BTTMoE."""
    if spec is None:
        return True
    if isinstance(spec, str):
        return spec.strip().lower() == "btt"
    return spec == presets.btt(rank=1)


def check_batch(batch) -> int:
    """``batch`` if it is a non-negative integer number of rows (for ``flops(batch)``), else a SpecError."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise SpecError(f"flops(batch) needs a non-negative integer number of rows, got {batch!r}")
    return batch
