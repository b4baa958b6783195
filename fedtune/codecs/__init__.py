"""Update codecs: how a client's update travels to the server.

    from fedtune import codecs
    codec = codecs.get("srht", k=4096, coef_bits=8)
    payload = codec.encode(delta, key, round=t, slot=j)
    delta_hat = codec.decode(payload, like=spec, key=key, round=t, slot=j)

Built in: ``dense``, ``gaussian`` (Ferret reference), ``rademacher``, ``srht``,
``countsketch``, ``spsa`` (zeroth-order scalars), ``topk`` (sparsification). Every decoding
failure raises :class:`PayloadError`. :class:`ErrorFeedback` is the client-side residual memory.
"""

from fedtune.codecs import countsketch, dense, gaussian, rademacher, spsa, srht, topk  # noqa: F401
from fedtune.codecs.base import Codec, PayloadError
from fedtune.codecs.error_feedback import ErrorFeedback
from fedtune.codecs.registry import REGISTRY, get, names, register
from fedtune.codecs.spsa import ZOUpdate

__all__ = [
    "REGISTRY",
    "Codec",
    "ErrorFeedback",
    "PayloadError",
    "ZOUpdate",
    "get",
    "names",
    "register",
]
