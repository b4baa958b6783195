"""Run a local simulation with ``flwr run`` and clean up after it.

``python -m fedtune.launch [--run-config FILE_OR_KV ...] [--num-supernodes N]``

What ``flwr run`` alone does not do for us (see research/flower.md section 7):

* validate the config and the data BEFORE starting anything, with a one-line message;
* keep Flower's state in a project-local ``FLWR_HOME`` (``.flwr-home/``), and size the
  simulated federation (one SuperNode per client partition) with ``--federation-config``, as
  Flower 1.42 asks (the ``options.`` fields of a SuperLink connection are deprecated);
* stop the runtime from installing the app's dependencies into a fresh environment
  (``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``: for torch that is a multi-GB download);
* stop the background local SuperLink it leaves running, by its process group;
* keep the terminal quiet: everything ``flwr run`` streams (Flower's banners, Ray's tips,
  library warnings, load reports, the ClientApps' output) goes to ``runs/<run>/log.txt``; the
  terminal shows fedtune's own lines, the strategy's warnings and errors
  (:func:`fedtune.report.terminal_line`). ``--verbose`` or ``FEDTUNE_VERBOSE=1`` shows it all;
* print the run's table, and where its plot, metrics, adapter and log are, once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import IO, Any

from fedtune.config import Config, ConfigError, defaults_from_pyproject, load_toml

ROOT = Path(__file__).resolve().parents[1]

STOP_GRACE_S = 60.0  # after the final adapter is saved (see run_flwr)

_KV = re.compile(r"""([A-Za-z0-9_.-]+)\s*=\s*('[^']*'|"[^"]*"|\S+)""")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a=1 b='x'", "file.toml"]`` -> dict, with TOML value syntax as ``flwr run -c``."""
    out: dict[str, Any] = {}
    for item in items:
        if item.endswith(".toml") and "=" not in item:
            out.update(load_toml(item))
            continue
        pairs = _KV.findall(item)
        if not pairs:
            raise ConfigError(f"cannot read run-config override {item!r}; use key=value pairs")
        for k, v in pairs:
            try:
                out[k] = tomllib.loads(f"x = {v}")["x"]
            except tomllib.TOMLDecodeError:
                out[k] = v  # a bare word: treat as a string, as Flower does
    return out


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process we can read."""
    table: dict[int, tuple[int, str]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        table[int(proc.name)] = (ppid, cmd)
    return table


def _superlink_db(flwr_home: Path) -> Path:
    """Where the local SuperLink of ``flwr_home`` keeps its state (also how we find it)."""
    return flwr_home / "local-superlink" / "state.db"


def stop_superlink(flwr_home: Path, grace: float = 5.0, hard: bool = False) -> int:
    """Stop the local SuperLink started for ``flwr_home`` and everything it spawned.

    The SuperLink is found by its database path, ``flwr_home/local-superlink/state.db``, as a
    whole argument of its command line (a substring test on ``flwr_home`` alone would also
    match, and kill, the SuperLink of a run whose home merely starts with the same path:
    ``.flwr-home/exp1`` vs ``.flwr-home/exp10``);
    its descendants (the simulation process, Ray's GCS, raylet and client actors) start their
    own process groups, so we collect the whole tree first, then SIGTERM every group and
    SIGKILL what is still alive after ``grace`` seconds. ``hard=True`` skips the SIGTERM and
    kills at once, as a crash would (the ServerApp gets no chance to finish its round).
    Returns how many processes were found.
    """
    table = _process_table()
    db = f" {_superlink_db(Path(flwr_home).resolve())} "  # arguments are space-joined
    roots = [
        pid
        for pid, (_, cmd) in table.items()
        if pid != os.getpid() and "flower-superlink" in cmd and db in f"{cmd} "
    ]
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in tree:
            tree.add(pid)
            todo.extend(children.get(pid, []))
    for sig in (signal.SIGKILL,) if hard else (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in tree if Path(f"/proc/{p}").exists()]
        if not alive:
            break
        for pid in alive:
            try:
                os.killpg(os.getpgid(pid), sig)
            except (ProcessLookupError, PermissionError):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while sig == signal.SIGTERM and time.monotonic() < deadline:
            if all(_state(p) in ("", "Z") for p in alive):
                break
            time.sleep(0.2)
    return len(tree)


def _state(pid: int) -> str:
    """The process state letter ('R', 'S', 'Z', ...), or '' when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def write_federation(flwr_home: Path) -> None:
    """Flower's connection config: the managed local SuperLink, and nothing else.

    The federation's size and resources travel with the run (:func:`federation_config`), not
    as ``options.`` fields here, which Flower 1.42 deprecates."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
    )


def federation_config(num_supernodes: int, num_cpus: int, num_gpus: float = 0.0) -> str:
    """``flwr run --federation-config`` value: SuperNodes and per-client resources of the run."""
    return (
        f"num-supernodes={num_supernodes} client-resources-num-cpus={num_cpus} "
        f"client-resources-num-gpus={num_gpus!r}"
    )


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM (kill, a CI timeout) unwinds like Ctrl-C, so the ``finally`` below stops the
    SuperLink, the simulation and Ray instead of leaving them running."""
    raise SystemExit(128 + signum)


def node_overrides(overrides: dict[str, Any], cfg: Config, n_nodes: int) -> dict[str, Any]:
    """Node counts that fit ``n_nodes`` clients unless the user set them (also used by
    ``fedtune.simulate``, so both sample the same clients)."""
    if "min-available-nodes" in overrides:
        return {}
    avail = min(n_nodes, cfg.min_available_nodes) if n_nodes else 1
    out: dict[str, Any] = {"min-available-nodes": avail}
    if "min-train-nodes" not in overrides:
        out["min-train-nodes"] = min(cfg.min_train_nodes, avail)
    return out


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    ap = argparse.ArgumentParser(
        prog="python -m fedtune.launch", description=__doc__.split("\n")[0]
    )
    ap.add_argument(
        "--run-config", "-c", action="append", default=[], help="key=value pairs or a TOML file"
    )
    ap.add_argument(
        "--num-supernodes", type=int, default=0, help="default: one per client partition"
    )
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs per simulated client (Ray)")
    ap.add_argument(
        "--flwr-home",
        default="",
        help="Flower's state folder (default: .flwr-home/<run-name>, one per run, so "
        "concurrent simulations never share or stop each other's SuperLink)",
    )
    ap.add_argument("--app", default=str(ROOT))
    ap.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="show everything Flower, Ray and the libraries print (default: only in "
        "runs/<run>/log.txt); also FEDTUNE_VERBOSE=1",
    )
    ap.add_argument(
        "--stop-grace",
        type=float,
        default=STOP_GRACE_S,
        help="seconds to wait for the simulation to stop after the server saved the final "
        "adapter; a ClientApp still running (a hanging client) is then stopped",
    )
    args = ap.parse_args(argv)
    from fedtune import report

    verbose = args.verbose or report.verbose_from_env()
    # the preflight loads the model and data: its warnings and load report go to a temporary
    # log that moves into the run folder once there is one (a config error leaves no folder)
    fd, tmp_log = tempfile.mkstemp(prefix="fedtune-launch-", suffix=".log")
    os.close(fd)
    report.route_library_output(Path(tmp_log), verbose)
    try:
        overrides = parse_overrides(args.run_config)
        merged = {**defaults_from_pyproject(Path(args.app) / "pyproject.toml"), **overrides}
        from fedtune import parts, pipeline

        if not verbose:
            report.quiet_progress_bars()
        cfg = parts.load_config(merged, app_dir=args.app)
        # preflight: data and model problems surface here, as one line, before Flower starts
        fed = pipeline.federation(cfg)
        pipeline.workbench(cfg, fed)
    except (ConfigError, ValueError, OSError) as e:
        report.close_log()
        Path(tmp_log).unlink(missing_ok=True)
        print(f"fedtune: error: {e}", file=sys.stderr)
        return 2

    n_nodes = args.num_supernodes or len(fed.clients)
    if n_nodes > len(fed.clients):
        report.close_log()
        Path(tmp_log).unlink(missing_ok=True)
        print(
            f"fedtune: error: --num-supernodes {n_nodes} exceeds the {len(fed.clients)} client partitions",
            file=sys.stderr,
        )
        return 2
    out_dir = Path(cfg.output_dir)
    if not out_dir.is_absolute():
        out_dir = Path.cwd() / out_dir
    if cfg.resume:
        run_dir = Path(cfg.resume).resolve()
        run_name = cfg.run_name or run_dir.name
        overrides["resume"] = str(run_dir)
    else:
        from fedtune.metrics import create_run_dir

        # the folder the ServerApp will open (it reuses one holding only log.txt): never an
        # existing run's, so the metrics read at the end are this run's
        base = cfg.run_name or time.strftime("run-%Y%m%d-%H%M%S") + f"-{os.getpid()}"
        run_dir = create_run_dir(out_dir, base)
        run_name = run_dir.name
    log_path = report.move_log(run_dir / report.LOG_NAME)
    overrides.update({"output-dir": str(out_dir), "run-name": run_name})
    overrides.update(node_overrides(overrides, cfg, n_nodes))
    flwr_home = Path(args.flwr_home or ROOT / ".flwr-home" / run_name).resolve()
    write_federation(flwr_home)
    override_file = flwr_home / f"run-config-{run_name}.toml"
    override_file.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in overrides.items()))

    http_port, control_port = free_ports(2)
    env = {
        **os.environ,
        # our own ports: a SuperLink of another run (or user) on Flower's fixed defaults
        # would otherwise be reused with its own environment and state
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        "FLWR_HOME": str(flwr_home),
        # flwr starts `flower-superlink` by name: make this interpreter's scripts findable
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }
    if verbose:
        env["FEDTUNE_VERBOSE"] = "1"
    print(
        f"fedtune: starting Flower's simulation: {n_nodes} SuperNodes, "
        f"{args.num_cpus} CPUs each (Ray); log: {log_path}",
        flush=True,
    )
    flwr = Path(sys.executable).with_name("flwr")
    cmd = [
        *(str(flwr), "run", args.app, "local", "--stream"),
        *("--run-config", str(override_file)),
        *("--federation-config", federation_config(n_nodes, args.num_cpus)),
    ]
    stop_superlink(flwr_home)  # a SuperLink left from an earlier run would keep its old env
    try:
        start_superlink(flwr_home, http_port, control_port, env)
        returncode = run_flwr(
            cmd,
            env,
            run_dir / "adapter" / "adapter_model.safetensors",
            args.stop_grace,
            log=log_path,
            verbose=verbose,
        )
    except RuntimeError as e:
        print(f"fedtune: error: {e}", file=sys.stderr)
        return 1
    finally:
        stop_superlink(flwr_home)
        report.close_log()
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists() or not (run_dir / "adapter").exists():
        tail = log_path.read_text(errors="replace").splitlines()[-25:] if log_path.exists() else []
        print(
            "\n".join(tail)
            + f"\nfedtune: error: the run did not complete (flwr exit code {returncode}); "
            f"the end of {log_path} is above",
            file=sys.stderr,
        )
        return 1
    print(report.final_lines(run_dir))
    return 0


