"""Server optimizers acting on the merged delta (FedOpt).

Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2. The merged delta
``Δ_t`` (output of any merger) is the negative pseudo-gradient; with ``β1, β2, τ, η``:

* ``m_t = β1 m_{t−1} + (1 − β1) Δ_t``                      (m_{−1} = 0)
* FedAdagrad ``v_t = v_{t−1} + Δ_t²``
* FedAdam    ``v_t = β2 v_{t−1} + (1 − β2) Δ_t²``
* FedYogi    ``v_t = v_{t−1} − (1 − β2) Δ_t² sign(v_{t−1} − Δ_t²)``
* ``x_{t+1} = x_t + η m_t / (√v_t + τ)``

``v_{−1} = τ²`` as in the paper's initialisation (``v_{−1} ≥ τ²``); there is no bias
correction. *Deviation from Flower:* Flower's FedOpt starts ``v`` at 0 and its FedAdam adds
Adam's bias correction; ``v_init=0.0`` reproduces the former.

FedAvgM (Hsu et al., "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification", 2019): ``v_t = μ v_{t−1} + Δ_t``, ``x_{t+1} = x_t + η v_t``
(Flower's ``FedAvgM`` with ``v`` starting at the first pseudo-gradient is the same thing).

``sgd`` applies ``x + η Δ`` and ``none`` applies ``x + Δ`` (plain FedAvg-style apply).

State for checkpoints: ``state_dict()`` holds only tensors and ints (``step`` plus
``m/<name>`` and ``v/<name>``); floats (hyper-parameters) come from the config.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor

from fedtune.registry import Registry

from .base import check_range


class ServerOpt(abc.ABC):
    """``step(global_state, merged_delta) -> new_global_state``; stateful across rounds."""

    #: Names of the per-tensor buffers this optimizer keeps (subset of {"m", "v"}).
    buffers: tuple[str, ...] = ()

    @property
    def stateless(self) -> bool:
        """No state carried across rounds: a client can replay a step it did not see (the
        compact downlink), and exact mode's residual is not undone by momentum."""
        return not self.buffers

    def __init__(self) -> None:
        self.step_count = 0
        self.state: dict[str, dict[str, Tensor]] = {b: {} for b in self.buffers}

    def step(
        self, global_state: Mapping[str, Tensor], delta: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Apply one server update; inputs are not modified."""
        if tuple(global_state.keys()) != tuple(delta.keys()):
            raise ValueError(
                "merged delta and global state have different tensor names: "
                f"{sorted(set(global_state) ^ set(delta))}"
            )
        out: dict[str, Tensor] = {}
        for name, x in global_state.items():
            d = delta[name]
            if d.shape != x.shape:
                raise ValueError(
                    f"delta[{name!r}] has shape {tuple(d.shape)}, global has {tuple(x.shape)}"
                )
            if not bool(torch.isfinite(d).all()):
                raise ValueError(f"delta[{name!r}] contains NaN or Inf")
            upd = self._update(name, d.to(torch.float32))
            out[name] = (x.to(torch.float32) + upd).to(x.dtype)
        self.step_count += 1
        return out

    def _buf(self, kind: str, name: str, like: Tensor, init: float) -> Tensor:
        b = self.state[kind].get(name)
        if b is None:
            b = torch.full_like(like, init, dtype=torch.float32)
            self.state[kind][name] = b
        elif b.shape != like.shape:
            raise ValueError(f"optimizer state {kind}/{name} has shape {tuple(b.shape)}")
        return b

    @abc.abstractmethod
    def _update(self, name: str, delta: Tensor) -> Tensor:
        """The additive update for one tensor (may update buffers in place)."""

    def state_dict(self) -> dict[str, Tensor | int]:
        sd: dict[str, Tensor | int] = {"step": self.step_count}
        for kind, bufs in self.state.items():
            for name, t in bufs.items():
                sd[f"{kind}/{name}"] = t.clone()
        return sd

    def load_state_dict(self, sd: Mapping[str, Tensor | int]) -> None:
        if "step" not in sd or not isinstance(sd["step"], int):
            raise ValueError("server optimizer state needs an int 'step'")
        state: dict[str, dict[str, Tensor]] = {b: {} for b in self.buffers}
        for k, v in sd.items():
            if k == "step":
                continue
            kind, _, name = k.partition("/")
            if kind not in state or not name:
                raise ValueError(
                    f"unexpected server optimizer state key {k!r} for {type(self).__name__}"
                )
            if not isinstance(v, Tensor):
                raise ValueError(f"server optimizer state {k!r} must be a tensor")
            state[kind][name] = v.detach().to(torch.float32).clone()
        self.step_count = int(sd["step"])
        self.state = state


SERVER_OPTS: Registry[ServerOpt] = Registry("server optimizer")


_F = TypeVar("_F", bound=Callable[..., ServerOpt])


def register_server_opt(name: str) -> Callable[[_F], _F]:
    """Decorator registering a server optimizer class under ``name``."""
    deco = SERVER_OPTS.register(name)

    def wrap(factory: _F) -> _F:
        deco(factory)
        return factory

    return wrap


def get_server_opt(name: str, **options: Any) -> ServerOpt:
    """Build server optimizer ``name``; unknown names/options raise ``RegistryError``."""
    return SERVER_OPTS.get(name, **options)


def server_opt_names() -> list[str]:
    return SERVER_OPTS.names()


def _lr(lr: float) -> float:
    v = float(lr)
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    return v


@register_server_opt("none")
class NoOpt(ServerOpt):
    """``x + Δ``: apply the merged delta as is."""

    def _update(self, name: str, delta: Tensor) -> Tensor:
        return delta


@register_server_opt("sgd")
class ServerSGD(ServerOpt):
    """``x + η Δ`` (η = 1 is FedAvg)."""

    def __init__(self, lr: float = 1.0) -> None:
        super().__init__()
        self.lr = _lr(lr)

    def _update(self, name: str, delta: Tensor) -> Tensor:
        return delta * self.lr


@register_server_opt("fedavgm")
class FedAvgM(ServerOpt):
    """Server momentum: ``v = μ v + Δ``; ``x + η v``."""

    buffers = ("m",)

    def __init__(self, lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__()
        self.lr = _lr(lr)
        self.momentum = check_range("momentum", momentum, 0.0, 1.0, hi_open=True)

    def _update(self, name: str, delta: Tensor) -> Tensor:
        m = self._buf("m", name, delta, 0.0)
        m.mul_(self.momentum).add_(delta)
        return m * self.lr


class _Adaptive(ServerOpt):
    buffers = ("m", "v")

    def __init__(
        self,
        lr: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        v_init: float | None = None,
    ) -> None:
        super().__init__()
        self.lr = _lr(lr)
        self.beta1 = check_range("beta1", beta1, 0.0, 1.0, hi_open=True)
        self.beta2 = check_range("beta2", beta2, 0.0, 1.0, hi_open=True)
        self.tau = check_range("tau", tau, 0.0, math.inf, lo_open=True, hi_open=True)
        self.v_init = (
            self.tau**2
            if v_init is None
            else check_range("v_init", v_init, 0.0, math.inf, hi_open=True)
        )

    def _update(self, name: str, delta: Tensor) -> Tensor:
        m = self._buf("m", name, delta, 0.0)
        v = self._buf("v", name, delta, self.v_init)
        m.mul_(self.beta1).add_(delta, alpha=1.0 - self.beta1)
        self._second_moment(v, delta * delta)
        return self.lr * m / (v.sqrt() + self.tau)

    @abc.abstractmethod
    def _second_moment(self, v: Tensor, g2: Tensor) -> None: ...


@register_server_opt("fedadagrad")
class FedAdagrad(_Adaptive):
    """``v = v + Δ²`` (no beta2)."""

    def __init__(
        self, lr: float = 1e-2, beta1: float = 0.9, tau: float = 1e-3, v_init: float | None = None
    ) -> None:
        super().__init__(lr=lr, beta1=beta1, beta2=0.0, tau=tau, v_init=v_init)

    def _second_moment(self, v: Tensor, g2: Tensor) -> None:
        v.add_(g2)


@register_server_opt("fedadam")
class FedAdam(_Adaptive):
    """``v = β2 v + (1 − β2) Δ²``."""

    def _second_moment(self, v: Tensor, g2: Tensor) -> None:
        v.mul_(self.beta2).add_(g2, alpha=1.0 - self.beta2)


@register_server_opt("fedyogi")
class FedYogi(_Adaptive):
    """``v = v − (1 − β2) Δ² sign(v − Δ²)``."""

    def _second_moment(self, v: Tensor, g2: Tensor) -> None:
        v.sub_((1.0 - self.beta2) * g2 * torch.sign(v - g2))
