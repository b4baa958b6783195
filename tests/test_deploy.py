"""Deployment on loopback through the deploy/ scripts: a SuperLink and three SuperNodes as
separate processes (TLS + SuperNode authentication, and the --insecure debugging mode), a
2-round run with codec='srht' and merger='ties', and a SuperNode with an unregistered key.

Everything lives under tmp_path (certificates, PID files, logs, one FLWR_HOME per process);
every process the scripts start is stopped by its recorded PID, also when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedtune.launch import free_ports

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
RUN_TIMEOUT_S = 900  # a loaded 2-core CI box needs ~3 min; every message starts a fresh process
NODES = 3
DISCONNECT_RUN_TIMEOUT_S = 600  # a run that loses a SuperNode must still end


class Deployment:
    """Runs the deploy/ scripts with FEDTUNE_DEPLOY_DIR in a temporary folder."""

    def __init__(self, base: Path) -> None:
        self.dir = base / "deploy"
        venv_bin = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "FEDTUNE_DEPLOY_DIR": str(self.dir),
            "FLWR_HOME": str(base / "stray-flwr-home"),  # anything not given its own home
            "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "FEDTUNE_START_TIMEOUT": "180",  # a busy CI box starts processes slowly
        }
        self.known: set[int] = set()

    def script(self, name: str, *args: str, check: bool = True, timeout: float = 180) -> str:
        proc = subprocess.run(
            ["bash", str(DEPLOY / f"{name}.sh"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        self.remember()
        if check and proc.returncode != 0:
            raise AssertionError(
                f"deploy/{name}.sh failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc.stdout + proc.stderr

    def flwr(self, *args: str) -> dict:
        proc = subprocess.run(
            [str(Path(sys.executable).with_name("flwr")), *args, "--format", "json"],
            env={**self.env, "FLWR_HOME": str(self.dir / "home" / "cli")},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        out = proc.stdout
        assert "{" in out, f"flwr {' '.join(args)}: {out}\n{proc.stderr}"
        return json.loads(out[out.index("{") :])

    def pid(self, name: str) -> int:
        return int((self.dir / "pids" / f"{name}.pid").read_text())

    def log(self, name: str) -> str:
        return (self.dir / "logs" / f"{name}.log").read_text(errors="replace")

    def remember(self) -> None:
        """Record every process started so far and its descendants, to stop them at the end
        even if stop.sh misses one (SuperExec runs in a session of its own)."""
        import psutil

        for f in (self.dir / "pids").glob("*.pid"):
            pid = int(f.read_text())
            self.known.add(pid)
            with contextlib.suppress(psutil.NoSuchProcess):
                self.known.update(c.pid for c in psutil.Process(pid).children(recursive=True))

    def teardown(self) -> None:
        import psutil

        self.remember()
        try:
            self.script("stop", check=False, timeout=60)
        finally:
            procs = []
            for pid in self.known:
                try:
                    procs.append(psutil.Process(pid))
                except psutil.NoSuchProcess:
                    continue
            alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            for p in alive:
                try:
                    # only our own: started by the scripts in this test's folder
                    if (
                        str(self.dir) in " ".join(p.cmdline())
                        or "flwr-" in p.name()
                        or "flower-" in " ".join(p.cmdline())
                    ):
                        p.send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    pass


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    d = Deployment(tmp_path)
    try:
        yield d
    finally:
        d.teardown()


def _wait_for_nodes(d: Deployment, n: int, limit: float = 180) -> None:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        nodes = d.flwr("supernode", "list", "fedtune").get("nodes", [])
        if sum(1 for x in nodes if x.get("status") == "online") >= n:
            return
        time.sleep(2)
    raise AssertionError(f"fewer than {n} SuperNodes came online: {nodes}")


def _start_supernodes(d: Deployment, link: str, ports: list[int], mode: list[str]) -> None:
    """SuperNode i holds partition i of len(ports); returns once all are online."""
    for i, port in enumerate(ports):
        d.script(
            "supernode", "--partition", str(i), "--num-partitions", str(len(ports)),
            "--superlink", link, "--runtime-port", str(port), *mode,
        )  # fmt: skip
    _wait_for_nodes(d, len(ports))


def _start_run(d: Deployment, cfg: dict) -> int:
    """``deploy/run.sh --detach`` with ``cfg`` as run-config overrides; returns the run id."""
    kv = " ".join(f"{k}={json.dumps(v)}" for k, v in cfg.items())
    out = d.script("run", "--detach", "-c", kv)
    return int(json.loads(out[out.index("{") : out.rindex("}") + 1])["run-id"])


def _wait_for_run(d: Deployment, run_id: int, limit: float) -> str:
    """The run's status once it is finished, or its last status after ``limit`` s."""
    end, status = time.monotonic() + limit, ""
    while time.monotonic() < end:
        status = d.flwr("list", "fedtune", "--run-id", str(run_id))["runs"][0]["status"]
        if status.startswith("finished"):
            break
        time.sleep(5)
    return status


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_three_supernodes_run_two_rounds_over_loopback(deployment, tiny_run_config, tmp_path):
    """TLS + SuperNode authentication. The --insecure debugging mode runs the whole life
    cycle too (start, 2 rounds, stop.sh leaves nothing) in the killed-SuperNode test below:
    one deployment fewer for a 2-core `make test`."""
    d = deployment
    link_port, *node_ports = free_ports(1 + NODES + 1)
    link = f"127.0.0.1:{link_port}"

    d.script("make-certs", "--supernodes", str(NODES + 1))  # the last key stays unregistered
    assert (d.dir / "certs" / "server.pem").exists() and (
        d.dir / "keys" / "supernode-3.pub"
    ).exists()
    d.script("superlink", "--host", "127.0.0.1", "--port", str(link_port))
    d.script("connect", "--superlink", link)
    out = d.script("register", *(str(d.dir / "keys" / f"supernode-{i}.pub") for i in range(NODES)))
    assert out.count("registered successfully") == NODES, out

    _start_supernodes(d, link, node_ports[:NODES], [])

    # a SuperNode whose key was never registered is turned away and exits; the script
    # waits for it to join, so it reports the refusal itself
    out = d.script(
        "supernode", "--partition", "3", "--num-partitions", "4", "--name", "intruder",
        "--superlink", link, "--runtime-port", str(node_ports[NODES]), "--max-retries", "0",
        check=False,
    )  # fmt: skip
    assert "intruder exited without joining the SuperLink" in out, out
    assert "Failed to activate SuperNode" in d.log("intruder")
    pid = int(re.search(r"started intruder \(PID (\d+)", out).group(1))  # type: ignore[union-attr]
    assert not _running(pid)
    assert not (d.dir / "pids" / "intruder.pid").exists()
    assert "No SuperNode found with the given public key" in d.log("superlink")
    online = [x for x in d.flwr("supernode", "list", "fedtune")["nodes"] if x["status"] == "online"]
    assert len(online) == NODES

    cfg = {
        **tiny_run_config,
        "codec": "srht",
        "merger": "ties",
        "min-train-nodes": NODES,
        "min-available-nodes": NODES,
        "run-name": "deployed",
    }
    run_id = _start_run(d, cfg)
    status = _wait_for_run(d, run_id, RUN_TIMEOUT_S)
    assert status == "finished:completed", (
        f"run {run_id} ended as {status!r}:\n{d.log('superlink')[-3000:]}"
    )

    run_dir = Path(tiny_run_config["output-dir"]) / "deployed"
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["valid-replies"] == NODES and r["dropped-replies"] == 0 for r in rows[1:])
    assert all(r["bytes-up"] > 0 and r["bytes-down"] > 0 for r in rows[1:])
    written = json.loads((run_dir / "config.json").read_text())
    assert written["codec"] == "srht" and written["merger"] == "ties"
    assert (run_dir / "adapter").is_dir()
    # every node trained: one ClientApp process per message, on each SuperNode
    for i in range(NODES):
        assert "Start `flwr-clientapp` process" in d.log(f"supernode-{i}")

    # the same TLS deployment runs SecAgg+ (issue 19): Flower's workflow on the SuperLink side,
    # secaggplus_mod in each SuperNode's ClientApp processes, its state kept between the
    # four stage messages by the SuperNode; the server sees only the masked sum
    secure = {**cfg, "codec": "dense", "merger": "fedavg", "secagg": "secaggplus",
              "secagg-clip-range": 0.5, "num-rounds": 1, "run-name": "deployed-secagg"}  # fmt: skip
    run_id = _start_run(d, secure)
    status = _wait_for_run(d, run_id, RUN_TIMEOUT_S)
    assert status == "finished:completed", (
        f"SecAgg+ run {run_id} ended as {status!r}:\n{d.log('superlink')[-3000:]}"
    )
    rows = _rows(Path(tiny_run_config["output-dir"]) / "deployed-secagg")
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["valid-replies"] == NODES and not rows[1]["skipped"]
    assert rows[1]["test-loss"] != rows[0]["test-loss"]  # the secure mean was applied

    d.script("stop", timeout=60)
    assert not [p for p in d.known if _running(p)], "deploy/stop.sh left processes behind"
    assert not list((d.dir / "pids").glob("*.pid"))


