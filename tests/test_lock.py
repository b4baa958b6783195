"""Reproducible installs (issue 18, item 6): scripts/setup.sh installs requirements.lock, the
lock pins every dependency of pyproject.toml exactly, and this environment is the locked one."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        m = _PIN.match(line)
        if m:
            pins[_norm(m.group(1))] = m.group(2)
    return pins


def _requirement_name(req: str) -> str:
    return _norm(re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0])


def test_setup_installs_from_the_lock_and_torch_first():
    text = (ROOT / "scripts" / "setup.sh").read_text()
    commands = [x.strip() for x in text.splitlines() if x.strip().startswith("$PIP install")]
    assert any('-r "$LOCK"' in c for c in commands), commands
    assert all("--upgrade" not in c for c in commands)  # nothing resolves to "newest"
    editable = [c for c in commands if "-e ." in c]
    assert editable and all("--no-deps" in c for c in editable)  # fedtune adds no versions
    assert text.index('"$TORCH_SPEC" -c "$LOCK"') < text.index('-r "$LOCK"')
    # the lock is part of the set-up stamp: a changed lock re-installs
    assert '"$LOCK" | sha256sum' in text
    # the refresh command is documented where users look
    assert "make lock" in (ROOT / "README.md").read_text()
    assert "lock:" in (ROOT / "Makefile").read_text()


def test_the_lock_pins_every_dependency_and_no_torch_build():
    pins = _pins()
    assert len(pins) > 50
    assert "torch" not in pins  # setup.sh installs the machine's build (CPU / CUDA) first
    assert not [p for p in pins if p.startswith(("nvidia-", "triton"))]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = list(project["dependencies"])
    for extra in ("llm", "dev"):
        deps += project["optional-dependencies"][extra]
    missing = sorted(
        n for n in map(_requirement_name, deps) if n != "torch" and n not in pins
    )
    assert not missing, f"requirements.lock is stale (make lock): {missing}"


def test_this_environment_has_the_locked_versions():
    """CI sets up from the lock: every locked package is installed at its locked version."""
    installed = {_norm(d.metadata["Name"]): d.version for d in metadata.distributions()}
    wrong = {
        name: (want, installed.get(name))
        for name, want in _pins().items()
        if installed.get(name) != want
    }
    assert not wrong, f"not the locked versions (run make setup): {wrong}"
