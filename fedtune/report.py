"""What a run shows a person: the terminal header, the final lines, ``curves.png``, ``log.txt``.

Both entry points (``fedtune.launch`` and ``fedtune.simulate``) and the ServerApp go through
here, so a run looks the same whichever way it was started:

* :func:`route_library_output` sends third-party warnings and log records (transformers,
  datasets, Ray, ...) to ``runs/<run>/log.txt`` instead of the terminal, unless verbose;
* :func:`plot_curves` writes ``curves.png`` (held-out metric and loss vs round and vs
  cumulative uplink bytes) from ``metrics.jsonl``;
* :func:`final_lines` is the table and the paths a run ends with, printed once.

Nothing here imports Flower or torch.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

LOG_NAME = "log.txt"
PLOT_NAME = "curves.png"

# loggers of the libraries whose chatter belongs in log.txt, not on the terminal
LIBRARY_LOGGERS = ("transformers", "datasets", "peft", "huggingface_hub", "flwr_datasets", "ray")


def verbose_from_env() -> bool:
    """``FEDTUNE_VERBOSE=1`` (or true/yes) asks for every third-party line on the terminal."""
    return os.environ.get("FEDTUNE_VERBOSE", "").strip().lower() in ("1", "true", "yes", "on")


class _LogFile:
    """Where routed warnings go: one append-mode file, opened once per path."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.stream: TextIO | None = None
        self.verbose = False

    def open(self, path: Path) -> TextIO:
        if self.stream is None or self.path != path:
            if self.stream is not None:
                self.stream.close()
            path.parent.mkdir(parents=True, exist_ok=True)
            self.stream = path.open("a", buffering=1)  # line-buffered: tail -f shows it live
            self.path = path
        return self.stream


_LOG = _LogFile()
_HANDLER_ATTR = "_fedtune_log_txt"


