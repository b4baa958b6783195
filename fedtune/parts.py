"""The one composition root: every part of a run is built from the config here, and only here.

Adapter, trainer, codec, screens, merger and server optimizer are looked up by name in their
registries and given their options (``adapter-*``, ``codec-*``, ``merger-*``,
``server-opt-*`` run-config keys, plus the named keys an adapter reads itself). What a method
*is* — linear, replayable, stateless, zeroth-order — it declares itself, and the checks below
ask it; nothing here keeps a list of method names.

``plugins`` (a run-config key) names Python files or modules that register more methods;
:func:`load_plugins` imports them before anything is built, so
``plugins='my_merges/majority_sign.py' merger='majority-sign'`` works in ``fedtune.simulate``,
``fedtune.launch`` and a deployment alike (docs/extending.md).

Imports: config, registry, rng and the method packages; never Flower, never the apps.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedtune import adapters, codecs, merging, rng, trainers
from fedtune import subspace as _subspace  # noqa: F401  (registers codec + trainer 'subspace')
from fedtune import subspace_zo as _subspace_zo  # noqa: F401  (trainer 'subspace-zo')
from fedtune.config import Config, ConfigError
from fedtune.registry import RegistryError
from fedtune.round import ClipReject, DirectionFilter, ServerRound

# fixed stream tag of the attackers' draw (unchanged from the first design: results stay equal)
_ATTACK = 0xBAD

#: plug-in files / modules already imported in this process (Ray reuses actors)
_LOADED: dict[str, int] = {}


class PluginError(ConfigError):
    """A ``plugins`` entry is missing, fails to import or registers nothing."""


# --------------------------------------------------------------------------- plugins
def _registered() -> int:
    return sum(
        len(n())
        for n in (
            adapters.names,
            codecs.names,
            merging.names,
            merging.server_opt_names,
            trainers.names,
        )
    )


def _default_app_dir() -> Path:
    """The folder holding ``pyproject.toml`` of the app: where Flower unpacks the FAB."""
    return Path(__file__).resolve().parents[1]


def load_plugins(spec: str, app_dir: str | Path | None = None) -> list[str]:
    """Import the comma list ``spec`` of plug-in files (``*.py``, relative to ``app_dir``) or
    module names; each must register at least one method. Returns what was imported.

    Idempotent per process: a file imported before is not imported again (a second import
    would re-register its names under a new class and fail).
    """
    base = Path(app_dir) if app_dir is not None else _default_app_dir()
    done = []
    for entry in (x.strip() for x in spec.split(",")):
        if not entry:
            continue
        if entry in _LOADED:
            done.append(entry)
            continue
        before = _registered()
        if entry.endswith(".py") or "/" in entry:
            path = Path(entry)
            if not path.is_absolute():
                cands = [base / path, Path.cwd() / path]
                path = next((c for c in cands if c.is_file()), cands[0])
            if not path.is_file():
                raise PluginError(
                    f"run-config key 'plugins': file '{entry}' not found (looked in {base} "
                    "and the working directory)"
                )
            digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
            name = f"fedtune_plugin_{path.stem}_{digest}"
            mod_spec = importlib.util.spec_from_file_location(name, path)
            if mod_spec is None or mod_spec.loader is None:  # pragma: no cover - .py files load
                raise PluginError(f"run-config key 'plugins': cannot load '{entry}'")
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[name] = module
            try:
                mod_spec.loader.exec_module(module)
            except Exception as e:
                sys.modules.pop(name, None)
                raise PluginError(
                    f"run-config key 'plugins': importing '{entry}' failed: "
                    f"{type(e).__name__}: {e}"
                ) from e
        else:
            try:
                importlib.import_module(entry)
            except Exception as e:
                raise PluginError(
                    f"run-config key 'plugins': importing module '{entry}' failed: "
                    f"{type(e).__name__}: {e}"
                ) from e
        added = _registered() - before
        if added <= 0:
            raise PluginError(
                f"run-config key 'plugins': '{entry}' registered no adapter, codec, merger, "
                "server optimizer or trainer (decorate a class with e.g. "
                "@fedtune.merging.register('my-merge'))"
            )
        _LOADED[entry] = added
        done.append(entry)
    return done


# --------------------------------------------------------------------------- the parts
def adapter(cfg: Config) -> Any:
    """The configured adapter. Built-in adapters read their named keys (``lora-r``, ``mos-*``)
    through their ``from_config``; any adapter also gets the ``adapter-*`` options."""
    factory = adapters.REGISTRY.factory(cfg.adapter)
    options = dict(cfg.adapter_options)
    from_config = getattr(factory, "from_config", None)
    if from_config is None:
        return adapters.get(cfg.adapter, **options)
    try:
        return from_config(cfg, **options)
    except (TypeError, ValueError) as e:
        raise RegistryError(f"adapter {cfg.adapter!r}: {e}") from e


def codec(cfg: Config, *, salt: int = 0) -> Any:
    """The configured codec; a zeroth-order codec takes the client's ``lr`` unless
    ``codec-lr`` is set.

    ``salt`` (see ``pipeline.layout_salt``) goes into the layout hash of every payload;
    whoever encodes or decodes real payloads must pass it, only validation may leave it 0.
    """
    opts = dict(cfg.codec_options)
    if getattr(codecs.REGISTRY.factory(cfg.codec), "zeroth_order", False):
        opts.setdefault("lr", cfg.lr)
    built = codecs.get(cfg.codec, **opts)
    built.layout_salt = salt
    return built


def merger(cfg: Config) -> Any:
    return merging.get(cfg.merger, **dict(cfg.merger_options))


def server_opt(cfg: Config) -> Any:
    return merging.get_server_opt(cfg.server_opt, **dict(cfg.server_opt_options))


def clip(cfg: Config) -> merging.NormClip | None:
    """The norm clip of the round (fixed or relative to the round's median), or None."""
    if cfg.clip_norm <= 0:
        return None
    return merging.NormClip(cfg.clip_norm, relative=cfg.clip_mode == "median", reject=cfg.clip_reject)


def screens(cfg: Config) -> list[Any]:
    """The screens that drop updates before the merge, in the order they run."""
    out: list[Any] = []
    c = clip(cfg)
    if c is not None and c.reject:
        out.append(ClipReject(c))
    if cfg.robust_filter != "none":
        out.append(
            DirectionFilter(
                merging.CosineFilter(
                    cfg.robust_filter_threshold, memory=cfg.robust_filter == "cosine-history"
                )
            )
        )
    return out


def dp_spec(cfg: Config, num_clients: int) -> Any:
    """The run's :class:`fedtune.privacy.DPSpec` (None when ``dp='none'``); ``num_clients`` is
    the federation's size n (the accountant's population, the estimator's ``q·n``)."""
    if cfg.dp == "none":
        return None
    from fedtune.privacy import DPSpec

    if num_clients < 1:
        raise ConfigError(f"dp={cfg.dp!r} needs the number of clients, got {num_clients}")
    return DPSpec(
        mode=cfg.dp,
        noise_multiplier=cfg.dp_noise_multiplier,
        clip_norm=cfg.dp_clip_norm,
        num_clients=num_clients,
        q=cfg.fraction_train,
        delta=cfg.dp_delta or 1.0 / num_clients,
        target_quantile=cfg.dp_target_quantile,
        clip_lr=cfg.dp_clip_lr,
        target_epsilon=cfg.dp_target_epsilon,
        accountant=cfg.dp_accountant,
        dropout_tolerance=cfg.dp_dropout_tolerance,
        seeded_noise=cfg.dp_seeded_noise,
        run_seed=cfg.seed,
    )


def private_run(cfg: Config) -> Any:
    """The run's :class:`fedtune.privacy.settings.PrivateRun` (dp mode, SecAgg+ parameters)."""
    from fedtune.privacy.settings import PrivateRun

    return PrivateRun(
        dp=cfg.dp,
        secagg=cfg.secagg != "none",
        secagg_clip_range=cfg.secagg_clip_range,
        secagg_threshold=cfg.secagg_threshold,
        max_examples=float(max(1, cfg.local_steps * cfg.batch_size)),
    )


def privacy(cfg: Config, codec: Any, like: Any, num_clients: int) -> tuple[Any, Any]:
    """(the DP mechanism or None, the vector space of the codec or None) of a run."""
    if cfg.dp == "none" and cfg.secagg == "none":
        return None, None
    from fedtune.privacy import DPFedAvg, Space

    spec = dp_spec(cfg, num_clients)
    dp = None
    if spec is not None:
        try:
            dp = DPFedAvg(spec)
        except ValueError as e:
            raise ConfigError(f"run-config key 'dp-noise-multiplier': {e}") from None
    return dp, Space(codec, like)


def server_round(
    cfg: Config,
    *,
    exact: Any = None,
    codec: Any = None,
    like: Any = None,
    num_clients: int = 0,
) -> ServerRound:
    """The server's round with every configured step (screens, clip, merge, server optimizer,
    and in exact mode the FedEx-LoRA residual ``exact``); with ``dp`` / ``secagg`` also the
    mechanism and the vector space of ``codec`` over the layout ``like``."""
    dp, space = privacy(cfg, codec, like, num_clients)
    return ServerRound(
        merger=merger(cfg),
        server_opt=server_opt(cfg),
        run_seed=cfg.seed,
        clip=clip(cfg),
        screens=screens(cfg),
        exact=exact,
        min_valid=cfg.min_train_nodes,
        dp=dp,
        space=space,
    )


def trainer_name(cfg: Config) -> str:
    """``trainer``, with 'auto' resolved to what the codec needs."""
    if cfg.trainer != "auto":
        return cfg.trainer
    zo = getattr(codecs.REGISTRY.factory(cfg.codec), "zeroth_order", False)
    return "zeroth-order" if zo else "first-order"


def attackers(cfg: Config, num_clients: int) -> set[int]:
    """Partition ids of the simulated malicious clients: a keyed, fixed ``attack-fraction``."""
    if cfg.attack == "none":
        return set()
    k = round(cfg.attack_fraction * num_clients)
    if k == 0:
        return set()
    return set(rng.choice(rng.derive_key(cfg.seed, _ATTACK), 0, num_clients, k).tolist())


def trainer(cfg: Config, partition_id: int, num_clients: int) -> Callable[..., Any]:
    """The client's local trainer; a simulated attacker's trainer is wrapped so that it
    corrupts its update (the trainer itself knows nothing of attacks)."""
    train = trainers.get(trainer_name(cfg))
    if partition_id in attackers(cfg, num_clients):
        from fedtune.attacks import Attacked

        return Attacked(train, cfg.attack, cfg.attack_scale)
    return train


# --------------------------------------------------------------------------- validation
def validate(cfg: Config) -> None:
    """Build every configured part once and check that they fit together (fail fast,
    before round 1). Raises :class:`ConfigError` naming the key."""
    checks: list[tuple[str, Callable[[], Any]]] = [
        ("adapter", lambda: adapter(cfg)),
        ("codec", lambda: codec(cfg)),
        ("merger", lambda: merger(cfg)),
        ("server-opt", lambda: server_opt(cfg)),
        ("trainer", lambda: trainers.factory(trainer_name(cfg))),
    ]
    built: dict[str, Any] = {}
    for key, build in checks:
        try:
            built[key] = build()
        except RegistryError as e:
            raise ConfigError(f"run-config key '{key}': {e}") from None
    zo_codec = bool(getattr(built["codec"], "zeroth_order", False))
    if trainer_name(cfg) == "zeroth-order" and not zo_codec:
        raise ConfigError(
            f"run-config key 'trainer' is 'zeroth-order' but codec {cfg.codec!r} encodes a "
            "dense delta; the zeroth-order trainer's payload is (key, scalar) pairs: use a "
            "zeroth-order codec such as 'spsa'"
        )
    if trainer_name(cfg) == "first-order" and zo_codec:
        raise ConfigError(
            f"run-config key 'trainer' is 'first-order' but codec {cfg.codec!r} carries "
            "zeroth-order scalars; use trainer='zeroth-order' (or 'auto')"
        )
    if cfg.lr_schedule != "constant" and trainer_name(cfg) == "zeroth-order":
        raise ConfigError(
            f"run-config key 'lr-schedule' is {cfg.lr_schedule!r} but trainer 'zeroth-order' "
            "sends (key, scalar) pairs that the server replays at the codec's one lr; use "
            "lr-schedule='constant' (or trainer='subspace-zo', which sends its coefficients)"
        )
    if cfg.factor_mode == "exact":
        _check_exact(cfg, built["merger"], built["server-opt"])
    if cfg.downlink != "dense":
        _check_downlink(cfg, built["codec"], built["merger"], built["server-opt"])
    if cfg.dp != "none" or cfg.secagg != "none":
        _check_privacy(cfg, built["codec"], built["merger"])


def _check_privacy(cfg: Config, c: Any, m: Any) -> None:
    """DP bounds the sensitivity of a *sum* of clipped updates, and SecAgg releases only that
    sum: so the merge must be linear, nothing may look at single updates, and distributed
    noise or a secure sum needs a codec whose coefficients add up (fedtune/privacy/space.py)."""
    what = " and ".join(
        x for x in (f"dp={cfg.dp!r}" if cfg.dp != "none" else "", "secagg='secaggplus'"
                    if cfg.secagg != "none" else "") if x
    )  # fmt: skip
    if not getattr(m, "linear", False):
        linear = [n for n in merging.names() if getattr(merging.MERGERS.factory(n), "linear", False)]
        raise ConfigError(
            f"run-config key 'merger' is {cfg.merger!r}, which is not linear, but {what} "
            f"bounds only a sum of clipped updates (its sensitivity is unbounded otherwise); "
            f"use one of: {', '.join(linear)}"
        )
    if cfg.robust_filter != "none":
        raise ConfigError(
            f"run-config key 'robust-filter' is {cfg.robust_filter!r} but {what} cannot screen "
            "single updates (DP: a screen's decision depends on one client; SecAgg: the server "
            "never sees one); use robust-filter='none'"
        )
    if cfg.secagg != "none" and cfg.clip_norm > 0:
        raise ConfigError(
            "run-config key 'clip-norm' is set but under secagg the server never sees a single "
            "update to clip; use dp with dp-clip-norm (clients clip themselves) or clip-norm=0"
        )
    if cfg.factor_mode == "exact":
        raise ConfigError(
            f"run-config key 'factor-mode' is 'exact' but {what}: the FedEx-LoRA residual needs "
            "every client's factors, not a (noised) sum; use 'factors' or 'ffa'"
        )
    if cfg.downlink != "dense":
        raise ConfigError(
            f"run-config key 'downlink' is {cfg.downlink!r} but {what}: clients cannot replay a "
            "round whose noise or sum they never saw; use downlink='dense'"
        )
    client_side = cfg.dp == "distributed" or cfg.secagg != "none"
    if client_side and not getattr(c, "linear", False):
        ok = [n for n in codecs.names() if getattr(codecs.REGISTRY.factory(n), "linear", False)]
        raise ConfigError(
            f"run-config key 'codec' is {cfg.codec!r} but {what} sums the clients' vectors "
            f"before the server decodes, which needs a codec with a shared linear basis: "
            f"{', '.join(ok)} (per-client keys put each update in its own subspace)"
        )
    if client_side and cfg.error_feedback:
        raise ConfigError(
            f"run-config key 'error-feedback' is true but with {what} the client sends a "
            "clipped (and noised) vector that error feedback does not model; set it to false"
        )


def _check_exact(cfg: Config, m: Any, opt: Any) -> None:
    """``factor-mode='exact'`` (FedEx-LoRA) folds ``Σ w_k B_k A_k − B̄ Ā`` into the base weight,
    which is exact only if the new global factors are the weighted means ``Ā``, ``B̄``."""
    if not getattr(m, "weighted_mean", False):
        opts = dict(cfg.merger_options)
        what = f"{cfg.merger!r}" + (f" with options {opts}" if opts else "")
        raise ConfigError(
            f"run-config key 'merger' is {what} but factor-mode='exact' makes each adapted weight "
            "the weighted mean of the clients' weights, so it needs that mean: 'fedavg' (or "
            "'task-arithmetic' with merger-scale=1, merger-normalize=true); the residual would "
            "silently undo a nonlinear merge of A and B"
        )
    if cfg.server_opt != "none":
        raise ConfigError(
            f"run-config key 'server-opt' is {cfg.server_opt!r} but factor-mode='exact' needs "
            "'none': the residual folds the clients' mean product into the base weights, so an "
            "optimizer step on A and B would be undone there and act only on the other tensors"
        )


def _check_downlink(cfg: Config, c: Any, m: Any, opt: Any) -> None:
    """A client can rebuild the global adapter bit for bit only from a stateless, linear
    update with a decoder that rounds the same everywhere (fedtune/downlink.py)."""
    why = f"downlink={cfg.downlink!r} makes clients rebuild the global adapter from payloads"
    if not getattr(m, "linear", False):
        linear = [n for n in merging.names() if getattr(merging.MERGERS.factory(n), "linear", False)]
        raise ConfigError(
            f"run-config key 'merger' is {cfg.merger!r} but {why}, which is exact only for a "
            f"linear merger: {', '.join(linear)}; use downlink='dense'"
        )
    if not getattr(opt, "stateless", False):
        ok = [n for n in merging.server_opt_names() if merging.get_server_opt(n).stateless]
        raise ConfigError(
            f"run-config key 'server-opt' is {cfg.server_opt!r} but {why}, and clients cannot "
            f"replay optimizer state they never saw; allowed: {', '.join(ok)}, "
            "or downlink='dense'"
        )
    if not getattr(c, "replayable", True):
        ok = [n for n in codecs.names() if getattr(codecs.REGISTRY.factory(n), "replayable", True)]
        raise ConfigError(
            f"run-config key 'codec' is {cfg.codec!r} but {why}, and its decoder sums with BLAS "
            f"(rounding can differ between machines); use one of: {', '.join(ok)}"
        )
    if cfg.factor_mode == "exact":
        raise ConfigError(
            f"run-config key 'factor-mode' is 'exact' but {why}; exact mode sends its dense "
            "residual with every train message anyway, so use downlink='dense'"
        )


def load_config(run_config: dict[str, Any], *, app_dir: str | Path | None = None) -> Config:
    """What every entry point does first: parse, import the plug-ins, validate the parts."""
    from fedtune.config import parse

    cfg = parse(run_config)
    load_plugins(cfg.plugins, app_dir)
    validate(cfg)
    return cfg
