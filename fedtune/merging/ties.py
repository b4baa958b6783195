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

Streaming: trimming uses only the client's own delta, so it happens in ``add``; elect and
disjoint mean need four running vectors (:class:`.sparsify.SignedAccumulator`). Verified
in the research note to equal the batch reference.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor

from .base import Delta, FlatLayout, StreamingMerger, check_choice, check_range, register
from .sparsify import SignedAccumulator, chunk_size, magnitude_threshold

SCOPES = ("global", "tensor")


def thresholded_pieces(
    flats: list[Tensor], offsets: tuple[int, ...], density: float, scope: str
) -> Iterator[tuple[int, Tensor, float | None]]:
    """``(flat_offset, chunk, threshold)`` of one client's delta: the entries of the chunk
    with ``|x| >= threshold`` (and ``x != 0``) are its top-``density`` fraction."""
    if scope == "global":
        t = magnitude_threshold(flats, density)
        thresholds = [t] * len(flats)
    else:
        thresholds = [magnitude_threshold([f], density) for f in flats]
    step = chunk_size(sum(f.numel() for f in flats), flats[0].device)
    for off, f, t in zip(offsets, flats, thresholds, strict=True):
        for s in range(0, f.numel(), step):
            yield off + s, f[s : s + step], t


@register("ties")
class Ties(StreamingMerger):
    """TIES with the fedtune convention (see the module docstring). Streaming, 4·d state."""

    def __init__(self, density: float = 0.2, scale: float = 1.0, scope: str = "global") -> None:
        super().__init__()
        self.density = check_range("density", density, 0.0, 1.0, lo_open=True)
        self.scale = check_range("scale", scale, -1e6, 1e6)
        check_choice("scope", scope, SCOPES)
        self.scope = scope
        self._acc: SignedAccumulator | None = None

    def _reset_state(self) -> None:
        self._acc = None

    def _begin(self, layout: FlatLayout) -> None:
        self._acc = SignedAccumulator(layout.total, layout.device)

    def _add(self, layout: FlatLayout, delta: Delta, weight: float, key: int | None) -> None:
        assert self._acc is not None
        pieces = thresholded_pieces(layout.flat(delta), layout.offsets, self.density, self.scope)
        for off, x, t in pieces:
            self._acc.add(off, x, weight, t)

    def _finish(self, layout: FlatLayout) -> Tensor:
        assert self._acc is not None
        out = self._acc.finish()
        return out.mul_(self.scale) if self.scale != 1.0 else out
