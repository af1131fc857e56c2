"""Compute-loss frontiers, power-law fits and compute multipliers (THEORY 8), on plain lists of points.

A point is any sequence whose first two entries are (compute, loss), both positive; anything after them
(a trial row, a label) is carried along untouched, so ``pareto_frontier`` returns the caller's own items.

    front = pareto_frontier(points)                 # lower convex hull in log-log + points within 2% of it
    fit = fit_power_law(front)                      # L = e^b C^-a, least squares in log-log
    fit = fit_power_law(front, floor=True)          # L = L0 + e^b C^-a (scipy.optimize.curve_fit)
    compute_multiplier(fit_btt, fit_dense, 0.1)     # C_dense(L) / C_btt(L): > 1 means BTT needs less compute

The frontier is the lower convex hull of the points in (log C, log L), from the least-compute point to
the lowest-loss point (hull vertices past the lowest loss are dominated and left out), plus every point in
that compute range whose loss is at most (1 + tol) times the hull's (piecewise log-log linear) loss at its
compute. Points with more compute than the lowest-loss point are never on it.

Grouping (``group_of``): a trial row belongs to its family's group (search.families: each family declares its
label and family-level group, e.g. Monarch, BTT, a user's own), and a theta row to the named THEORY 2 point it
matches within 0.011 per entry: dense ((1,0,0,1,0,0,0) or (1,0,0,0,1,0,1)), low rank ((1,0,0,0,1,0,rho), rho <
1), Kronecker ((.5,.5,0,.5,.5,0,0)), Tensor-Train ((.5,.5,0,.5,.5,0,rho), rho > 0) and BTT ((.5,0,.5,0,.5,.5,rho),
Monarch-like at rho = 0 but with sqrt(d) blocks); any other theta is "theta". Each group gets one frontier over
all its widths, structures and compute levels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import SearchError
from .families import theta as theta_family

MATCH_TOL = theta_family.MATCH_TOL
theta_group = theta_family.theta_group  # the THEORY 2 named points (search.families.theta)


# ---------------------------------------------------------------- points and the frontier


def _xy(points) -> tuple[list, np.ndarray, np.ndarray]:
    items = list(points)
    c, loss = [], []
    for i, p in enumerate(items):
        try:
            ci, li = float(p[0]), float(p[1])
        except (TypeError, ValueError, IndexError):
            raise SearchError(f"point {i} is {p!r}; a point starts with (compute, loss), two numbers") from None
        if not (math.isfinite(ci) and math.isfinite(li) and ci > 0 and li > 0):
            raise SearchError(
                f"point {i} has compute {ci!r} and loss {li!r}; both must be finite and > 0 "
                "(log-log frontiers and fits)"
            )
        c.append(ci)
        loss.append(li)
    return items, np.asarray(c, dtype=float), np.asarray(loss, dtype=float)


def _cross(o, a, b) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def lower_hull(xs: Sequence[float], ys: Sequence[float]) -> list[int]:
    """Indices of the lower convex hull's vertices (Andrew's monotone chain), in increasing x.

    Of several points with the same x only the lowest can be a vertex; collinear points are not vertices.
    """
    order = sorted(range(len(xs)), key=lambda i: (xs[i], ys[i]))
    hull: list[int] = []
    for i in order:
        if hull and xs[hull[-1]] == xs[i]:
            continue  # same x, higher y (sorted): never on the lower hull
        p = (xs[i], ys[i])
        while len(hull) >= 2 and _cross((xs[hull[-2]], ys[hull[-2]]), (xs[hull[-1]], ys[hull[-1]]), p) <= 0:
            hull.pop()
        hull.append(i)
    return hull


def frontier_indices(points, tol: float = 0.02) -> list[int]:
    """Indices (into ``points``) of the frontier, in increasing compute; see the module docstring."""
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise SearchError(f"tol must be a number >= 0 (a relative loss margin such as 0.02), got {tol!r}")
    _, c, loss = _xy(points)
    if len(c) == 0:
        return []
    x, y = np.log(c), np.log(loss)
    hull = lower_hull(x.tolist(), y.tolist())
    best = min(range(len(hull)), key=lambda k: (y[hull[k]], x[hull[k]]))
    hull = hull[: best + 1]  # past the lowest loss the hull climbs: dominated points
    hx, hy = x[hull], y[hull]
    inside = (x >= hx[0]) & (x <= hx[-1])
    ref = np.interp(x, hx, hy)  # hull loss (log) at each point's compute
    keep = inside & (y <= ref + math.log1p(tol) + 1e-12)
    idx = np.flatnonzero(keep)
    return sorted(idx.tolist(), key=lambda i: (c[i], loss[i]))


def pareto_frontier(points, tol: float = 0.02) -> list:
    """The frontier's points (the caller's own items), in increasing compute."""
    items = list(points)
    return [items[i] for i in frontier_indices(items, tol)]


# ---------------------------------------------------------------- power laws


@dataclass(frozen=True)
class PowerLaw:
    """L = L0 + e^b C^-a fitted to points; L0 = 0 unless fitted with a floor. Standard errors are nan when
    the fit has no residual degrees of freedom."""

    a: float
    b: float
    a_se: float
    b_se: float
    n: int  # points fitted
    rms: float  # root mean square of the residuals of log L
    r2: float  # coefficient of determination of log L
    compute_range: tuple[float, float]
    loss_range: tuple[float, float]
    floor: bool = False
    L0: float = 0.0
    L0_se: float = math.nan

    @property
    def dof(self) -> int:
        return self.n - (3 if self.floor else 2)

    def predict(self, compute):
        """Loss at this compute (a number or an array)."""
        c = np.asarray(compute, dtype=float)
        out = self.L0 + np.exp(self.b - self.a * np.log(c))
        return float(out) if out.ndim == 0 else out

    def compute_at(self, loss):
        """Compute that reaches this loss (inf where the loss is at or below the floor, or a <= 0 and out of
        reach)."""
        loss_arr = np.asarray(loss, dtype=float)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            gap = loss_arr - self.L0
            out = (
                np.where(gap > 0, np.exp((self.b - np.log(np.where(gap > 0, gap, 1.0))) / self.a), np.inf)
                if self.a != 0
                else np.full(loss_arr.shape, np.inf)
            )
        return float(out) if out.ndim == 0 else out

    def shifted(self, factor: float) -> PowerLaw:
        """The same law on the compute axis C / factor (e.g. factor 6: forward MACs x examples from training
        FLOPs); only b changes: b' = b - a ln(factor)."""
        lo, hi = self.compute_range
        return PowerLaw(
            self.a,
            self.b - self.a * math.log(factor),
            self.a_se,
            self.b_se,
            self.n,
            self.rms,
            self.r2,
            (lo / factor, hi / factor),
            self.loss_range,
            self.floor,
            self.L0,
            self.L0_se,
        )

    def __str__(self) -> str:
        head = f"L = {self.L0:.4g} + " if self.floor else "L = "
        return f"{head}e^{self.b:.4g} C^-{self.a:.4g} (a = {self.a:.4g} ± {self.a_se:.2g}, n = {self.n})"


