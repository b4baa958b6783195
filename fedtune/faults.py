"""Fault injection for tests and demos: chosen clients fail the way real ones do.

``fault`` picks the failure, ``fault-clients`` the partition ids that fail (comma list),
``fault-rounds`` the rounds (comma list; empty = every round), ``fault-seconds`` how long a
hanging client blocks:

* ``raise``: the ClientApp raises; Flower sends the server an error reply.
* ``hang``: the ClientApp sleeps ``fault-seconds`` before training (a straggler); its reply
  arrives after the server's ``round-timeout`` and is ignored.
* ``exit``: the ClientApp process dies (``os._exit``) without replying: in deployment the
  SuperNode loses its ClientApp process; in simulation the Ray actor dies.

The ClientApp calls :func:`inject` once at the start of every train message. Nothing here
imports Flower. docs/reliability.md describes what the server does in each case.
"""

from __future__ import annotations

import os
import sys
import time

from fedtune.config import Config, int_list

EXIT_CODE = 17  # what an injected ``exit`` leaves as the process's exit status


class InjectedFault(RuntimeError):
    """Raised by a client with ``fault='raise'``."""


def applies(cfg: Config, partition_id: int, server_round: int) -> bool:
    """Whether client ``partition_id`` fails in ``server_round``."""
    if cfg.fault == "none" or partition_id not in int_list(cfg, "fault_clients"):
        return False
    rounds = int_list(cfg, "fault_rounds")
    return not rounds or server_round in rounds


def inject(cfg: Config, partition_id: int, server_round: int) -> None:
    """Fail as configured if this client and round are chosen; otherwise do nothing."""
    if not applies(cfg, partition_id, server_round):
        return
    what = f"fedtune: injected fault {cfg.fault!r} in client {partition_id}, round {server_round}"
    if cfg.fault == "raise":
        raise InjectedFault(what)
    print(what, file=sys.stderr, flush=True)
    if cfg.fault == "hang":
        time.sleep(cfg.fault_seconds)
    elif cfg.fault == "exit":
        os._exit(EXIT_CODE)
