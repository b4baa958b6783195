"""Runs the worked examples of docs/extending.md (so the docs cannot rot)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

from fedtune import merging
from fedtune.registry import RegistryError

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def _blocks() -> dict[str, str]:
    """Python code blocks of the doc whose first line is ``# file: X`` or ``# usage``."""
    out: dict[str, str] = {}
    for code in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S):
        first = code.splitlines()[0].strip()
        if first.startswith("# file:"):
            out[first.removeprefix("# file:").strip()] = code
        elif first == "# usage":
            out["usage"] = code
    return out


@pytest.fixture
def doc_module(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Write a doc block to a file and import it; unregister its merger afterwards."""
    added: list[str] = []

    def load(filename: str) -> None:
        before = set(merging.names())
        path = tmp_path / filename
        path.write_text(_blocks()[filename])
        name = f"_doc_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        added.extend(set(merging.names()) - before)

    yield load
    for n in added:
        merging.MERGERS._items.pop(n, None)  # keep the global registry as it was


def test_majority_sign_example(doc_module) -> None:  # type: ignore[no-untyped-def]
    doc_module("majority_sign.py")
    assert "majority-sign" in merging.names()
    exec(compile(_blocks()["usage"], "extending.md#usage", "exec"), {})
    m = merging.get("majority-sign", scale=0.25)
    assert m.streaming
    d = [{"w": torch.tensor([1.0, -1.0, 0.0])}, {"w": torch.tensor([-2.0, -1.0, 0.0])}]
    # votes: [1 - 2, -1 - 2, 0] with weights [1, 2]
    assert m.merge(d, [1.0, 2.0])["w"].tolist() == [-0.25, -0.25, 0.0]
    with pytest.raises(RegistryError, match=r"majority-sign.*scale"):
        merging.get("majority-sign", scale=5.0)


def test_midrange_example(doc_module) -> None:  # type: ignore[no-untyped-def]
    doc_module("midrange.py")
    m = merging.get("midrange")
    assert not m.streaming
    d = [
        {"w": torch.tensor([1.0, 4.0])},
        {"w": torch.tensor([3.0, -4.0])},
        {"w": torch.tensor([2.0, 0.0])},
    ]
    assert m.merge(d, [1, 1, 1])["w"].tolist() == [2.0, 0.0]
