"""The run's privacy settings, parsed once (:func:`fedtune.parts.private_run`), asked by the
Flower strategy, the SecAgg+ round (fedtune/fl/secagg.py) and the in-process simulator alike,
so the rules below live in one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PrivateRun:
    """``dp`` mode, SecAgg+ and its parameters. ``max_examples`` is the largest weight a client
    can claim (local-steps x batch-size): SecAgg+ without DP sums ``weight x update`` and must
    bound it."""

    dp: str = "none"  # 'none' | 'central' | 'distributed'
    secagg: bool = False
    secagg_clip_range: float = 0.0
    secagg_threshold: float = 0.6
    max_examples: float = 1.0

    @property
    def poisson(self) -> bool:
        """Under DP the round samples each client independently (what the accountant assumes)."""
        return self.dp != "none"

    @property
    def client_side(self) -> bool:
        """Clients clip (and add their share of noise) themselves: the server never sees one
        client's update under SecAgg+, and distributed DP noises on the client."""
        return self.secagg or self.dp == "distributed"

    def clip_range(self, dp: Any) -> float:
        """SecAgg's per-coordinate range: secagg-clip-range, else the round's DP clip norm."""
        if self.secagg_clip_range > 0 or dp is None:
            return self.secagg_clip_range
        return float(dp.clip)

    def max_weight(self, dp: Any) -> float:
        """The largest weight in SecAgg's weighted sum: DP-FedAvg weighs every client 1."""
        return 1.0 if dp is not None else self.max_examples

    def survivors_needed(self, sampled: int) -> int:
        """Clients whose shares must survive for the sum to be rebuilt (SecAgg+ needs 2)."""
        return max(round(self.secagg_threshold * sampled), 2)

    def client_config(self, dp: Any, sampled: int) -> dict[str, Any]:
        """The train-config entries a client needs to clip / noise itself (or nothing)."""
        out: dict[str, Any] = {}
        if dp is not None:
            p = dp.client_params(sampled, client_side=self.client_side)
            if p is not None:
                out.update({"dp-clip": p.clip, "dp-noise-std": p.noise_std,
                            "dp-bit-std": p.bit_std, "dp-seeded": p.seeded})  # fmt: skip
        if self.secagg:
            out["secagg-clip-range"] = self.clip_range(dp)
        return out
