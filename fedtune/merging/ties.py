"""TIES-Merging: trim, elect sign, disjoint mean -- streamed in O(d).

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023,
Algorithm 1 (reference code ``prateeky2806/ties-merging src/utils/merge_utils.py``).

fedtune convention (docs/DESIGN.md §4), with the deviations from the paper:

1. **Trim** each client's delta to its top-``density`` fraction by ``|·|`` over the WHOLE
   adapter (``scope="global"``, as the paper) or per tensor (``scope="tensor"``, as PEFT and
   mergekit). ``k = floor(density · n)`` entries; the threshold is the exact k-th largest
   magnitude (a radix select, :func:`.sparsify.kth_largest_abs`), entries tied with it are
   all kept, and zeros are never kept. *Deviation:* the reference keeps
   ``|x| >= kthvalue(n − k)``, i.e. k+1 entries; PEFT keeps exactly k via ``topk``.
2. **Elect** ``γ = sign(Σ_i w_i τ̂_i)``. *Deviation:* the paper has no client weights
   (equal weights give its "mass" rule) and breaks an exact zero sum with the model-wide
   majority sign; here a zero-sum coordinate is 0. mergekit elects +1 on a zero sum; PEFT
   elects on the unweighted sum (+1 when it is ``>= 0``).
3. **Disjoint weighted mean** ``Σ_{i∈A} w_i τ̂_i / Σ_{i∈A} w_i`` over ``A = {i : τ̂_i ≠ 0,
   sign τ̂_i = γ}``. With equal weights this is the paper's dis-mean. (PEFT divides the
   weighted sum by the *count* of agreeing clients, so it coincides only for unit weights.)
4. Multiply by ``scale`` (λ, default 1).

``rescale='mean-norm'`` (fedtune, not in the paper; issue 17 point 4): before λ, the merged
vector is rescaled to the norm of the plain weighted mean of the untrimmed deltas, so that a
federated round moves the global adapter by FedAvg's step length in TIES's direction
(:class:`.task_vectors.MeanNormMatched` says why). Default ``'none'`` (the paper).

Steps (:mod:`.task_vectors`): ``Magnitude(density, scope)``, elect, scale. Streaming:
trimming uses only the client's own delta, so it happens in ``add``; elect and disjoint mean
need four running vectors (:class:`.sparsify.SignedAccumulator`). Verified in the research
note to equal the batch reference.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import check_choice, check_range, register

# Unused here (task_vectors chunks); kept as tests/test_merging.py monkeypatches this name.
from .sparsify import chunk_size  # noqa: F401
from .task_vectors import (
    RESCALES,
    SCOPES,
    Magnitude,
    Steps,
    TaskVectorMerger,
    check_scale,
    set_checked,
)


@dataclass(frozen=True)
class TiesOptions:
    density: float = 0.2
    scale: float = 1.0
    scope: str = "global"
    rescale: str = "none"

    def __post_init__(self) -> None:
        density = check_range("density", self.density, 0.0, 1.0, lo_open=True)
        set_checked(self, density=density, scale=check_scale(self.scale))
        check_choice("scope", self.scope, SCOPES)
        check_choice("rescale", self.rescale, RESCALES)

    def steps(self) -> Steps:
        return Steps(
            sparsify=(Magnitude(self.density, self.scope),),
            elect=True,
            scale=self.scale,
            rescale=self.rescale,
        )


@register("ties")
class Ties(TaskVectorMerger):
    """TIES with the fedtune convention (see the module docstring). Streaming, 4·d state."""

    Options = TiesOptions
