"""StructuredLinear: a compiled structure run as a fixed chain of batched matmuls, with muP init and weight norm.

The chain of :func:`einstruct.compile` is laid out at construction, and again when the layer moves to
another device type, as a frozen plan (:mod:`einstruct.layers.layerplan`, torch-free): one ``mm``/``bmm``
per core, so FLOP counters see exactly ``structure.flops`` per example, with the memory order of every
intermediate and the form of each matmul chosen by a cost model (:mod:`einstruct.layers.layout`) priced for
the parameters' device (:mod:`einstruct.layers.costs`) and every view-or-copy decision made from strides.
This module holds the nn.Module; the runners are in :mod:`einstruct.layers.execute`.

Paths (all deterministic; DESIGN.md: ``flops(batch)`` reports the path that runs):

- Grad mode on (training): the whole chain is one autograd Function (``_Chain``), whose forward and
  backward run the planned matmuls without recording a graph. Where an activation's permute + reshape is a
  strided view BLAS reads in place it is not copied (n > 1 rows), nor is a core whose permute is such a view;
  the final permute and the bias go into y in one pass (from 2^17 output elements the last matmul writes
  into y's memory order instead); the backward keeps every bmm operand batch-major and its gradients laid
  out like the operands. It keeps each step's operands (a view of x for a viewed first step; a first step
  that copies x does so in the graph, so only the copy is kept). Batches of at most ``layer.builtin_rows``
  rows (a forward materialising fewer than 2^22 elements) use the layout planned with plain matmul forms
  only, larger ones the cost-model layout (``layer.builtin_rows = 0``: always). Double backward
  differentiates the chain on torch's ops. A chain that is one plain matmul (dense) trains on ``addmm``.
- Under torch.compile, torch.func transforms (vmap, grad) and forward-mode AD: the plain-form chain on
  torch's own ops (permute, reshape, matmul), which those trace like any torch code.
- Grad mode off (``torch.no_grad`` / ``torch.inference_mode``): the cost-model chain without autograd, on
  the effective cores laid out per step from the live parameters at every call (no copy where a core's
  layout is already right). Nothing is cached implicitly, so every way a weight can change (optimizer
  steps, fused ones included, ``.data`` edits, ``load_state_dict``, ``.to()``) is seen by construction.
- Inside ``with es.inference_cache(model):`` (``einstruct.layers.inference``), no-grad forwards reuse the
  per-step cores and, for ``batch <= layer.dense_rows`` rows, the materialised (out, in) matrix through
  ``F.linear``, each built on first use in the scope and dropped when it ends: the scope's promise is
  that weights do not change inside it. ``dense_rows`` is 0 unless the structure has fewer FLOPs than
  dense and the weight has at most 2^18 elements; then min(16, 2^22 // (in * out)) (measured on CPU:
  below that the dense matmul costs less than the chain's fixed per-call cost), and every batch
  (``layerplan.ANY_BATCH``) for a weight of at most 2^14 elements whose chain copies or uses a non-plain
  matmul form (there the dense matmul is faster per row too: ``python -m benchmarks.dense_rows``). Set
  ``layer.dense_rows = 0`` to turn it off. Inside the scope the caches are also keyed by each core's
  ``data_ptr()`` and ``_version``, which catches ordinary in-place updates, but not fused optimizer steps
  or ``.data`` edits: do not train inside the scope. Caches are built with autocast off (exact, in the
  parameters' dtype) and are plain attributes, never in ``state_dict``.
- Under autocast every path runs its matmuls in the autocast dtype (outputs as ``nn.Linear``'s).

Contract details chosen here (DESIGN.md, THEORY 4-5):

- Cores are parameters named after the spec's cores (``layer.R``), stored in the spec's axis order.
- ``init_scale=None`` draws every core from N(0, core.init_std^2) (muP); a float replaces the std of
  every core. ``low_rank_init=True`` gives the first core of a low-rank structure std 1/sqrt(in_features)
  (ICML appendix). ``zero_init=True`` zeroes only the last core in execution order. Biases start at 0.
- ``normalize=True`` adds one learnable scalar gain per core, in the ``nn.ParameterDict`` ``layer.gains``
  keyed by core name (state_dict keys ``gains.<core>``), and uses
  ``M_eff = g * min(1, sigma / RMS(M)) * M`` with sigma the std that core was drawn with (the nominal one
  for a zero-initialised core).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import limits, rules
from ..compiler import Structure
from ..compiler import compile as compile_structure
from ..errors import SpecError
from . import costs, execute, layerplan
from .checks import check_features as _check_features
from .layerplan import default_dense_rows  # re-exported: part of einstruct.layers.linear's names
from .layout import ROWS, ChainLayout, LayoutStep, plan_chain  # noqa: F401  (plan_chain etc. re-exported)

logger = logging.getLogger(__name__)

RMS_EPS = 1e-8


def _is_low_rank(st: Structure) -> bool:
    """Two cores joined only through bond axes (x -> bond -> y), like ``i,ir,ro->o``."""
    if len(st.cores) != 2:
        return False
    return all(st.spec.role(a) == "bond" for a in st.cores[0].step.after if st.sizes[a] > 1)


def _replan_after_load(layer: StructuredLinear, _incompatible) -> None:  # module-level: the layer stays picklable
    layer._replan()


class StructuredLinear(nn.Module):
    """A drop-in for nn.Linear whose weight is a structured einsum (a plain nn.Module, not a subclass).

    >>> layer = StructuredLinear(1024, 4096, es.presets.btt(rank=4))
    >>> y = layer(torch.randn(8, 1024))          # (8, 4096)

    Args:
        spec: an :class:`einstruct.Spec` or a preset name, compiled with ``es.compile(spec, in_features,
            out_features, pad_tolerance=...)``; the result is ``layer.structure``.
        zero_init: zero the last core in execution order, so the layer starts at 0 (THEORY 4).
        init_scale: None for each core's muP std ``core.init_std``; a float is the std of every core.
        low_rank_init: give the first core of a low-rank structure std 1/sqrt(in_features).
        normalize: weight normalisation with one learnable scalar gain per core in ``layer.gains``.
        pad_tolerance: how much in/out may be padded to split into the axis sizes (inputs are padded
            with zeros, outputs sliced).

    ``layer.init_stds`` holds the std each core was drawn with (and the weight-norm cap).
    """

    def __init__(
        self,
        in_features,
        out_features,
        spec,
        bias: bool = True,
        *,
        zero_init: bool = False,
        init_scale: float | None = None,
        low_rank_init: bool = False,
        normalize: bool = False,
        pad_tolerance: float = 0.15,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_features = _check_features(in_features, "in_features")
        self.out_features = _check_features(out_features, "out_features")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise SpecError(f"StructuredLinear: dtype must be a floating-point torch.dtype, got {dtype!r}")
        if init_scale is not None and (
            isinstance(init_scale, bool)
            or not isinstance(init_scale, (int, float))
            or not math.isfinite(init_scale)
            or init_scale <= 0
        ):
            raise SpecError(
                f"StructuredLinear: init_scale must be None (muP std per core) or a std > 0, got {init_scale!r}; "
                "use zero_init=True for a zero start"
            )
        self.structure = compile_structure(spec, in_features, out_features, pad_tolerance=pad_tolerance)
        self.spec = self.structure.spec
        self.zero_init = bool(zero_init)
        self.normalize = bool(normalize)
        self.low_rank_init = bool(low_rank_init)
        if self.low_rank_init and not _is_low_rank(self.structure):
            raise SpecError(
                f"low_rank_init=True needs a low-rank structure (two cores joined by a bond, e.g. "
                f"es.presets.low_rank(rank=8)); {self.spec.label or self.spec.einsum!r} is not one"
            )
        std = {c.name: (c.init_std if init_scale is None else float(init_scale)) for c in self.structure.cores}
        if self.low_rank_init:
            std[self.structure.cores[0].name] = rules.low_rank_std(self.in_features)
        self.init_stds: dict[str, float] = std  # metadata on the module, never on tensors
        factory = {"device": device, "dtype": dtype}
        self._check_parameter_memory(bias, device, dtype)
        for c in self.structure.cores:
            if hasattr(self, c.name):
                raise SpecError(
                    f"core name {c.name!r} clashes with an attribute of StructuredLinear; rename the core "
                    f"(e.g. '{c.name}_core:{c.axes}' in the einsum)"
                )
            self.register_parameter(c.name, nn.Parameter(torch.empty(c.shape, **factory)))
        if self.normalize:
            clash = [c.name for c in self.structure.cores if hasattr(nn.ParameterDict(), c.name)]
            if clash:
                raise SpecError(f"core name {clash[0]!r} clashes with an nn.ParameterDict method; rename the core")
            self.gains = nn.ParameterDict(
                {c.name: nn.Parameter(torch.ones((), **factory)) for c in self.structure.cores}
            )
        else:
            self.gains = None
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self._names = tuple(c.name for c in self.structure.cores)
        self._cache: dict[str, tuple] = {}  # inference-only copies of the weights, only inside inference_cache()
        self._cache_depth = 0  # nesting depth of es.inference_cache scopes over this layer
        self._replan()  # frozen, for the parameters' device type; the runners read it
        self.register_load_state_dict_post_hook(_replan_after_load)  # load_state_dict(assign=True) may move them
        self.reset_parameters()

    def _replan(self) -> None:
        """Plan for the device type the parameters live on, unless the plan already uses its cost table."""
        table = costs.cost_table(self._device_type())
        old = getattr(self, "_plan", None)
        if old is not None and old.costs == table:
            return
        self._plan = plan = layerplan.build(self.structure, table)
        self._row_elems = plan.row_elems
        if old is None or self.builtin_rows == old.builtin_rows:  # a threshold the user set is kept
            self.builtin_rows = plan.builtin_rows
        dims = self.structure, self.in_features, self.out_features
        if old is None or self.dense_rows == default_dense_rows(*dims, old):  # likewise
            self.dense_rows = default_dense_rows(*dims, plan)
        self._cache.clear()  # per-step cores laid out for the old plan
        logger.debug("%s: layout cost %s per example (%s)", self.spec.einsum, plan.chain.layout.cost, table.device)

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), to_empty(), ...: re-planned for the new device
        out = super()._apply(fn, *args, **kwargs)
        self._replan()
        return out

    @property
    def _chain(self) -> ChainLayout:
        """The cost-model layout (the no-grad chain and larger training batches)."""
        return self._plan.chain.layout

    # ---- memory limits ---------------------------------------------------------------------
    def _describe(self) -> str:
        name = self.spec.label or self.spec.einsum
        return f"StructuredLinear({self.in_features} -> {self.out_features}, {name})"

    def _check_parameter_memory(self, bias: bool, device, dtype) -> None:
        """Refuse parameters that cannot fit on their device, before any is allocated."""
        dev = torch.device(device) if device is not None else torch.get_default_device()
        itemsize = (dtype or torch.get_default_dtype()).itemsize
        n = self.structure.params + (self.out_features if bias else 0) + (len(self.structure.cores) * self.normalize)
        limits.check_fits(
            f"the parameters of {self._describe()} ({limits.count(n)} elements)",
            n * itemsize,
            dev,
            "use smaller dimensions or a structure with fewer parameters (e.g. a lower rank)",
        )

    def _check_forward_memory(self, rows: int, x: torch.Tensor, what: str = "the forward") -> None:
        limits.check_fits(
            lambda: f"the intermediates of {what} of {self._describe()} for {rows} rows",
            rows * self._row_elems * x.element_size(),
            x.device,
            "use a smaller batch (or accumulate gradients over several)",
        )

    # ---- parameters ----------------------------------------------------------------------
    @property
    def core_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.structure.cores)

    def reset_parameters(self) -> None:
        last = self.core_names[-1]
        if self._device_type() == "meta":  # shapes only: nothing to draw (meta's normal_ costs ~1 ms in Python)
            return
        with torch.no_grad():
            for name in self.core_names:
                w = getattr(self, name)
                if self.zero_init and name == last:
                    w.zero_()
                else:
                    w.normal_(0.0, self.init_stds[name])
            if self.gains is not None:
                for g in self.gains.values():
                    g.fill_(1.0)
            if self.bias is not None:
                self.bias.zero_()

    def effective_cores(self) -> dict[str, torch.Tensor]:
        """The cores the chain multiplies with: the parameters, weight-normalised when ``normalize``."""
        return dict(zip(self._names, self._effective()))

    def _effective(self) -> tuple[torch.Tensor, ...]:
        """:meth:`effective_cores` as a tuple in execution order (the runners' form: no dict per call)."""
        params = self._parameters  # not getattr: nn.Module.__getattr__ costs a microsecond per call
        cores = tuple(map(params.__getitem__, self._names))
        if not self.normalize:
            return cores
        out = []
        for name, w in zip(self._names, cores):
            acc = torch.float64 if w.dtype == torch.float64 else torch.float32
            rms = torch.sqrt(w.to(acc).square().mean() + RMS_EPS)
            sigma = self.init_stds[name]
            scale = self.gains[name].to(acc) * (sigma / torch.clamp(rms, min=sigma))  # = g * min(1, sigma/rms)
            out.append(w * scale.to(w.dtype))
        return tuple(out)

    # ---- running the chain ---------------------------------------------------------------
    def _run(self, act: torch.Tensor, n: int, bias: torch.Tensor | None, compiling: bool) -> torch.Tensor:
        """(n, d_in_padded) contiguous -> (n, d_out_padded) through the planned chain, plus ``bias`` if given."""
        plan = self._plan
        grad = torch.is_grad_enabled()
        # Traced code (torch.compile, torch.func, forward-mode AD) gets torch's own ops, no out= writes; so do
        # training chains of 2-D mm only on small batches, and one plain matmul on any batch (measured: a few
        # C++ autograd nodes cost less there than one Python Function, and no bmm can go per matrix).
        if compiling or execute.traced() or (grad and plan.flat and (n <= self.builtin_rows or plan.one_matmul)):
            return execute.run_ops(plan.small, act, n, bias, self._effective())
        dt = execute.autocast_dtype(act)
        if not grad:
            route = plan.chain
            ws = (
                self._cached("chain", self._step_cores)
                if self._cache_depth
                else execute.core_operands(route, self._effective())
            )
            if dt is not None:  # every matmul (and the out= one into y) sees one dtype, as autocast gives
                act, ws = act.to(dt), tuple(w.to(dt) for w in ws)
            if bias is not None and bias.dtype != act.dtype:
                bias = bias.to(act.dtype)
            return execute.forward(route, act, n, bias, ws)
        cores = self._effective()
        if dt is not None:  # a custom Function's backward runs outside autocast: cast here, in the graph
            act, cores = act.to(dt), tuple(w.to(dt) for w in cores)
        if bias is not None and bias.dtype != act.dtype:
            bias = bias.to(act.dtype)
        return execute.train(plan.small if n <= self.builtin_rows else plan.chain, act, n, bias, cores)

    # ---- inference caches ----------------------------------------------------------------
    def _cache_key(self) -> tuple:
        """Identity and in-place version of every core and gain: changes whenever a weight changes."""
        params = self._parameters  # not getattr: nn.Module.__getattr__ costs a microsecond per call
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in map(params.__getitem__, self._names))
        if self.gains is not None:
            key += tuple((p.data_ptr(), p._version) for p in self.gains._parameters.values())
        return key  # .to(), load_state_dict and optimizer steps change these; reading them never syncs

    def _cached(self, what: str, build):
        """``build()``, kept for the rest of the enclosing ``es.inference_cache`` scope (autocast off)."""
        key = self._cache_key()
        hit = self._cache.get(what)
        if hit is not None and hit[0] == key:
            return hit[1]
        with torch.autocast(self._device_type(), enabled=False):
            value = build()
        self._cache[what] = (key, value)
        return value

    def _step_cores(self) -> tuple[torch.Tensor, ...]:
        """The effective cores as each no-grad step multiplies them, as contiguous copies to keep."""
        return execute.core_operands(self._plan.chain, self._effective(), copy=True)

    def _dense_weight(self) -> torch.Tensor:
        return self.to_dense()

    def _device_type(self) -> str:
        return getattr(self, self._names[0]).device.type

    def drop_caches(self) -> None:
        """Forget the inference caches (``es.inference_cache`` does this when its scope ends)."""
        self._cache.clear()

    def uses_dense(self, batch: int, *, training: bool | None = None, cached: bool | None = None) -> bool:
        """Whether ``batch`` rows run on the materialised dense matrix: grad mode off (``training=False``),
        inside an ``es.inference_cache`` scope (``cached=True``) and ``batch <= dense_rows``. The defaults
        read the current grad mode and scope."""
        if training is None:
            training = torch.is_grad_enabled()
        if cached is None:
            cached = self._cache_depth > 0
        return batch <= self.dense_rows and cached and not training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise SpecError(
                f"StructuredLinear({self.in_features} -> {self.out_features}) expects input of shape "
                f"(..., {self.in_features}), got {tuple(x.shape)}"
            )
        flat = x.dim() == 2  # (rows, in): no reshape nodes in the graph (they cost microseconds per call)
        n = x.shape[0] if flat else math.prod(x.shape[:-1])
        compiling = torch.compiler.is_compiling()
        bias = self._parameters["bias"]
        if self._cache_depth and not compiling and self.uses_dense(n):
            return F.linear(x, self._cached("dense", self._dense_weight), bias)
        if not compiling:  # plain integer arithmetic on shapes: no tensor reads
            self._check_forward_memory(n, x)
        x2 = x if flat and x.is_contiguous() else x.reshape(n, self.in_features).contiguous()
        plan = self._plan.chain
        if plan.d_in != self.in_features:
            x2 = F.pad(x2, (0, plan.d_in - self.in_features))
        if plan.d_out != self.out_features:
            y = self._run(x2, n, None, compiling)[:, : self.out_features]
            if bias is not None:
                y = y + bias.to(y.dtype)
        else:
            y = self._run(x2, n, bias, compiling)
        return y if flat else y.reshape(*x.shape[:-1], self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """The (out_features, in_features) matrix the layer applies, computed from the cores on every read.

        A read-only copy for client code that reads ``.weight`` (shape checks, tied-embedding helpers):
        it costs a forward of ``in_features`` rows (``structure.flops * in_features`` FLOPs and an
        (out, in) tensor); differentiable under grad mode. Writing to it changes nothing in the layer.
        """
        return self.to_dense()

    @weight.setter
    def weight(self, value) -> None:
        raise AttributeError(
            f"{self._describe()}.weight is computed from the cores ({', '.join(self.core_names)}) and cannot be "
            "set; load a dense matrix with es.from_dense(W, spec) or set the cores"
        )

    def to_dense(self) -> torch.Tensor:
        """The (out_features, in_features) matrix the layer applies (weight norm included, bias not).

        Exact in the parameters' dtype: autocast is turned off while it is built."""
        ref = getattr(self, self.core_names[0])
        d_in = self.structure.d_in_padded
        limits.check_fits(
            f"the dense matrix of {self._describe()} and its intermediates",
            (d_in * d_in + d_in * self._row_elems) * ref.element_size(),
            ref.device,
            "to_dense() materialises the full matrix: use it on smaller layers",
        )
        eye = torch.eye(d_in, device=ref.device, dtype=ref.dtype)
        with torch.autocast(ref.device.type, enabled=False):
            cols = self._run(eye, d_in, None, torch.compiler.is_compiling())  # row i is W e_i
        return cols[: self.in_features, : self.out_features].transpose(0, 1).contiguous()

    # ---- reporting -----------------------------------------------------------------------
    def flops(self, batch: int, *, training: bool | None = None, cached: bool | None = None) -> int:
        """FLOPs (2 x MACs) of the forward path for ``batch`` rows: by default the one that runs now.

        The factored chain (``structure.flops`` per row), or, when :meth:`uses_dense` (grad mode off,
        inside ``es.inference_cache`` and ``batch <= dense_rows``), the materialised matrix:
        ``2 * in_features * out_features`` per row. ``training=`` and ``cached=`` ask about another mode
        than the current one (``flops(b, training=True)`` is the training forward wherever it is called).
        """
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
            raise SpecError(f"flops(batch) needs a non-negative integer number of rows, got {batch!r}")
        if self.uses_dense(batch, training=training, cached=cached):
            return rules.dense_flops(batch, self.in_features, self.out_features)
        return self.structure.flops * batch

    def extra_repr(self) -> str:
        st = self.structure
        name = f"{self.spec.label} " if self.spec.label else ""
        parts = [
            f"{name}{self.spec.einsum}",
            f"in_features={self.in_features}",
            f"out_features={self.out_features}",
            f"bias={self.bias is not None}",
            f"params={st.params}",
            f"flops_per_example={st.flops}",
        ]
        if st.padded:
            parts.append(f"padded=({st.d_in_padded}, {st.d_out_padded})")
        if self.normalize:
            parts.append("normalize=True")
        if self.zero_init:
            parts.append("zero_init=True")
        return ", ".join(parts)
