"""The inference-cache scope: where no-grad forwards may reuse weights laid out once.

    with torch.no_grad(), es.inference_cache(model):
        for batch in loader:
            model(batch)

Outside a scope a StructuredLinear reads its parameters at every call, so no weight change can be missed
(fused optimizer steps and ``.data`` edits do not bump version counters, so no cache keyed on them can be
correct). Inside, each structured layer of ``model`` keeps its per-step cores and, for batches of at most
``layer.dense_rows`` rows, its materialised matrix, built on first use; the scope promises that the
weights do not change until it ends, when the caches are dropped. Scopes nest (the outermost one drops).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from ..errors import SpecError


def _cached_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "_cache_depth")]


@contextlib.contextmanager
def inference_cache(model: nn.Module) -> Iterator[nn.Module]:
    """Let the structured layers of ``model`` cache their inference weights until the block ends.

    Use it around evaluation, not training: a weight changed inside the scope by a fused optimizer step
    or through ``.data`` is not seen by a no-grad forward there. Grad-mode forwards always read the
    live parameters.
    """
    if not isinstance(model, nn.Module):
        raise SpecError(f"inference_cache() needs an nn.Module (a model or a layer), got {type(model).__name__}")
    layers = _cached_layers(model)
    for m in layers:
        m._cache_depth += 1
    try:
        yield model
    finally:
        for m in layers:
            m._cache_depth -= 1
            if m._cache_depth == 0:
                m.drop_caches()
