"""Run-config parsing: defaults, types, ranges, unknown keys, method options."""

from __future__ import annotations

import pytest

from fedtune.config import Config, ConfigError, defaults_from_pyproject, parse


def test_pyproject_defaults_parse_to_dataclass_defaults():
    cfg = parse(defaults_from_pyproject())
    assert cfg == Config()


def test_every_dataclass_field_has_a_pyproject_default():
    # flwr run only accepts overrides of keys that exist in [tool.flwr.app.config]
    flat = Config().to_flat()
    assert set(flat) <= set(defaults_from_pyproject())


def test_unknown_key_names_the_key_and_lists_allowed():
    with pytest.raises(ConfigError) as e:
        parse({"local-step": 3})
    msg = str(e.value)
    assert "'local-step'" in msg and "local-steps" in msg and "allowed" in msg


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("local-steps", "ten", "must be an integer"),
        ("lr", -1.0, "learning rate"),
        ("partitioning", "random", "'natural', 'iid', 'dirichlet'"),
        ("task", "seq2seq", "'classification', 'causal-lm'"),
        ("fraction-train", 0.0, "fraction"),
        ("device", "tpu", "'auto', 'cpu'"),
        ("num-rounds", 0, "positive"),
        ("grad-clip", True, "must be a number"),
        ("clip-reject", 5.0, "'clip-norm' is 0 (off)"),
        ("clip-reject", -1.0, "0 (off) or a factor"),
    ],
)
def test_bad_values_name_key_and_allowed(key, value, needle):
    with pytest.raises(ConfigError) as e:
        parse({key: value})
    assert f"'{key}'" in str(e.value)
    assert needle in str(e.value)


def test_clip_reject_needs_a_factor_of_at_least_one():
    assert parse({"clip-norm": 1.0, "clip-reject": 10}).clip_reject == 10.0
    with pytest.raises(ConfigError, match="factor >= 1"):
        parse({"clip-norm": 1.0, "clip-reject": 0.5})


def test_ints_are_accepted_for_floats():
    assert parse({"lr": 1}).lr == 1.0


# unknown methods and their options are checked where the parts are built: tests/test_parts.py


def test_consistency_checks():
    with pytest.raises(ConfigError, match="min-train-nodes"):
        parse({"min-train-nodes": 5, "min-available-nodes": 2})
    with pytest.raises(ConfigError, match="client-column"):
        parse({"dataset": "file", "partitioning": "natural"})


def test_flat_round_trip():
    cfg = parse({"merger": "ties", "merger-density": 0.3, "lr": 0.01})
    assert parse(cfg.to_flat()) == cfg


def test_every_method_option_is_a_run_config_key():
    """flwr run only overrides keys that exist in pyproject: every option must be declared."""
    from fedtune import codecs, merging
    from fedtune.merging import server_opt
    from fedtune.registry import _option_names

    keys = set(defaults_from_pyproject())
    for prefix, reg in (
        ("codec-", codecs.REGISTRY),
        ("merger-", merging.base.MERGERS),
        ("server-opt-", server_opt.SERVER_OPTS),
    ):
        for name in reg.names():
            for opt in _option_names(reg.factory(name)) or ():
                assert prefix + opt.replace("_", "-") in keys, (name, opt)


def test_resume_accepts_a_checkpoint_from_before_a_key_existed():
    """A key added after the checkpoint was written counts as its default there."""
    from fedtune.checkpoint import CheckpointError, check_compatible
    from fedtune.config import Config

    current = Config().to_flat()
    saved = {k: v for k, v in current.items() if k != "robust-filter"}
    check_compatible(saved, current)
    with pytest.raises(CheckpointError, match="robust-filter"):
        check_compatible(saved, {**current, "robust-filter": "cosine"})


def test_generated_pyproject_block_and_doc_table_are_up_to_date():
    """pyproject.toml's [tool.flwr.app.config] and the key table of docs/configuration.md are
    generated from fedtune/config.py; regenerate them in memory and compare."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "gen_config_doc.py"
    spec = importlib.util.spec_from_file_location("gen_config_doc", path)
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    for target, render in (
        (gen.PYPROJECT, gen.render_pyproject),
        (gen.DOC, gen.render_doc),
    ):
        text = target.read_text()
        assert render(text) == text, (
            f"{target.name} is out of date with fedtune/config.py: "
            "run `python scripts/gen_config_doc.py`"
        )


def test_every_key_has_help_and_ranges_say_what_they_allow():
    import dataclasses

    for f in dataclasses.fields(Config):
        assert f.metadata.get("help", "").strip(), f"{f.name}: declare it with key(default, help)"
        if f.metadata["lo"] is not None or f.metadata["hi"] is not None:
            assert f.metadata["what"], f.name
