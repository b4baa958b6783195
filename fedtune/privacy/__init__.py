"""Privacy: user-level DP-FedAvg with an accountant, DP in coefficient space, SecAgg's sums.

* :mod:`fedtune.privacy.dp` — clipping (fixed, adaptive quantile), Gaussian noise (central or
  split across clients), the fixed-denominator estimate (McMahan et al. 2018).
* :mod:`fedtune.privacy.accountant` — (ε, δ) from dp-accounting's RDP / PLD accountant.
* :mod:`fedtune.privacy.space` — the vector space the mechanism acts on: a linear codec's K
  coefficients or the d parameters.
* :mod:`fedtune.privacy.secure` — SecAgg+'s quantized modular sum (the protocol itself runs
  in :mod:`fedtune.fl.secagg`).

docs/privacy.md has the sensitivity argument. Nothing here imports Flower.
"""

from fedtune.privacy.dp import ClientDP, DPFedAvg, DPSpec, Release, privatize_vector
from fedtune.privacy.space import Space, is_linear

__all__ = ["ClientDP", "DPFedAvg", "DPSpec", "Release", "Space", "is_linear", "privatize_vector"]