def run_flwr(
    cmd: list[str],
    env: dict[str, str],
    done: Path,
    grace: float,
    log: Path | None = None,
    verbose: bool = False,
) -> int:
    """Run ``flwr run`` and return its exit code, not waiting long for stuck ClientApps.

    Flower's simulation ends only when every running ClientApp has returned: one that hangs
    (or runs far past ``round-timeout``) would keep the finished run open as long. Once the
    server has written ``done`` (the final adapter) we wait ``grace`` seconds more, then stop
    ``flwr run``; the caller stops the SuperLink with the simulation and Ray under it.

    With ``log``, every line ``flwr run`` prints goes to that file and the terminal gets only
    :func:`fedtune.report.terminal_line` of it (every line when ``verbose``).
    """
    started = time.time()
    if log is None:
        proc = subprocess.Popen(cmd, env=env)
        pump = None
    else:
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0
        )
        assert proc.stdout is not None
        pump = threading.Thread(
            target=_pump, args=(proc.stdout, log, verbose), name="flwr-output", daemon=True
        )
        pump.start()
    finished_at = 0.0
    try:
        while True:
            try:
                return proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(OSError):
                if not finished_at and done.stat().st_mtime >= started:
                    finished_at = time.monotonic()
            if finished_at and time.monotonic() - finished_at > grace:
                print(
                    f"fedtune: the server finished, but the simulation is still waiting for a "
                    f"ClientApp after {grace:.0f} s (a client that hangs); stopping it",
                    file=sys.stderr,
                    flush=True,
                )
                proc.terminate()
                try:
                    return proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    return proc.wait()
    finally:
        if pump is not None:
            pump.join(timeout=10)  # the rest of the output, once flwr has exited


