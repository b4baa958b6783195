"""The composition root: method validation by declaration, the trainer key, plug-ins."""

from __future__ import annotations

import textwrap

import pytest

from fedtune import merging, parts
from fedtune.config import ConfigError, parse

pytestmark = pytest.mark.usefixtures("isolated_registries")


def test_unknown_method_lists_registered_names():
    with pytest.raises(ConfigError) as e:
        parts.load_config({"merger": "tie"})
    assert "'merger'" in str(e.value) and "ties" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parts.load_config({"codec": "zip"})
    assert "'codec'" in str(e.value) and "srht" in str(e.value)


def test_prefixed_options_are_forwarded_and_validated():
    cfg = parts.load_config({"merger": "ties", "merger-density": 0.2, "merger-lambda": ""})
    assert dict(cfg.merger_options) == {"density": 0.2}
    with pytest.raises(ConfigError) as e:
        parts.load_config({"merger": "fedavg", "merger-density": 0.2})
    assert "density" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parts.load_config({"adapter-rank": 3})
    assert "'adapter'" in str(e.value) and "rank" in str(e.value)


def test_adapter_options_override_the_named_keys():
    cfg = parts.load_config({"lora-r": 4, "adapter-r": 2})
    assert parts.adapter(cfg).r == 2
    assert parts.adapter(parse({"lora-r": 4})).r == 4


@pytest.mark.parametrize(
    ("trainer", "codec", "needle"),
    [("zeroth-order", "dense", "zeroth-order codec"), ("first-order", "spsa", "trainer='zeroth")],
)
def test_trainer_and_codec_must_fit(trainer, codec, needle):
    with pytest.raises(ConfigError, match=needle):
        parts.load_config({"trainer": trainer, "codec": codec})


def test_auto_trainer_follows_the_codec():
    assert parts.trainer_name(parse({"codec": "spsa"})) == "zeroth-order"
    assert parts.trainer_name(parse({"codec": "srht"})) == "first-order"


def test_downlink_and_exact_checks_ask_the_methods(tmp_path):
    """A user's merger that declares itself linear passes the compact-downlink check; nothing
    keeps a list of names."""
    with pytest.raises(ConfigError, match=r"linear merger: .*fedavg"):
        parts.load_config({"downlink": "payloads", "merger": "ties"})
    with pytest.raises(ConfigError, match=r"replay optimizer state"):
        parts.load_config({"downlink": "payloads", "server-opt": "fedadam"})
    with pytest.raises(ConfigError, match=r"BLAS"):
        parts.load_config({"downlink": "payloads", "codec": "gaussian"})
    with pytest.raises(ConfigError, match=r"weighted mean"):
        parts.load_config({"factor-mode": "exact", "merger": "median"})
    plugin = tmp_path / "halfsum.py"
    plugin.write_text(
        textwrap.dedent(
            """
            from fedtune import merging
            from fedtune.merging.fedavg import FedAvg

            @merging.register("half-mean-test")
            class HalfMean(FedAvg):
                linear = True
                weighted_mean = False

                def _finish(self, layout):
                    return super()._finish(layout).mul_(0.5)
            """
        )
    )
    cfg = parts.load_config({"plugins": str(plugin), "merger": "half-mean-test", "downlink": "auto"})
    assert cfg.merger == "half-mean-test"
    with pytest.raises(ConfigError, match=r"weighted mean"):
        parts.load_config({"plugins": str(plugin), "merger": "half-mean-test", "factor-mode": "exact"})


def test_plugin_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"'plugins': file 'nope.py' not found"):
        parts.load_plugins("nope.py", tmp_path)
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match=r"importing 'broken.py' failed: RuntimeError: boom"):
        parts.load_plugins("broken.py", tmp_path)
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match=r"registered no adapter, codec, merger"):
        parts.load_plugins("empty.py", tmp_path)
    with pytest.raises(ConfigError, match=r"module 'no_such_mod_xyz' failed"):
        parts.load_plugins("no_such_mod_xyz", tmp_path)
    for e in ("nope.py",):
        try:
            parts.load_plugins(e, tmp_path)
        except ConfigError as err:
            assert "\n" not in str(err)


def test_a_plugin_loads_once_per_process(tmp_path):
    (tmp_path / "once.py").write_text(
        "from fedtune import merging\n"
        "from fedtune.merging.fedavg import FedAvg\n"
        "@merging.register('once-test')\n"
        "class Once(FedAvg):\n"
        "    pass\n"
    )
    assert parts.load_plugins("once.py", tmp_path) == ["once.py"]
    assert parts.load_plugins("once.py", tmp_path) == ["once.py"]  # no re-registration error
    assert "once-test" in merging.names()
