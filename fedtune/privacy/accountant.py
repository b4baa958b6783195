"""The privacy spent so far, from Google's ``dp-accounting`` (never hand-written here).

Each training round of DP-FedAvg (McMahan et al., ICLR 2018, Alg. 1) is one Poisson-sampled
Gaussian mechanism: every client takes part independently with probability ``q``
(``fraction-train``; :func:`fedtune.round.sample` with ``poisson=True`` draws exactly this),
and the clipped sum gets Gaussian noise of ``z`` times its add/remove-one sensitivity. The
run is their composition, a ``SelfComposedDpEvent`` of ``PoissonSampledDpEvent(q,
GaussianDpEvent(z))`` under the ``ADD_OR_REMOVE_ONE`` relation (user-level: the unit is a
client, Andrew et al. NeurIPS 2021 §3), handed to the library's RDP accountant (Mironov 2017;
Mironov, Talwar, Zhang 2019) or its PLD accountant (Meiser & Mohammadi 2018; Doroshenko et
al. 2022), which is tighter. ``(ε, δ)`` after ``t`` rounds is ``get_epsilon(δ)`` of that
composition.
"""

from __future__ import annotations

import logging
from typing import Any

import dp_accounting as dpa

ACCOUNTANTS = ("rdp", "pld")

# dp-accounting logs a warning per RDP order that it drops (small orders at large q): noise
logging.getLogger("absl").setLevel(logging.ERROR)


def round_event(q: float, z: float) -> Any:
    """One round: a Poisson(q)-sampled Gaussian mechanism with noise multiplier z."""
    gauss = dpa.GaussianDpEvent(z)
    return gauss if q >= 1.0 else dpa.PoissonSampledDpEvent(q, gauss)


def fresh(kind: str) -> Any:
    """A new, empty accountant of the library (``rdp`` or ``pld``), add/remove-one."""
    rel = dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
    if kind == "rdp":
        return dpa.rdp.RdpAccountant(neighboring_relation=rel)
    if kind == "pld":
        return dpa.pld.PLDAccountant(neighboring_relation=rel)
    raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {kind!r}")


def epsilon(kind: str, q: float, z: float, rounds: int, delta: float) -> float:
    """ε after ``rounds`` rounds at ``delta`` (``inf`` without noise, 0 before round 1)."""
    if rounds <= 0:
        return 0.0
    if z <= 0:
        return float("inf")
    acc = fresh(kind)
    acc.compose(round_event(q, z), rounds)
    return float(acc.get_epsilon(delta))


def noise_for_epsilon(kind: str, q: float, rounds: int, eps: float, delta: float) -> float:
    """The smallest noise multiplier whose ``rounds`` rounds spend at most ``eps`` at ``delta``
    (the library's ``calibrate_dp_mechanism``; benchmarks pick z with it)."""

    def make(z: float) -> Any:
        return dpa.SelfComposedDpEvent(round_event(q, z), rounds)

    return float(
        dpa.mechanism_calibration.calibrate_dp_mechanism(
            lambda: fresh(kind),
            make,
            eps,
            delta,
            dpa.mechanism_calibration.LowerEndpointAndGuess(1e-3, 1.0),
        )
    )


class Accountant:
    """Composes one event per round; ``epsilon`` is what the rounds so far spent."""

    def __init__(self, kind: str, q: float, z: float, delta: float) -> None:
        fresh(kind)  # fail on a bad name now, not at round 1
        self.kind, self.q, self.z, self.delta = kind, q, z, delta
        self.rounds = 0

    def step(self) -> float:
        """Record one more round; returns ε after it."""
        self.rounds += 1
        return self.epsilon()

    def epsilon(self, rounds: int | None = None) -> float:
        return epsilon(
            self.kind, self.q, self.z, self.rounds if rounds is None else rounds, self.delta
        )

    def next_epsilon(self) -> float:
        """ε if one more round ran (what ``dp-target-epsilon`` checks before a round)."""
        return self.epsilon(self.rounds + 1)
