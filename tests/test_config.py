"""Bad model configs are refused with one sentence naming the problem."""

import dataclasses

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


def test_every_model_field_is_documented():
    """Each ModelConfig field has its one line (the comment on its line), which `glm52 config keys`
    lists as model.FIELD."""
    from glm52_train.config import field_help
    from glm52_train.run_config import config_keys

    docs = field_help(ModelConfig)
    fields = [f.name for f in dataclasses.fields(ModelConfig)]
    assert sorted(docs) == sorted(fields)
    assert all(len(docs[f]) > 8 for f in fields), [f for f in fields if len(docs[f]) <= 8]
    listed = {k.name: k for k in config_keys()}
    assert listed["model.index_topk"].help == docs["index_topk"] == "keys each query attends to (DSA top-k)"
    assert listed["model.index_topk"].type == "int" and listed["model.index_topk"].default == "2048"


@pytest.mark.parametrize("overrides, name", [
    (["model=tiny", "model.num_layers=6", "model.index_pattern=FSFSFS"], "tiny+num_layers=6,index_pattern=FSFSFS"),
    (["model.base=tiny", "model.moe_topk=2"], "tiny"),  # tiny's own value: not a change
    (["model.base=tiny", "model.rope_scaling={rope_type: yarn, factor: 2}"], "tiny+rope_scaling"),
    (["model.base=tiny", "model.hidden_size=256", "model.name=wide"], "wide"),
    (["model.hidden_size=256"], "tiny+hidden_size=256"),  # over the default flavor
    (["model={hidden_size: 256}"], "custom"),  # a mapping without base: no flavor to be mistaken for
])
def test_a_modified_model_is_named_as_such(overrides, name):
    from glm52_train.run_config import load_run_config

    assert load_run_config(None, overrides).model_config().name == name


def test_unknown_model_field_says_did_you_mean():
    from glm52_train.run_config import load_run_config

    with pytest.raises(ConfigError) as err:
        load_run_config(None, ["model.num_layrs=6"]).model_config()
    assert str(err.value) == ("unknown key model.num_layrs (did you mean model.num_layers?); "
                              "`glm52 config keys` lists every key.")


def test_a_run_shorter_than_its_warm_up_gets_a_proportionate_one():
    """tiny.yaml's warm-up is a fraction of the run: 20 of its 250 steps, 1 of a 20-step run and
    none of a 1-step run; an explicit optimizer.warmup_iters is used as given, and one that leaves
    no decay is still refused in one sentence naming the fraction to use instead."""
    from glm52_train.run_config import load_run_config

    def warmup(*overrides):
        from glm52_train.training.identity import schedule_of

        cfg = load_run_config("configs/tiny.yaml", list(overrides))
        cfg.validate(world_size=1)
        assert schedule_of(cfg.to_dict())["warmup_iters"] == cfg.warmup_length()  # what the scheduler runs
        return cfg.warmup_length()

    assert warmup() == 20
    assert warmup("train.iters=20") == 1
    assert warmup("train.iters=1") == 0
    assert warmup("train.iters=20", "optimizer.decay_iters=200") == 16
    assert warmup("train.iters=20", "optimizer.warmup_iters=7") == 7
    assert warmup("optimizer.warmup_fraction=0") == 0
    with pytest.raises(ConfigError) as err:
        warmup("train.iters=20", "optimizer.warmup_iters=20")
    assert str(err.value) == ("optimizer.warmup_iters (20) must be below the decay length (20, optimizer.decay_iters "
                              "or train.iters); or set it to null for optimizer.warmup_fraction (0.08) of the decay "
                              "length.")
    with pytest.raises(ConfigError, match=r"optimizer.warmup_fraction must be at least 0 and below 1, got 1.0\."):
        warmup("optimizer.warmup_fraction=1")
