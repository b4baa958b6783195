"""Regenerate, from the fields of fedtune.config.Config, both

* the ``[tool.flwr.app.config]`` block of pyproject.toml (every key with its default, which
  Flower needs, plus the declared method options with the value ""), and
* the key table of docs/configuration.md (between ``<!-- keys:start -->`` and
  ``<!-- keys:end -->``).

Run it after adding or changing a key in fedtune/config.py::

    python scripts/gen_config_doc.py           # rewrite both files
    python scripts/gen_config_doc.py --check   # exit 1 if either is out of date

tests/test_config.py runs the same rendering in memory and fails when a file is stale.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, get_args, get_type_hints

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedtune.config import PREFIXES, Config  # noqa: E402

PYPROJECT = ROOT / "pyproject.toml"
DOC = ROOT / "docs" / "configuration.md"

HEADER = """\
# Every run-config key with its default. GENERATED from fedtune/config.py (one key() field per
# key) by `python scripts/gen_config_doc.py`: change a key there and rerun, never edit this
# block by hand (tests/test_config.py fails when it is out of date). Override with
#   flwr run . --run-config "merger='ties' codec='srht'"   or   --run-config simulations/x.toml
# fedtune/config.py parses these ONCE into a typed dataclass (docs/configuration.md).
# Options of a codec / merger / server optimizer / adapter use the prefixes codec- / merger- /
# server-opt- / adapter-; the value "" means "not set" (the method's own default applies).
"""

_BLOCK = re.compile(
    r"(?:^#[^\n]*\n)*^\[tool\.flwr\.app\.config\]\n(?:^(?!\[)[^\n]*\n)*", flags=re.M
)
_TABLE = re.compile(r"<!-- keys:start -->.*<!-- keys:end -->", flags=re.S)


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _fields() -> list[dataclasses.Field[Any]]:
    return list(dataclasses.fields(Config))


def _options_field(method: str) -> dataclasses.Field[Any] | None:
    """The ``*_options`` field that belongs to method field ``method`` (``codec``), if any."""
    if method not in PREFIXES.values():
        return None
    return next(f for f in _fields() if f.name == f"{method}_options")


def toml_value(v: Any) -> str:
    """One default as a TOML value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"run-config default {v!r} is not a finite number")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON string escapes are valid TOML
    raise TypeError(f"run-config default {v!r} has no TOML form")


def config_block() -> str:
    """The ``[tool.flwr.app.config]`` block of pyproject.toml, its leading comment included."""
    hints = get_type_hints(Config)
    lines = [HEADER.rstrip("\n"), "[tool.flwr.app.config]"]
    for f in _fields():
        if f.name.endswith("_options"):
            continue
        if f.metadata["group"]:
            lines.append(f"# {f.metadata['group']}")
        line = f"{_kebab(f.name)} = {toml_value(f.default)}"
        choices = get_args(hints[f.name])
        if choices:
            line += "  # " + " | ".join(str(c) for c in choices)
        lines.append(line)
        opts = _options_field(f.name)
        if opts is not None:
            lines += [f'{_kebab(f.name)}-{o} = ""' for o in opts.metadata["options"]]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def table() -> str:
    """The key table of docs/configuration.md."""
    hints = get_type_hints(Config)
    rows = ["| key | default | allowed | what |", "|---|---|---|---|"]
    for f in _fields():
        if f.name.endswith("_options"):
            continue
        choices = get_args(hints[f.name])
        if choices:
            allowed = ", ".join(repr(c) for c in choices)
        elif f.metadata["what"] is not None:
            allowed = f.metadata["what"]
        else:
            allowed = hints[f.name].__name__
        rows.append(
            f"| `{_kebab(f.name)}` | `{f.default!r}` | {_cell(allowed)} "
            f"| {_cell(f.metadata['help'])} |"
        )
        opts = _options_field(f.name)
        if opts is not None:
            declared = ", ".join(opts.metadata["options"]) or "(none declared)"
            rows.append(
                f"| `{_kebab(f.name)}-*` | `''` | {_cell(declared)} "
                f"| {_cell(opts.metadata['help'])} |"
            )
    return "\n".join(rows)


def render_pyproject(text: str) -> str:
    """``text`` (pyproject.toml) with its ``[tool.flwr.app.config]`` block regenerated."""
    found = _BLOCK.findall(text)
    if len(found) != 1:
        raise SystemExit(f"pyproject.toml: expected one [tool.flwr.app.config], got {len(found)}")
    return _BLOCK.sub(lambda _: config_block() + "\n", text)


def render_doc(text: str) -> str:
    """``text`` (docs/configuration.md) with its key table regenerated."""
    if len(_TABLE.findall(text)) != 1:
        raise SystemExit("docs/configuration.md: expected one <!-- keys:start/end --> pair")
    return _TABLE.sub(lambda _: f"<!-- keys:start -->\n{table()}\n<!-- keys:end -->", text)


def stale() -> list[Path]:
    """The generated files whose content differs from what config.py gives."""
    out = []
    for path, render in ((PYPROJECT, render_pyproject), (DOC, render_doc)):
        text = path.read_text()
        if render(text) != text:
            out.append(path)
    return out


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        bad = stale()
        for p in bad:
            print(f"{p.relative_to(ROOT)} is out of date with fedtune/config.py")
        return 1 if bad else 0
    if argv:
        print(__doc__)
        return 2
    for path, render in ((PYPROJECT, render_pyproject), (DOC, render_doc)):
        text = path.read_text()
        new = render(text)
        if new != text:
            path.write_text(new)
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