def fit_power_law(points, floor: bool = False) -> PowerLaw:
    """Least-squares fit of log L = b - a log C (or log L = log(L0 + e^b C^-a) with ``floor``).

    Residuals are in log L (relative errors) in both cases; the plain fit's standard errors come from the
    least-squares covariance s^2 (X^T X)^-1, the floor fit's from scipy.optimize.curve_fit's covariance.
    Needs 2 points (3 with a floor) at 2 or more distinct computes.
    """
    _, c, loss = _xy(points)
    need = 3 if floor else 2
    if len(c) < need or len(np.unique(c)) < need:
        raise SearchError(
            f"a power law{' with a floor' if floor else ''} needs at least {need} points at distinct "
            f"computes, got {len(c)} point(s) at {len(np.unique(c))} compute(s)"
        )
    x, y = np.log(c), np.log(loss)
    ranges = ((float(c.min()), float(c.max())), (float(loss.min()), float(loss.max())))
    if floor:
        return _fit_floor(x, y, loss, ranges)
    X = np.column_stack([np.ones_like(x), -x])
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    b, a = float(coef[0]), float(coef[1])
    resid = y - X @ coef
    dof = len(x) - 2
    if dof > 0:
        s2 = float(resid @ resid) / dof
        cov = s2 * np.linalg.inv(X.T @ X)
        b_se, a_se = float(math.sqrt(cov[0, 0])), float(math.sqrt(cov[1, 1]))
    else:
        a_se = b_se = math.nan
    return PowerLaw(a, b, a_se, b_se, len(x), _rms(resid), _r2(y, resid), *ranges)


