"""User-level DP-FedAvg with fixed or adaptive (quantile) clipping, central or distributed noise.

DP-FedAvg (McMahan, Ramage, Talwar, Zhang, ICLR 2018, Alg. 1 with the fixed-denominator
estimator ``f̃_f`` and unit weights): every client ``i`` of round ``t`` (Poisson-sampled with
probability ``q``) contributes its update clipped to norm ``C_t``,

    u_i ← u_i · min(1, C_t / ‖u_i‖),        S = Σ_i u_i + N(0, σ_Δ² I),   σ_Δ = z_Δ · C_t,

and the round's update is ``S / (q·n)`` (``n`` clients, ``q·n`` the expected number). Adding or
removing one client moves ``Σ_i u_i`` by at most ``C_t``, so one round is the Gaussian
mechanism with noise multiplier ``z_Δ`` on a Poisson-sampled dataset of clients
(:mod:`fedtune.privacy.accountant` composes it).

Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021, Alg. 1 / eq. 3): with
target quantile ``γ``, each client also reports ``b_i = 1[‖u_i‖ ≤ C_t]``; the server forms
``b̃ = (Σ b_i + N(0, σ_b²)) / (q·n)`` and sets ``C_{t+1} = C_t · exp(−η_C (b̃ − γ))``. The two
releases together are a Gaussian mechanism with multiplier ``z`` when
``z_Δ = (z⁻² − (2σ_b)⁻²)^{−1/2}`` (their Theorem 1); ``σ_b = q·n / 20`` as they recommend.
``dp-noise-multiplier`` is that combined ``z`` (for fixed clipping ``z_Δ = z``).

Central DP: the server clips each decoded update and draws the noise. Distributed DP: each
of the ``m`` sampled clients clips its own update and adds ``N(0, σ_Δ² / s)`` with
``s = ⌈(1 − dp-dropout-tolerance) · m⌉``, so any ``s`` or more surviving clients sum to at
least the central noise; a round with fewer survivors is skipped and nothing is applied.

Everything here acts on flat vectors ``u`` of the round's *space* (:mod:`fedtune.privacy.space`):
the K coefficients of a codec with a shared linear basis, or the d adapter parameters.

Noise keys: by default every noise draw takes a fresh 64-bit key from the OS
(``secrets``), because noise that anyone can regenerate from the run seed protects nothing;
``dp-seeded-noise=true`` derives the keys from the run seed instead, for reproducible studies
(the draws themselves always come from :func:`fedtune.rng.normal`).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedtune import rng
from fedtune.privacy.accountant import Accountant

_NOISE_TAG = 0xD9_501  # the server's noise key, per round
_CLIENT_TAG = 0xD9_C11  # a client's noise key, from its issued key


@dataclass(frozen=True)
class DPSpec:
    """The DP parameters of a run (built from the ``dp-*`` run-config keys by fedtune.parts)."""

    mode: str  # 'central' | 'distributed'
    noise_multiplier: float  # z of the whole round (update and clip count together)
    clip_norm: float  # C_0
    num_clients: int  # n
    q: float  # Poisson sampling rate (fraction-train)
    delta: float
    target_quantile: float = 0.0  # γ; 0 = fixed clipping
    clip_lr: float = 0.2  # η_C (Andrew et al. use 0.2)
    target_epsilon: float = 0.0  # 0 = no stop
    accountant: str = "rdp"
    dropout_tolerance: float = 0.0
    seeded_noise: bool = False
    run_seed: int = 0

    @property
    def adaptive(self) -> bool:
        return self.target_quantile > 0

    @property
    def expected_clients(self) -> float:
        """``q·n``: the fixed denominator of the estimator."""
        return self.q * self.num_clients

    @property
    def count_std(self) -> float:
        """``σ_b``, the noise on the clipped count (Andrew et al.: expected clients / 20)."""
        return self.expected_clients / 20.0 if self.adaptive else 0.0

    @property
    def update_multiplier(self) -> float:
        """``z_Δ``: ``z`` itself for fixed clipping, else what is left of it after the count."""
        z = self.noise_multiplier
        if not self.adaptive:
            return z
        rest = z**-2 - (2 * self.count_std) ** -2
        if rest <= 0:
            raise ValueError(
                f"dp-noise-multiplier {z:g} is too large for adaptive clipping with "
                f"{self.expected_clients:g} expected clients per round: the clipped count's "
                f"noise (std {self.count_std:g} = expected clients / 20) alone is only as private "
                f"as z = {2 * self.count_std:g}; lower dp-noise-multiplier or sample more clients"
            )
        return float(rest**-0.5)


@dataclass(frozen=True)
class ClientDP:
    """What one client applies to its own update before sending (distributed DP, SecAgg)."""

    clip: float  # C_t
    noise_std: float = 0.0  # σ_Δ / √s (0: the server adds the noise)
    bit_std: float = 0.0  # σ_b / √s
    seeded: bool = False


@dataclass
class Release:
    """What one private round released: the estimate ``S / (q·n)`` and what to log."""

    vector: torch.Tensor | None  # None: skipped, nothing applied
    factors: list[float] = field(default_factory=list)  # central: each client's clip factor
    info: dict[str, float] = field(default_factory=dict)
    note: str = ""


def flat_norm(u: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(u.double()))


def clip_vector(u: torch.Tensor, c: float) -> tuple[torch.Tensor, float, float]:
    """``(u · min(1, c/‖u‖), the factor, b = 1[‖u‖ ≤ c])``."""
    n = flat_norm(u)
    f = 1.0 if n <= c else c / n
    return (u if f == 1.0 else u * f), f, float(n <= c)


def noise(key: int, n: int, std: float) -> torch.Tensor:
    """``std · N(0, I_n)`` from the portable generator."""
    return rng.normal(key, 0, n) * std if std > 0 else torch.zeros(n)


def fresh_key() -> int:
    return secrets.randbits(64)


def client_key(issued: int, seeded: bool) -> int:
    """A client's noise key: derived from its issued key when seeded, else from the OS."""
    return rng.derive_key(issued, _CLIENT_TAG) if seeded else fresh_key()


