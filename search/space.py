"""The search space: structure families, theta on both simplices, and width, sampled by Optuna trials.

Families: ``theta`` (the NeurIPS family) and the presets that are not theta points: ``dense``,
``monarch`` (b blocks) and ``btt`` (integer rank r). Low rank, Kronecker and Tensor-Train are theta points.
Mixtures of experts (THEORY 6), searched over (experts, active) in the opt-in space ``moe``: ``btt_moe``
(every structured linear a BTT-MoE) and ``moe`` (standard MoE: each MLP is E dense FFNs; tasks with such a
model, i.e. lm). Both run the sparse dispatch, so a candidate pays for the experts it runs. They are not in
``full``: per FLOP they train slower on a CPU (a Python loop over experts per layer).

theta is sampled through unconstrained coordinates in [0, 1] so that every sample is valid:
(alpha, beta, gamma) = (min(u1, u2), |u1 - u2|, 1 - max(u1, u2)) is uniform on the simplex, and the same
with (v1, v2) for (epsilon, delta, phi); rho = u3 * min(alpha, epsilon), so no sample is degenerate. A
redundant sample (min(alpha, epsilon) < min(beta, delta)) has alpha <-> beta and epsilon <-> delta
swapped, which makes it non-redundant. Subspaces restrict the family and coordinates by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import einstruct as es

from .errors import SearchError

THETA_KEYS = ("alpha", "beta", "gamma", "delta", "epsilon", "phi", "rho")
MONARCH_BLOCKS = (2, 4, 8, 16)
BTT_RANKS = (1, 2, 4)
MOE_FAMILIES = ("btt_moe", "moe")
MOE_EXPERTS = (4, 8, 16)
MOE_ACTIVE = (2, 4)  # active=1 gives gate 1: the router would learn from the balancing loss only
DEFAULT_EXPERTS, DEFAULT_ACTIVE = 8, 2  # the references, and a row that lacks the columns


@dataclass(frozen=True)
class Candidate:
    """One point of the space: a family, its arguments and a width."""

    family: str
    width: int
    theta: tuple[float, ...] | None = None
    blocks: int | None = None
    rank: int | None = None
    experts: int | None = None
    active: int | None = None

    def __post_init__(self):
        if self.family in MOE_FAMILIES:  # fill in the defaults (a candidate rebuilt from its first fields)
            object.__setattr__(self, "experts", int(self.experts or DEFAULT_EXPERTS))
            object.__setattr__(self, "active", int(self.active or DEFAULT_ACTIVE))

    @classmethod
    def from_row(cls, row: dict) -> Candidate:
        """The candidate of a trials.csv row (or a trial record)."""
        family = str(row["family"])
        theta = tuple(float(row[k]) for k in THETA_KEYS) if family == "theta" else None
        num = lambda k: int(float(row.get(k) or 0)) or None
        return cls(family, int(float(row["width"])), theta, num("blocks"), num("rank"), num("experts"), num("active"))

    def spec(self) -> es.Spec | es.MoEConfig | None:
        """The einstruct Spec (None for dense), or an es.MoEConfig for the MoE families (sparse dispatch).
        May raise SpecError for an invalid point."""
        if self.family == "dense":
            return None
        if self.family in MOE_FAMILIES:
            return es.MoEConfig(
                experts=self.experts,
                active=self.active,
                dispatch="sparse",
                kind="btt" if self.family == "btt_moe" else "ffn",
            )
        if self.family == "theta":
            return es.theta(*self.theta)
        if self.family == "monarch":
            return es.presets.monarch(blocks=self.blocks)
        if self.family == "btt":
            return es.presets.btt(rank=self.rank)
        raise SearchError(f"unknown structure family {self.family!r}")

    def structure_spec(self) -> es.Spec:
        """A Spec to compile for the structure's table and omega/psi/nu: an MoE's weight structure (rank-E
        BTT for btt_moe, dense for moe), dense for dense."""
        spec = self.spec()
        if spec is None:
            return es.presets.dense()
        return spec.weight_spec if isinstance(spec, es.MoEConfig) else spec

    @property
    def label(self) -> str:
        if self.family == "theta":
            return "theta(" + ",".join(f"{v:g}" for v in self.theta) + ")"
        if self.family == "monarch":
            return f"monarch(b={self.blocks})"
        if self.family == "btt":
            return f"btt(r={self.rank})"
        if self.family in MOE_FAMILIES:
            return f"{self.family}(E={self.experts},k={self.active})"
        return "dense"

    def columns(self) -> dict:
        t = dict(zip(THETA_KEYS, self.theta)) if self.theta else dict.fromkeys(THETA_KEYS, "")
        out = {
            "family": self.family,
            "structure": self.label,
            **t,
            "blocks": self.blocks or "",
            "rank": self.rank or "",
            "width": self.width,
        }
        if self.family in MOE_FAMILIES:
            out.update(experts=self.experts, active=self.active)
        return out


@dataclass(frozen=True)
class Space:
    name: str
    families: tuple[str, ...]
    widths: tuple[int, ...]
    fix_beta_delta_zero: bool = False  # the BTT subspace: beta = delta = 0

    def suggest(self, trial) -> Candidate:
        """Define-by-run sampling on an Optuna trial."""
        family = (
            trial.suggest_categorical("family", list(self.families)) if len(self.families) > 1 else self.families[0]
        )
        width = trial.suggest_categorical("width", list(self.widths))
        if family == "theta":
            if self.fix_beta_delta_zero:
                al = trial.suggest_float("u1", 0.0, 1.0)
                ep = trial.suggest_float("v1", 0.0, 1.0)
                t = (al, 0.0, 1.0 - al, 0.0, ep, 1.0 - ep)
            else:
                u1, u2 = trial.suggest_float("u1", 0.0, 1.0), trial.suggest_float("u2", 0.0, 1.0)
                v1, v2 = trial.suggest_float("v1", 0.0, 1.0), trial.suggest_float("v2", 0.0, 1.0)
                t = theta_from_unit(u1, u2, v1, v2)
            rho = trial.suggest_float("u3", 0.0, 1.0) * min(t[0], t[4])
            return Candidate("theta", width, theta=canonical((*t, rho)))
        if family == "monarch":
            return Candidate("monarch", width, blocks=trial.suggest_categorical("blocks", list(MONARCH_BLOCKS)))
        if family == "btt":
            return Candidate("btt", width, rank=trial.suggest_categorical("rank", list(BTT_RANKS)))
        if family in MOE_FAMILIES:
            experts = trial.suggest_categorical("experts", list(MOE_EXPERTS))
            active = trial.suggest_categorical("active", list(MOE_ACTIVE))
            return Candidate(family, width, experts=experts, active=min(active, experts))
        return Candidate("dense", width)

    def random_params(self, rng) -> dict:
        """Uniformly random Optuna params of this space (``rng``: a random.Random), to force exploration."""
        family = rng.choice(self.families)
        p: dict = {"width": rng.choice(self.widths)}
        if len(self.families) > 1:
            p["family"] = family
        if family == "theta":
            keys = ("u1", "v1", "u3") if self.fix_beta_delta_zero else ("u1", "u2", "v1", "v2", "u3")
            p.update({k: rng.random() for k in keys})
        elif family == "monarch":
            p["blocks"] = rng.choice(MONARCH_BLOCKS)
        elif family == "btt":
            p["rank"] = rng.choice(BTT_RANKS)
        elif family in MOE_FAMILIES:
            p["experts"], p["active"] = rng.choice(MOE_EXPERTS), rng.choice(MOE_ACTIVE)
        return p

    def params_for(self, cand: Candidate) -> dict:
        """Optuna params that make ``suggest`` return ``cand`` (for enqueuing references)."""
        p: dict = {"width": cand.width}
        if len(self.families) > 1:
            p["family"] = cand.family
        if cand.family == "theta":
            al, be, _, de, ep, _, rh = cand.theta
            if self.fix_beta_delta_zero:
                p.update(u1=al, v1=ep)
            else:
                p.update(u1=al, u2=al + be, v1=ep, v2=ep + de)
            m = min(al, ep)
            p["u3"] = rh / m if m > 0 else 0.0
        elif cand.family == "monarch":
            p["blocks"] = cand.blocks
        elif cand.family == "btt":
            p["rank"] = cand.rank
        elif cand.family in MOE_FAMILIES:
            p["experts"], p["active"] = cand.experts, cand.active
        return p


def theta_from_unit(u1: float, u2: float, v1: float, v2: float) -> tuple[float, ...]:
    """(alpha, beta, gamma, delta, epsilon, phi) on both simplices, non-redundant by construction."""
    al, be, ga = min(u1, u2), abs(u1 - u2), 1.0 - max(u1, u2)
    ep, de, ph = min(v1, v2), abs(v1 - v2), 1.0 - max(v1, v2)
    if min(al, ep) < min(be, de):  # redundant: swap the roles so that A runs first
        al, be, ep, de = be, al, de, ep
    return (al, be, ga, de, ep, ph)


def canonical(theta) -> tuple[float, ...]:
    """Round to 3 decimals and put the rounding error of each simplex on its last entry."""
    t = [round(float(v), 3) for v in theta]
    t[2] = round(1.0 - t[0] - t[1], 3)
    t[5] = round(1.0 - t[3] - t[4], 3)
    t[6] = min(t[6], t[0], t[4])
    return tuple(abs(v) for v in t)  # no -0.0


REFERENCES = (
    Candidate("dense", 0),
    Candidate("theta", 0, theta=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.5)),  # low rank, r = sqrt(d)
    Candidate("theta", 0, theta=(0.5, 0.5, 0.0, 0.5, 0.5, 0.0, 0.0)),  # Kronecker
    Candidate("theta", 0, theta=(0.5, 0.5, 0.0, 0.5, 0.5, 0.0, 0.25)),  # Tensor-Train, r = d^1/4
    Candidate("monarch", 0, blocks=4),
    Candidate("btt", 0, rank=1),
    Candidate("btt_moe", 0, experts=DEFAULT_EXPERTS, active=DEFAULT_ACTIVE),
    Candidate("moe", 0, experts=DEFAULT_EXPERTS, active=DEFAULT_ACTIVE),
)

SPACES = {
    "full": ("theta", "dense", "monarch", "btt"),
    "theta": ("theta",),
    "btt": ("theta",),
    "moe": ("dense", "btt", "btt_moe", "moe"),  # opt-in: MoE candidates train slower per FLOP on a CPU
}


def make_space(name: str, widths) -> Space:
    if name not in SPACES:
        raise SearchError(f"unknown space {name!r}; choose one of {', '.join(SPACES)}")
    return Space(name, SPACES[name], tuple(widths), fix_beta_delta_zero=(name == "btt"))


def references(space: Space) -> list[Candidate]:
    """The reference structures that belong to this space (width filled in later)."""
    out = []
    for c in REFERENCES:
        if c.family not in space.families:
            continue
        if space.fix_beta_delta_zero and c.theta and (c.theta[1] or c.theta[3]):
            continue
        out.append(c)
    if space.fix_beta_delta_zero:
        out.append(Candidate("theta", 0, theta=(0.5, 0.0, 0.5, 0.0, 0.5, 0.5, 0.0)))  # BTT as a theta point
    return out
