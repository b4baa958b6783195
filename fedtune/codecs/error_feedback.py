"""Client-side error feedback: remember what compression lost and resend it next round.

EF (Seide et al. 2014; Karimireddy et al., "Error feedback fixes SignSGD", ICML'19; Stich et
al. 2018): send ``C(Δ_t + e_t)`` and keep ``e_{t+1} = Δ_t + e_t − C(Δ_t + e_t)``. Then
``Σ_t C(·) = Σ_t Δ_t − e_T``: the accumulated error stays bounded instead of growing with t.
It needs a *contractive* compressor (``E‖C(x)−x‖² < ‖x‖²``): use ``unbiased=False`` on the
sketches (the decoder shrinks each block by ``1/(1+ω)``; works with every ``coef_bits``) or
the ``dense`` codec. With an unbiased sketch of variance ``ω = d/K ≫ 1`` (the default) the
residual grows every round (verified in the tests): do not combine the two.

Usage on the client (state survives rounds in Flower's ``Context.state``)::

    ef = ErrorFeedback(); ef.load_state_dict(saved)            # tensors, possibly empty
    sent = ef.apply(delta)                                      # delta + residual
    payload = codec.encode(sent, key, round=t, slot=j)
    ef.update(sent, codec.decode(payload, like=sent, key=key))  # residual = sent - decoded
    saved = ef.state_dict()
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class ErrorFeedback:
    """Residual memory ``e`` (fp32, CPU) keyed by tensor name."""

    def __init__(self) -> None:
        self.residual: dict[str, torch.Tensor] = {}

    def apply(self, delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``delta + residual`` (fp32, on each delta tensor's device)."""
        if self.residual and set(self.residual) != set(delta):
            raise ValueError(
                "error-feedback residual and delta have different tensors: "
                f"{sorted(set(self.residual) ^ set(delta))[:5]}"
            )
        out: dict[str, torch.Tensor] = {}
        for name, t in delta.items():
            x = t.detach().to(torch.float32)
            r = self.residual.get(name)
            if r is not None:
                if r.shape != x.shape:
                    raise ValueError(
                        f"residual {name!r} has shape {tuple(r.shape)}, delta {tuple(x.shape)}"
                    )
                x = x + r.to(x.device)
            out[name] = x
        return out

    def update(
        self, sent_delta: Mapping[str, torch.Tensor], decoded_delta: Mapping[str, torch.Tensor]
    ) -> None:
        """Store ``sent − decoded``: what the server did not receive this round."""
        if set(sent_delta) != set(decoded_delta):
            raise ValueError("sent and decoded deltas have different tensors")
        self.residual = {
            n: sent_delta[n].detach().to("cpu", torch.float32)
            - decoded_delta[n].detach().to("cpu", torch.float32)
            for n in sent_delta
        }

    def reset(self) -> None:
        self.residual = {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in self.residual.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for n, t in state.items():
            if not isinstance(t, torch.Tensor) or not bool(torch.isfinite(t).all()):
                raise ValueError(f"error-feedback state {n!r} must be a finite tensor")
        self.residual = {n: t.detach().to("cpu", torch.float32).clone() for n, t in state.items()}
