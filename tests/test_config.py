"""Bad model configs are refused with one sentence naming the problem."""

import pytest

from glm52_train.config import ConfigError, ModelConfig, get_model_config, index_share_pattern


def test_index_share_rule_matches_glm52():
    assert index_share_pattern(8, 4, 3) == "FFFSSSFS"
    assert get_model_config("glm52-744b").layer_index_pattern.count("F") == 21


@pytest.mark.parametrize(
    "changes, phrase",
    [
        (dict(index_pattern="SFSF"), "first layer must be F"),
        (dict(index_pattern="FSF"), "index_pattern has 3 entries for 4 layers"),
        (dict(index_pattern="FXFS"), "only F and S"),
        (dict(moe_topk=9), "moe_topk (9) must lie between 1 and num_experts (8)"),
        (dict(qk_rope_dim=15), "qk_rope_dim must be even"),
        (dict(index_head_dim=8), "index_head_dim (8) must be at least qk_rope_dim (16)"),
        (dict(num_dense_layers=5), "num_dense_layers (5)"),
        (dict(mtp_layers=2, mtp_steps=1), "mtp_steps (1) must be at least mtp_layers (2)"),
        (dict(moe_groups=3), "moe_groups (3) must divide num_experts (8)"),
        (dict(moe_groups=2, moe_topk_groups=1, moe_topk=3), "group-limited routing"),
    ],
)
def test_validation_sentences(changes, phrase):
    with pytest.raises(ConfigError) as err:
        get_model_config("tiny").replace(**changes).validate()
    message = str(err.value)
    assert phrase in message and "\n" not in message


def test_round_trip_and_unknown_fields():
    cfg = get_model_config("tiny")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown model field"):
        ModelConfig.from_dict({**cfg.to_dict(), "num_layerz": 3})