def _pump(stream: IO[bytes], log: Path, verbose: bool) -> None:
    """Copy ``flwr run``'s output to ``log`` (colours stripped) and the terminal's share of it
    to stdout, line by line, as it comes."""
    from fedtune import report

    t0 = time.monotonic()
    with log.open("a", buffering=1) as f:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace")
            # seconds since `flwr run` started: where the start-up time goes, read off the log
            f.write(f"[{time.monotonic() - t0:7.1f} s] {report.strip_ansi(line)}")
            if verbose:
                sys.stdout.write(line)
            elif (shown := report.terminal_line(line)) is not None:
                sys.stdout.write(shown + "\n")
            sys.stdout.flush()


def start_superlink(
    flwr_home: Path, http_port: int, control_port: int, env: dict[str, str], timeout: float = 180.0
) -> None:
    """Start the local simulation SuperLink ourselves and wait until it answers.

    ``flwr run`` would start the same process, but gives it a hard-coded 15 s to come up,
    which a loaded machine misses; it reuses a SuperLink it finds answering on its port.
    """
    import urllib.error
    import urllib.request

    db = _superlink_db(flwr_home.resolve())
    state = db.parent
    state.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(Path(sys.executable).with_name("flower-superlink")),
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--control-api-address",
        f"127.0.0.1:{control_port}",
        "--host",
        "127.0.0.1",
        "--port",
        str(http_port),
        "--database",
        str(db),
        "--disable-runtime-dependency-installation",
    ]
    log = (state / "superlink.log").open("ab")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"flower-superlink exited with code {proc.returncode}; see {state / 'superlink.log'}"
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=1) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(
        f"flower-superlink did not answer within {timeout:.0f} s; see {state / 'superlink.log'}"
    )


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on the loopback interface."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


if __name__ == "__main__":
    sys.exit(main())
