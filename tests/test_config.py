"""The config: defaults equal pyproject's, validation speaks in sentences."""

import tomllib
from pathlib import Path

import pytest

from common.config import Config

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_defaults_equal_pyproject():
    table = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert Config().to_mapping() == table


def test_from_mapping_coerces_and_rejects_unknown_keys():
    cfg = Config.from_mapping(
        {"adapter-k": 1, "central-eval": "false", "num-negatives": 8, "learning-rate": 1}
    )
    assert (cfg.adapter_k, cfg.central_eval, cfg.learning_rate) == (1, False, 1.0)
    with pytest.raises(ValueError, match="Unknown config key.*adapter-kk"):
        Config.from_mapping({"adapter-kk": 1})
    with pytest.raises(ValueError, match="adapter-k must be an integer"):
        Config.from_mapping({"adapter-k": 1.5})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_dim": 30, "user_heads": 4}, "divisible"),
        ({"fraction_train": 1.5}, r"fraction-train must lie in \[0, 1\]"),
        ({"dataset": "path"}, "needs data-path"),
        ({"partition": "iid"}, "num-partitions"),
        ({"adapter_k": -1}, "adapter-k must be 0 or more"),
        ({"server_lr_schedule": "step"}, "server-lr-schedule must be one of constant, cosine"),
        ({"server_lr_schedule": "cosine"}, "needs a strategy with a server learning rate"),
        ({"server_ema": 1.0}, r"server-ema must lie in \[0, 1\)"),
        ({"reply_poll_s": 0.0}, "reply-poll-s must be positive"),
        ({"server_beta2": 1.0}, r"server-beta2 must lie in \(0, 1\)"),
    ],
)
def test_invalid_configs_fail_with_a_sentence(changes, message):
    with pytest.raises(ValueError, match=message):
        Config(**changes)


def test_merged_applies_run_config_on_top_of_a_base():
    base = Config(num_server_rounds=2)
    assert base.merged({}).num_server_rounds == 2
    assert base.merged({"num-server-rounds": 5}).num_server_rounds == 5


def test_central_benchmark_configs_are_valid():
    configs = PYPROJECT.parent / "simulations" / "configs"
    for name in ("bench-central.toml", "bench-central-k1.toml"):
        assert isinstance(Config.from_toml(configs / name), Config)


def test_the_config_reference_in_docs_is_current():
    """docs/config.md is generated from Config's fields and help: a changed key, default or
    help text must be regenerated (`python -m common.config > docs/config.md`)."""
    from dataclasses import fields

    from common.config import key_of, reference_markdown

    doc = Path(__file__).resolve().parent.parent / "docs" / "config.md"
    assert doc.read_text(encoding="utf-8") == reference_markdown()
    assert all(f"`{key_of(f.name)}`" in reference_markdown() for f in fields(Config))
