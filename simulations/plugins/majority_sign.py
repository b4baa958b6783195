"""A user's merge strategy as ONE file, loaded by config alone (docs/extending.md).

    python -m fedtune.simulate -c "plugins='simulations/plugins/majority_sign.py' merger='majority-sign'"

Majority-sign mean: at each coordinate the sign held by more clients (by count, not by
magnitude as TIES elects it) wins, and the weighted mean of the values with that sign is the
merged value. Ties of the count give 0. A sketch of sign-consensus merging in the spirit of
TIES (Yadav et al., NeurIPS 2023, Sec. 3, steps 2-3) with a one-client-one-vote election.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedtune import merging
from fedtune.merging import CoordinatewiseMerger


@merging.register("majority-sign")
class MajoritySign(CoordinatewiseMerger):
    """Weighted mean over the clients whose sign agrees with the majority's."""

    def _combine(self, x: Tensor, w: Tensor) -> Tensor:
        votes = torch.sign(x).sum(dim=0)  # (c,): +k or -k
        elected = torch.sign(votes)
        agree = (torch.sign(x) == elected) & (elected != 0)
        wa = agree * w[:, None]
        den = wa.sum(dim=0)
        return torch.where(den > 0, (wa * x).sum(dim=0) / den.clamp_min(1e-30), torch.zeros_like(den))
