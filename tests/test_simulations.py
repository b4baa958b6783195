"""Every shipped simulation config parses (names, options, values) against the real registries."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.config import defaults_from_pyproject, parse
from fedtune.launch import parse_overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "path", sorted((ROOT / "simulations").glob("*.toml")), ids=lambda p: p.stem
)
def test_simulation_config_is_valid(path):
    overrides = parse_overrides([str(path)])
    assert overrides, "empty config"
    cfg = parse({**defaults_from_pyproject(), **overrides})
    for k, v in overrides.items():
        assert cfg.to_flat()[k] == v, k