def route_library_output(log_path: Path, verbose: bool = False) -> Path:
    """Send Python warnings and third-party log records to ``log_path`` (and, if ``verbose``,
    to stderr as well). Returns the log path.

    Why warnings and logging, and not stderr itself: a library's FutureWarning or load report
    goes through :mod:`warnings` or :mod:`logging`; our own lines are printed to stdout. So the
    terminal keeps fedtune's lines and errors (tracebacks still reach stderr), and nothing of a
    library is lost: it is in the log file. Idempotent: calling it again moves the routing to
    the new path.
    """
    stream = _LOG.open(Path(log_path))
    _LOG.verbose = verbose

    def showwarning(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        text = warnings.formatwarning(message, category, filename, lineno, line)
        stream.write(text)
        if verbose:
            sys.stderr.write(text)

    warnings.showwarning = showwarning
    if not verbose:
        _install_library_handlers()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    setattr(handler, _HANDLER_ATTR, True)
    for name in LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        for h in [h for h in lg.handlers if getattr(h, _HANDLER_ATTR, False)]:
            lg.removeHandler(h)
        lg.addHandler(handler)
        if not verbose:
            # the library's own stderr handler (transformers installs one) stays silent; the
            # record still reaches our file handler, which has no level of its own
            for h in lg.handlers:
                if h is not handler and isinstance(h, logging.StreamHandler):
                    h.setLevel(logging.CRITICAL + 1)
    return Path(log_path)


def _install_library_handlers() -> None:
    """Let transformers and datasets install their default stderr handlers now (they do so
    lazily, on first use), so that the routing below finds and silences them; a handler added
    after the routing would print to the terminal again."""
    import importlib.util

    if importlib.util.find_spec("transformers") is not None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()
    if importlib.util.find_spec("datasets") is not None:
        import datasets.utils.logging  # noqa: F401  (configures its root logger on import)


def quiet_progress_bars() -> None:
    """No per-call progress bars of datasets / transformers (the partitioner's ``map``, file
    downloads, flwr-datasets' plain tqdm bars). Unlike ``pipeline.quiet_libraries`` this keeps
    warnings and load reports, which :func:`route_library_output` sends to the log.
    ``TQDM_DISABLE=1`` reaches the processes started after this (SuperLink, ServerApp, Ray
    actors); tqdm reads it when imported, so bars of this process are switched off directly."""
    from functools import partialmethod

    import datasets
    import tqdm
    import transformers

    os.environ.setdefault("TQDM_DISABLE", "1")
    if not getattr(tqdm.tqdm, "_fedtune_quiet", False):
        tqdm.tqdm.__init__ = partialmethod(tqdm.tqdm.__init__, disable=True)  # type: ignore[method-assign]
        tqdm.tqdm._fedtune_quiet = True  # type: ignore[attr-defined]

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def move_log(new_path: Path) -> Path:
    """Move the routed log (and what it holds so far) to ``new_path``: the launcher logs its
    preflight to a temporary file, and moves it into the run folder once that exists."""
    old = _LOG.path
    if _LOG.stream is not None:
        _LOG.stream.close()
        _LOG.stream = None
    new_path = Path(new_path)
    new_path.parent.mkdir(parents=True, exist_ok=True)
    if old is not None and old.exists() and old != new_path:
        with new_path.open("a") as f:
            f.write(old.read_text(errors="replace"))
        old.unlink()
    return route_library_output(new_path, _LOG.verbose)


def close_log() -> None:
    """Stop routing to the log file (a test, or an entry point that is done)."""
    if _LOG.stream is not None:
        _LOG.stream.close()
    _LOG.stream, _LOG.path = None, None
    warnings.showwarning = _ORIGINAL_SHOWWARNING
    for name in LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        for h in [h for h in lg.handlers if getattr(h, _HANDLER_ATTR, False)]:
            lg.removeHandler(h)


_ORIGINAL_SHOWWARNING = warnings.showwarning

# one line of `flwr run --stream`: Flower's log format (``INFO :      message``), colours and
# Ray's actor prefix (``(ClientAppActor pid=123) message``) stripped by terminal_line
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_FLWR_LOG = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:\s*(.*)$")
_RAY_PREFIX = re.compile(r"^\((?:pid=\d+|[\w.]+ pid=\d+(?:, ip=[\d.]+)?)\)\s?")
_OUR_ROUND_NOTE = re.compile(r"^round \d+: ")  # the strategy's per-round warnings


def strip_ansi(line: str) -> str:
    return _ANSI.sub("", line)


def terminal_line(raw: str) -> str | None:
    """What the quiet terminal shows of one line of ``flwr run`` output, or None (log only).

    Shown: fedtune's own lines (``fedtune: ...``, from the ServerApp's log or a ClientApp's
    stderr), the strategy's per-round warnings (``round 3: dropped update of slot 2: ...``)
    and every ERROR / CRITICAL record. Everything else -- Flower's banners and deprecation
    notes, Ray's tips, library warnings and load reports, tracebacks -- stays in log.txt
    (the launcher prints the end of the log when a run fails).
    """
    line = strip_ansi(raw).rstrip("\n")
    line = _RAY_PREFIX.sub("", line)
    m = _FLWR_LOG.match(line)
    if m is None:
        return line.strip() if line.strip().startswith("fedtune:") else None
    level, msg = m.group(1), m.group(2).strip()
    msg = _RAY_PREFIX.sub("", msg)
    if msg.startswith("fedtune:"):
        return msg
    if level in ("ERROR", "CRITICAL"):
        return f"{level.lower()}: {msg}" if msg else None
    if level == "WARNING" and _OUR_ROUND_NOTE.match(msg):
        return f"fedtune: {msg}"
    return None


@contextmanager
def stdout_to(stream: TextIO) -> Iterator[None]:
    """Redirect ``sys.stdout`` for a block (loaders that print instead of logging)."""
    old = sys.stdout
    sys.stdout = stream
    try:
        yield
    finally:
        sys.stdout = old


def header_lines(
    cfg: Any, client_names: list[str], n_params: int, baseline: float, run_dir: Path
) -> list[str]:
    """What the run is, in three lines: model/adapter/codec/merger, clients, sizes, baseline."""
    adapter = cfg.adapter
    if adapter == "lora":
        adapter += f" r={cfg.lora_r}"
    elif adapter == "mos":
        adapter += f" r={cfg.mos_r}"
    opt = f", server-opt {cfg.server_opt}" if cfg.server_opt != "none" else ""
    names = ", ".join(client_names[:4]) + (", ..." if len(client_names) > 4 else "")
    n = len(client_names)
    sampled = min(n, max(int(n * cfg.fraction_train), cfg.min_train_nodes))  # round.sample
    base = f"{baseline:.4f}" if baseline == baseline else "-"  # NaN for causal LM
    return [
        f"fedtune: model {cfg.model} | adapter {adapter} | codec {cfg.codec} | "
        f"merger {cfg.merger}{opt}",
        f"fedtune: {n} clients ({names}), {sampled} per round"
        f", {cfg.num_rounds} rounds of {cfg.local_steps} local steps",
        f"fedtune: {n_params:,} trainable parameters | majority-class baseline {base} | "
        f"run folder {run_dir}",
    ]


def cumulative_uplink(rows: list[dict[str, Any]]) -> list[int]:
    """Bytes sent up by all clients up to and including each row's round."""
    total, out = 0, []
    for r in rows:
        total += int(r.get("bytes-up") or 0)
        out.append(total)
    return out


def plot_curves(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """``curves.png``: held-out metric and loss vs round (top) and vs cumulative uplink bytes
    (bottom). Accuracy for classification, perplexity for causal LM."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    metric = "test-accuracy" if any("test-accuracy" in r for r in rows) else "test-perplexity"
    label = {"test-accuracy": "held-out accuracy", "test-perplexity": "held-out perplexity"}[
        metric
    ]
    rounds = [r["round"] for r in rows]
    up = cumulative_uplink(rows)

    def col(key: str) -> list[float]:
        return [float("nan") if r.get(key) is None else float(r[key]) for r in rows]

    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for i, (key, ylab) in enumerate(((metric, label), ("test-loss", "held-out loss"))):
        axes[0][i].plot(rounds, col(key), marker="o")
        axes[0][i].set_xlabel("round")
        axes[0][i].xaxis.set_major_locator(MaxNLocator(integer=True))
        # what the same accuracy cost in communication: codecs differ here, not per round
        axes[1][i].plot(up, col(key), marker="o", color="tab:orange")
        axes[1][i].set_xlabel("cumulative uplink bytes (all clients)")
        for ax in (axes[0][i], axes[1][i]):
            ax.set_ylabel(ylab)
            ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def final_lines(run_dir: Path) -> str:
    """The table of every round and where the results are: what a run ends with, once."""
    from fedtune.metrics import MetricsLog, summary_table

    rows = MetricsLog(run_dir / "metrics.jsonl").rows()
    lines = [summary_table(rows).rstrip("\n")]
    secs = [float(r["seconds"]) for r in rows if r.get("round", 0) > 0 and r.get("seconds")]
    if secs:
        lines.append(
            f"fedtune: {len(secs)} rounds in {sum(secs):.0f} s ({sum(secs) / len(secs):.1f} s a round)"
        )
    plot = run_dir / PLOT_NAME
    if plot.exists():
        lines.append(f"fedtune: plot    {plot}")
    lines.append(f"fedtune: metrics {run_dir / 'metrics.jsonl'}")
    if (run_dir / "adapter").exists():
        lines.append(f"fedtune: adapter {run_dir / 'adapter'}")
    if (run_dir / LOG_NAME).exists():
        lines.append(f"fedtune: log     {run_dir / LOG_NAME}")
    return "\n".join(lines)