def privatize_vector(
    u: torch.Tensor, params: ClientDP, issued_key: int
) -> tuple[torch.Tensor, float]:
    """A client's side of the mechanism: clip to ``C_t``, add its share of the noise; returns
    the vector to send and its (noised) clip bit ``b_i``."""
    u, _, bit = clip_vector(u.detach().to(torch.float32).reshape(-1), params.clip)
    k = client_key(issued_key, params.seeded)
    u = u + noise(k, u.numel(), params.noise_std)
    if params.bit_std > 0:
        bit += float(rng.normal(k, 1, 1)[0]) * params.bit_std
    return u, bit


class DPFedAvg:
    """The server's side: the clip norm of each round, the noise, the estimate, the accountant."""

    def __init__(self, spec: DPSpec) -> None:
        self.spec = spec
        self.z_update = spec.update_multiplier
        self.clip = spec.clip_norm
        self.accountant = Accountant(spec.accountant, spec.q, spec.noise_multiplier, spec.delta)

    # ------------------------------------------------------------------ before a round
    def exhausted(self) -> bool:
        """True when one more round would spend more than ``dp-target-epsilon``."""
        t = self.spec.target_epsilon
        return t > 0 and self.accountant.next_epsilon() > t

    def survivors_needed(self, sampled: int) -> int:
        """``s``: the fewest surviving clients whose noise still sums to the central noise."""
        if self.spec.mode != "distributed":
            return 0
        return max(1, math.ceil((1.0 - self.spec.dropout_tolerance) * sampled - 1e-9))

    def client_params(self, sampled: int, *, client_side: bool) -> ClientDP | None:
        """What each of the ``sampled`` clients of this round must do itself (None: nothing).
        ``client_side``: clients clip too (distributed DP, or any DP under SecAgg)."""
        s = self.spec
        if s.mode == "central" and not client_side:
            return None
        if s.mode == "central":
            return ClientDP(self.clip, seeded=s.seeded_noise)
        need = max(1, self.survivors_needed(sampled))
        return ClientDP(
            self.clip,
            noise_std=self.z_update * self.clip / math.sqrt(need),
            bit_std=s.count_std / math.sqrt(need),
            seeded=s.seeded_noise,
        )

    # ------------------------------------------------------------------ the release
    def release(
        self,
        server_round: int,
        *,
        vectors: Sequence[torch.Tensor] = (),
        bits: Sequence[float] = (),
        summed: torch.Tensor | None = None,
        bit_sum: float = 0.0,
        count: int | None = None,
        sampled: int | None = None,
        dim: int,
    ) -> Release:
        """The private estimate of round ``server_round``.

        Central without SecAgg: ``vectors`` are the clients' raw vectors (clipped here).
        Otherwise (``summed``, or distributed ``vectors``) the clients clipped themselves and
        the server only adds what the mode says. ``count``: how many contributed;
        ``sampled``: how many were asked (distributed: at least ``s`` must survive).
        """
        s, c = self.spec, self.clip
        n_in = count if count is not None else len(vectors)
        out = Release(None)
        if summed is None:
            total = torch.zeros(dim, dtype=torch.float32)
            if s.mode == "central":
                bit_sum = 0.0
                for u in vectors:
                    v, f, b = clip_vector(u.reshape(-1).to(torch.float32), c)
                    total += v
                    out.factors.append(f)
                    bit_sum += b
            else:
                for u in vectors:
                    total += u.reshape(-1).to(torch.float32)
                bit_sum = float(sum(bits))
                out.factors = [1.0] * len(vectors)
        else:
            total = summed.reshape(-1).to(torch.float32).clone()
        need = self.survivors_needed(sampled if sampled is not None else n_in)
        eps_before = self.accountant.epsilon()
        eps = self.accountant.step()  # a sampled round is counted whether or not it applies
        out.info = {
            "dp-epsilon": eps,
            "dp-delta": s.delta,
            "dp-clip-norm": c,
            "dp-noise-std": self.z_update * c,
            "dp-contributors": float(n_in),
        }
        if s.mode == "distributed" and n_in < need:
            out.note = (
                f"distributed DP: {n_in} clients survived, fewer than the {need} whose noise "
                "adds up to the round's noise; nothing applied"
            )
            return out
        if s.mode == "central":
            key = (
                rng.derive_key(s.run_seed, server_round, _NOISE_TAG)
                if s.seeded_noise
                else fresh_key()
            )
            total += noise(key, dim, self.z_update * c)
            if s.adaptive:
                bit_sum += float(rng.normal(key, 1, 1)[0]) * s.count_std
        denom = s.expected_clients
        out.vector = total / denom
        if s.adaptive:
            frac = bit_sum / denom
            self.clip = c * math.exp(-s.clip_lr * (frac - s.target_quantile))
            out.info["dp-unclipped-fraction"] = frac
        out.note = (
            f"DP ({s.mode}): clip {c:.4g}, noise std {self.z_update * c:.4g} on the sum of "
            f"{n_in}, epsilon {eps_before:.4g} -> {eps:.4g} at delta {s.delta:.3g}"
        )
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.accountant.rounds, "clip": self.clip}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd:
            self.accountant.rounds = int(sd.get("rounds", 0))
            self.clip = float(sd.get("clip", self.spec.clip_norm))
