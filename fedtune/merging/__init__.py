"""Pluggable aggregation: mergers, server optimizers and robust pre-steps.

```python
from fedtune import merging
m = merging.get("ties", density=0.2)
merged = merging.aggregate(m, deltas, weights, clip=merging.NormClip(max_norm=1.0))
opt = merging.get_server_opt("fedadam", lr=1e-2)
new_global = opt.step(global_state, merged)
```

Every method is one file that registers itself; importing this package imports them all so
the registry is complete. See docs/extending.md for writing a new one.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from . import (  # noqa: F401  (imported for their registrations)
    breadcrumbs,
    consensus,
    dare,
    fedavg,
    fedgma,
    krum,
    magmax,
    median,
    model_stock,
    pcb,
    task_arithmetic,
    ties,
    trimmed_mean,
)
from .base import (
    MERGERS,
    BatchMerger,
    CoordinatewiseMerger,
    Delta,
    FlatLayout,
    Merger,
    StreamingMerger,
    client_key,
    get,
    names,
    register,
)
from .clip import NormClip
from .cosine_filter import CosineFilter
from .server_opt import (
    SERVER_OPTS,
    ServerOpt,
    get_server_opt,
    register_server_opt,
    server_opt_names,
)

__all__ = [
    "MERGERS",
    "SERVER_OPTS",
    "BatchMerger",
    "CoordinatewiseMerger",
    "CosineFilter",
    "Delta",
    "FlatLayout",
    "Merger",
    "NormClip",
    "ServerOpt",
    "StreamingMerger",
    "aggregate",
    "get",
    "get_server_opt",
    "names",
    "register",
    "register_server_opt",
    "server_opt_names",
]


def aggregate(
    merger: Merger,
    deltas: Sequence[Delta],
    weights: Sequence[float],
    clip: NormClip | None = None,
    *,
    key: int | None = None,
) -> dict[str, Tensor]:
    """Apply the optional norm-clip pre-step, then merge.

    Streaming mergers get one ``add`` per client (each clipped delta is dropped right after),
    others get ``merge``. ``key`` is the round key of randomized methods: client ``i`` gets
    ``rng.derive_key(key, i)``, exactly as ``merger.merge(..., key=key)`` would.
    """
    if len(deltas) != len(weights):
        raise ValueError(f"got {len(deltas)} deltas but {len(weights)} weights")
    if clip is not None and deltas:
        clip = clip.for_round(deltas)  # a relative (median) clip becomes this round's bound
    if getattr(merger, "streaming", False) and hasattr(merger, "add") and hasattr(merger, "finish"):
        if len(deltas) == 0:
            raise ValueError("aggregate needs at least one delta")
        if getattr(merger, "needs_key", False) and key is None:
            raise ValueError(f"{type(merger).__name__} is randomized and needs a key")
        if hasattr(merger, "reset"):
            merger.reset()
        try:
            for i, (d, w) in enumerate(zip(deltas, weights, strict=True)):
                merger.add(clip(d) if clip is not None else d, w, key=client_key(key, i))
        except BaseException:
            if hasattr(merger, "reset"):
                merger.reset()
            raise
        result: dict[str, Tensor] = merger.finish()
        return result
    if clip is not None:
        deltas = [clip(d) for d in deltas]
    return merger.merge(deltas, weights, key=key)
