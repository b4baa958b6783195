"""SecAgg+ (fedtune/fl/secagg.py): Flower's protocol, run in process over a small grid, sums
exactly what the plain sum is; dropouts below the threshold are tolerated, above it the round
fails and nothing is applied."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedtune.fl.secagg import maybe_secaggplus, run_protocol, secure_reply, workflow
from fedtune.privacy import secure

C, T = 1.0, secure.TARGET_RANGE


@pytest.fixture(autouse=True)
def _task_identity():  # type: ignore[no-untyped-def]
    """Flower's Message() reads the run / node / task ids a ServerApp process would have."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class LocalGrid:
    """Delivers each message to the node's ClientApp in process; ``drop[stage]`` lists the
    nodes that do not answer that stage (0 setup, 1 share keys, 2 masked vectors, 3 unmask)."""

    def __init__(self, app: ClientApp, nodes: list[int], drop: dict[int, set[int]] | None = None):
        self.app, self.drop, self.stage = app, drop or {}, 0
        self.ctx = {n: Context(1, n, {}, RecordDict(), {}) for n in nodes}
        self.bytes = 0

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        out = []
        for m in messages:
            n = m.metadata.dst_node_id
            self.bytes += sum(r.count_bytes() for r in m.content.array_records.values())
            if n in self.drop.get(self.stage, set()):
                continue
            # a real grid serializes: each node gets (and mutates) its own copy
            reply = self.app(copy.deepcopy(m), self.ctx[n])
            out.append(copy.deepcopy(reply))
        self.stage += 1
        return out


def _on_grid(rng_: np.random.Generator, d: int) -> np.ndarray:
    """Values exactly on SecAgg's quantization grid, so its stochastic rounding is exact."""
    k = rng_.integers(0, T + 1, size=d)
    return k * (2 * C / T) - C


def _app(vectors: dict[int, np.ndarray]) -> ClientApp:
    app = ClientApp(mods=[maybe_secaggplus])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        v = torch.from_numpy(vectors[context.node_id])
        return Message(content=secure_reply(v, 1.0, {"train-loss": 0.5}), reply_to=msg)

    return app


def _run(n: int, drop: dict[int, set[int]] | None = None, d: int = 257, threshold: float = 0.6):  # type: ignore[no-untyped-def]
    g = np.random.default_rng(0)
    nodes = list(range(11, 11 + n))
    vectors = {i: _on_grid(g, d) for i in nodes}
    grid = LocalGrid(_app(vectors), nodes, drop)
    wf = workflow(threshold=threshold, clip_range=C, max_weight=1.0, timeout=10.0)
    contents = {i: RecordDict({}) for i in nodes}
    mean, got, stages = run_protocol(grid, 3, contents, wf)  # type: ignore[arg-type]
    return vectors, mean, got, stages


def test_secure_sum_equals_the_plain_sum_exactly() -> None:
    vectors, mean, got, stages = _run(4)
    assert stages == 4 and mean is not None and len(got) == 4
    plain = sum(vectors.values())
    assert np.array_equal(np.asarray(mean) * 4, plain)  # bit for bit
    # and fedtune.simulate's unmasked arithmetic gives the same numbers
    sim = secure.secure_mean(
        [torch.from_numpy(v) for v in vectors.values()], [1.0] * 4, clip=C, max_weight=1.0,
        keys=[1, 2, 3, 4],
    )  # fmt: skip
    assert torch.equal(sim, torch.from_numpy(np.asarray(mean)).float())
    assert all(fr.metrics["train-loss"] == 0.5 for _, fr in got)


def test_dropout_below_threshold_completes_with_the_survivors_sum() -> None:
    """5 nodes, threshold round(0.6 * 5) = 3: one node dropping after sharing its keys is
    tolerated (its masks are rebuilt from the others' shares); the sum is the other four's."""
    vectors, mean, got, stages = _run(5, drop={2: {13}})
    assert stages == 4 and mean is not None
    survivors = sorted(n for n, _ in got)
    assert survivors == [11, 12, 14, 15]
    plain = sum(vectors[n] for n in survivors)
    assert np.array_equal(np.asarray(mean) * 4, plain)


def test_dropout_above_threshold_fails_cleanly() -> None:
    """Three of five drop: fewer than 3 live neighbours, the protocol halts, no sum."""
    _, mean, got, stages = _run(5, drop={2: {12, 13, 14}})
    assert mean is None and got == [] and stages == 2


def test_failed_round_applies_nothing() -> None:
    """The ServerRound is never called on a failed SecAgg round: the state stays."""
    from types import SimpleNamespace

    from fedtune.fl import secagg
    from fedtune.privacy.settings import PrivateRun

    class Strat(SimpleNamespace):
        def new_stats(self, t):  # type: ignore[no-untyped-def]
            return SimpleNamespace(round=t)

        def finish_round(self, t, res, stats):  # type: ignore[no-untyped-def]
            self.res = res
            return (None if res.skipped else res.state), None

    called = []
    state = {"w": torch.ones(3)}
    strat = Strat(round=SimpleNamespace(dp=None, __call__=lambda *a, **k: called.append(a)),
                  current=state, issued={},
                  private=PrivateRun(secagg=True, secagg_clip_range=C))  # fmt: skip
    msgs = [Message(RecordDict({}), dst_node_id=n, message_type="train") for n in (1,)]
    new, _ = secagg.secure_round(strat, None, 1, msgs, 1.0)  # one node: SecAgg+ needs two
    assert new is None and strat.res.skipped and torch.equal(strat.res.state["w"], state["w"])
    assert not called


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [3.0, 1.0, 2.0]])
def test_simulated_secure_mean_matches_the_weighted_mean(weights: list[float]) -> None:
    g = np.random.default_rng(1)
    xs = [torch.from_numpy(g.uniform(-0.5, 0.5, 1000)) for _ in weights]
    got = secure.secure_mean(xs, weights, clip=C, max_weight=4.0, keys=[5, 6, 7])
    want = sum(w * x for w, x in zip(weights, xs, strict=True)) / sum(weights)
    step = 2 * C / T  # one quantization level per client, at most
    assert float((got.double() - want).abs().max()) < 2 * step * len(xs)