@pytest.mark.slow
def test_a_supernode_killed_during_a_round_leaves_the_run_to_the_others(
    deployment, tiny_run_config
):
    """Disconnect: a SuperNode is SIGKILLed (with its ClientApp) in the middle of round 1.

    The SuperLink stops hearing its heartbeats and, within 2 x 30 s, answers its pending
    message with Flower's 'Node Unavailable' error (or round-timeout ends the wait first);
    round 1 merges the other two, round 2 samples only the nodes still online, and the run
    completes. The victim's ClientApp hangs (fault='hang') so the kill lands inside round 1.
    """
    import psutil

    d = deployment
    link_port, *node_ports = free_ports(1 + NODES)
    link = f"127.0.0.1:{link_port}"
    d.script("superlink", "--host", "127.0.0.1", "--port", str(link_port), "--insecure")
    d.script("connect", "--superlink", link, "--insecure")
    _start_supernodes(d, link, node_ports, ["--insecure"])

    victim = NODES - 1
    cfg = {
        **tiny_run_config,
        "min-train-nodes": 2,
        "min-available-nodes": 2,
        "round-timeout": 120.0,
        "fault": "hang",
        "fault-clients": str(victim),
        "fault-rounds": "1",
        "fault-seconds": 600.0,
        "run-name": "disconnect",
    }
    t0 = time.monotonic()
    run_id = _start_run(d, cfg)
    end = time.monotonic() + 300
    while f"injected fault 'hang' in client {victim}, round 1" not in d.log(f"supernode-{victim}"):
        assert time.monotonic() < end, d.log(f"supernode-{victim}")[-3000:]
        time.sleep(0.5)
    d.remember()  # its ClientApp too, for the teardown
    root = psutil.Process(d.pid(f"supernode-{victim}"))
    for p in [*root.children(recursive=True), root]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    status = _wait_for_run(d, run_id, DISCONNECT_RUN_TIMEOUT_S)
    elapsed = time.monotonic() - t0
    assert status == "finished:completed", (
        f"run {run_id} ended as {status!r} after {elapsed:.0f} s:\n{d.log('superlink')[-3000:]}"
    )
    rows = _rows(Path(tiny_run_config["output-dir"]) / "disconnect")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["valid-replies"] == NODES - 1 and not r["skipped"] for r in rows[1:]), rows
    assert rows[1]["dropped-replies"] in (0, 1)  # 'Node Unavailable' reply, or the timeout
    assert rows[2]["dropped-replies"] == 0  # round 2 no longer samples the dead node
    assert (Path(tiny_run_config["output-dir"]) / "disconnect" / "adapter").is_dir()

    # --insecure mode's stop: every process the scripts started is gone (the killed node's
    # stale PID file included)
    d.script("stop", timeout=60)
    assert not [p for p in d.known if _running(p)], "deploy/stop.sh left processes behind"
    assert not list((d.dir / "pids").glob("*.pid"))


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_scripts_reject_bad_arguments_before_starting_anything(tmp_path):
    d = Deployment(tmp_path)
    out = d.script(
        "supernode", "--partition", "5", "--num-partitions", "3", "--superlink", "x:1", check=False
    )
    assert "must be below --num-partitions" in out
    out = d.script(
        "supernode",
        "--partition",
        "0",
        "--num-partitions",
        "3",
        "--superlink",
        "127.0.0.1:1",
        check=False,
    )
    assert "private key" in out and "missing" in out
    out = d.script("superlink", "--port", "1", check=False)
    assert "make-certs.sh" in out  # TLS is the default and needs the certificates
    out = d.script("run", check=False)
    assert "connect.sh" in out
    assert not (d.dir / "pids").exists() or not list((d.dir / "pids").glob("*.pid"))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # typer/click, on importing flwr.cli
def test_make_certs_gives_a_server_certificate_and_keys_that_flower_accepts(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    d = Deployment(tmp_path)
    d.script("make-certs", "--host", "fl.example.org", "--host", "10.1.2.3", "--supernodes", "2")
    certs, keys = d.dir / "certs", d.dir / "keys"
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "fl.example.org"} <= set(san.get_values_for_type(x509.DNSName))
    assert {"127.0.0.1", "10.1.2.3"} <= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    for i in range(2):
        assert try_load_public_key(
            keys / f"supernode-{i}.pub"
        )  # what `flwr supernode register` reads
        load_ssh_private_key(
            (keys / f"supernode-{i}").read_bytes(), password=None
        )  # flower-supernode
        assert (keys / f"supernode-{i}").stat().st_mode & 0o077 == 0  # private keys stay private
    # a second call keeps what exists (adding SuperNodes must not invalidate the others)
    before = (certs / "server.pem").read_bytes(), (keys / "supernode-0").read_bytes()
    d.script("make-certs", "--supernodes", "3")
    assert ((certs / "server.pem").read_bytes(), (keys / "supernode-0").read_bytes()) == before
    assert (keys / "supernode-2.pub").exists()
