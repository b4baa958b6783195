"""The round loop of the ServerApp: train, aggregate, evaluate, checkpoint, from any round.

Flower's ``Strategy.start`` always begins at round 1; resuming needs a loop that can begin
anywhere, so we run the same steps ourselves (no client-side evaluation: the server evaluates
on the held-out split).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord
from flwr.common import log
from flwr.serverapp import Grid

from fedtune.fl.secagg import secure_round
from fedtune.fl.strategy import FedTuneStrategy


def run_rounds(
    strategy: FedTuneStrategy,
    grid: Grid,
    arrays: ArrayRecord,
    *,
    first_round: int,
    num_rounds: int,
    timeout: float,
    evaluate_fn: Callable[[int, ArrayRecord], Any] | None = None,
    after_round: Callable[[int, ArrayRecord], None] | None = None,
    timings: dict[int, dict[str, float]] | None = None,
) -> ArrayRecord:
    """Rounds ``first_round..num_rounds``: train, aggregate, evaluate, checkpoint.

    Flower's ``Strategy.start`` always begins at round 1; resuming needs a loop that can
    begin anywhere, so we run the same steps ourselves (no client-side evaluation: the
    server evaluates on the held-out split). ``timings[t]["wait-seconds"]`` (filled before
    ``evaluate_fn(t, ...)`` runs) is how long round ``t`` waited for the clients' replies:
    their training plus transport; the rest of the round is the server's own time.
    """
    if first_round == 1 and evaluate_fn is not None:
        evaluate_fn(0, arrays)
    for t in range(first_round, num_rounds + 1):
        if strategy.round.budget_exhausted():
            log(INFO, "fedtune: stopping before round %d: it would exceed dp-target-epsilon", t)
            break
        log(INFO, "")
        log(INFO, "[ROUND %s/%s]", t, num_rounds)
        messages = list(strategy.configure_train(t, arrays, ConfigRecord({}), grid))
        t0 = time.monotonic()
        # SecAgg+ (fl/secagg.py): the protocol's four exchanges; the server sees only the sum
        secure = secure_round(strategy, grid, t, messages, timeout) if strategy.private.secagg else None
        plain = bool(messages) and secure is None
        replies = list(grid.send_and_receive(messages, timeout=timeout)) if plain else []
        if timings is not None:
            timings[t] = {"wait-seconds": time.monotonic() - t0}
        missing = sorted(set(strategy.issued) - {m.metadata.src_node_id for m in replies})
        missing = missing if secure is None else []
        if missing:
            slots = ", ".join(str(strategy.issued[n][0]) for n in missing)
            log(
                WARNING,
                "fedtune: round %d: no reply within round-timeout=%.0f s from %d of %d sampled nodes "
                "(slots %s); going on without them",
                *(t, timeout, len(missing), len(strategy.issued), slots),
            )
        new, _ = strategy.aggregate_train(t, replies) if secure is None else secure
        if new is not None:
            arrays = new
        if evaluate_fn is not None:
            evaluate_fn(t, arrays)
        if after_round is not None:
            after_round(t, arrays)
    for slot, (up, down) in strategy.byte_totals().items():
        # per slot: in the log (and bytes-per-client.json), not on the terminal, which a
        # thousand clients would fill
        log(INFO, "slot %d: %d bytes up, %d bytes down", slot, up, down)
    return arrays