def _fit_floor(x, y, loss, ranges) -> PowerLaw:
    import warnings

    from scipy.optimize import OptimizeWarning, curve_fit

    lmin = float(loss.min())

    def model(xx, L0, a, b):
        return np.log(L0 + np.exp(b - a * xx))

    # starting point: the plain fit to L - L0 with L0 at half the lowest loss
    start = []
    for frac in (0.5, 0.0, 0.9):
        L0 = frac * lmin
        X = np.column_stack([np.ones_like(x), -x])
        coef, *_ = np.linalg.lstsq(X, np.log(loss - L0), rcond=None)
        start.append((L0, max(float(coef[1]), 1e-3), float(coef[0])))
    best = None
    for p0 in start:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OptimizeWarning)
                popt, pcov = curve_fit(
                    model, x, y, p0=p0, bounds=([0.0, 0.0, -np.inf], [lmin, 20.0, np.inf]), maxfev=20000
                )
        except (RuntimeError, ValueError):
            continue
        resid = y - model(x, *popt)
        sse = float(resid @ resid)
        if best is None or sse < best[0]:
            best = (sse, popt, pcov, resid)
    if best is None:
        raise SearchError("the power law with a floor did not converge on these points; fit without a floor")
    _, popt, pcov, resid = best
    dof = len(x) - 3
    se = np.sqrt(np.diag(pcov)) if dof > 0 and np.all(np.isfinite(pcov)) else np.full(3, math.nan)
    L0, a, b = (float(v) for v in popt)
    return PowerLaw(
        a,
        b,
        float(se[1]),
        float(se[2]),
        len(x),
        _rms(resid),
        _r2(y, resid),
        *ranges,
        floor=True,
        L0=L0,
        L0_se=float(se[0]),
    )


def _rms(resid) -> float:
    return float(math.sqrt(float(np.mean(np.square(resid))))) if len(resid) else math.nan


def _r2(y, resid) -> float:
    tot = float(np.sum(np.square(y - np.mean(y))))
    return 1.0 - float(resid @ resid) / tot if tot > 0 else math.nan


# ---------------------------------------------------------------- compute multipliers


def compute_multiplier(fit_struct: PowerLaw, fit_dense: PowerLaw, loss: float) -> float:
    """C_dense(L) / C_struct(L) at loss L (THEORY 8): how many times less compute the structure needs than
    dense to reach L (nan where either law cannot reach L)."""
    cs, cd = fit_struct.compute_at(loss), fit_dense.compute_at(loss)
    if not (math.isfinite(cs) and math.isfinite(cd)) or cs <= 0:
        return math.nan
    return float(cd / cs)


@dataclass(frozen=True)
class Multiplier:
    loss: float
    value: float  # C_dense / C_struct at this loss
    extrapolated: bool  # the loss lies outside the loss range of either law's data


def multipliers(fit_struct: PowerLaw, fit_dense: PowerLaw, losses=None, n: int = 5) -> tuple[Multiplier, ...]:
    """The compute multiplier at each of ``losses``, or (by default) at ``n`` losses spaced geometrically over
    the loss range both laws' data cover (empty when the ranges do not overlap)."""
    if losses is None:
        lo = max(fit_struct.loss_range[0], fit_dense.loss_range[0])
        hi = min(fit_struct.loss_range[1], fit_dense.loss_range[1])
        if lo > hi:
            return ()
        losses = np.geomspace(hi, lo, n) if hi > lo else [lo]
    out = []
    for L in losses:
        L = float(L)
        inside = all(f.loss_range[0] * (1 - 1e-9) <= L <= f.loss_range[1] * (1 + 1e-9) for f in (fit_struct, fit_dense))
        out.append(Multiplier(L, compute_multiplier(fit_struct, fit_dense, L), not inside))
    return tuple(out)


# ---------------------------------------------------------------- grouping


def group_of(row: dict, families: dict | None = None) -> str:
    """The frontier group of a trial row (trials.csv columns): its family's group for this structure
    (``Family.group_of``; theta gives the THEORY 2 named point). ``families``: a study's own families by name; a
    family known to neither them nor the registry keeps the row's ``group`` column, else its name."""
    from .families import BUILTIN, Candidate, Family

    name = str(row.get("family", "")).strip()
    fam = (families or {}).get(name) or BUILTIN.get(name)
    if fam is None:
        return str(row.get("group") or "").strip() or name or "other"
    try:
        return Candidate.from_row({**row, "width": row.get("width") or 0}, {name: fam}).group
    except (KeyError, TypeError, ValueError, SearchError):
        return Family.group_of(fam, {})  # the family-level group
