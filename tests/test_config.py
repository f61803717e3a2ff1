"""EtherConfig: defaults per method, validation messages, versioned JSON round trip."""

import json

import pytest

from ether_diffusion.config import CONFIG_FORMAT_VERSION, TARGET_PRESETS, EtherConfig, check_adapter_name


def test_paper_defaults_per_method():
    assert EtherConfig(method="ether").sides == ("input",)
    assert EtherConfig(method="ether_plus").sides == ("input", "output")  # two-sided, the paper's default
    assert EtherConfig(sides=["output", "input"]).sides == ("input", "output")
    assert EtherConfig().target_suffixes == TARGET_PRESETS["unet-attention"] == ("to_q", "to_k", "to_v", "to_out.0")
    assert "ff.net.0.proj" in EtherConfig(target_modules="unet-attention-ff").target_suffixes


@pytest.mark.parametrize(
    "config",
    [
        EtherConfig(),
        EtherConfig(method="ether", n_blocks=16, target_modules=["to_q", "attn2.to_k"], exclude_modules=["mid_block"]),
        EtherConfig(method="ether_plus", sides=("output",), target_modules="text-encoder-attention", init_seed=7),
    ],
)
def test_json_round_trip(config):
    text = config.to_json()
    assert json.loads(text)["format_version"] == CONFIG_FORMAT_VERSION
    assert EtherConfig.from_json(text) == config


def test_targets_and_exclusions_match_whole_path_components():
    config = EtherConfig(target_modules=["to_q", "to_out.0"], exclude_modules=["down_blocks.0"])
    assert config.is_target("up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    assert config.is_target("mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0")
    assert not config.is_target("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    assert config.is_target("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")  # not "down_blocks.1x"
    assert not config.is_target("blocks.0.my_to_q")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="lora"), "unknown ETHER method 'lora'"),
        (dict(n_blocks=0), "n_blocks must be a positive integer"),
        (dict(sides=("left",)), "sides must be a non-empty subset"),
        (dict(target_modules="everything"), "unknown target preset 'everything'"),
        (dict(target_modules=[]), "non-empty list"),
        # wrong types are a ValueError too (a file's config reaches here), never a TypeError
        (dict(method=["ether"]), "unknown ETHER method"),
        (dict(n_blocks=True), "n_blocks must be a positive integer"),
        (dict(sides="input"), "sides must be a non-empty subset"),  # not the characters of "input"
        (dict(sides=[["input"]]), "sides must be a non-empty subset"),
        (dict(sides=5), "sides must be a non-empty subset"),
        (dict(target_modules=5), "target_modules must be a preset name or a non-empty list"),
        (dict(target_modules=["to_q", 5]), "target_modules must be a preset name or a non-empty list"),
        (dict(exclude_modules="mid_block"), r"exclude_modules must be a list of module-path fragments"),
        (dict(exclude_modules=[None]), r"exclude_modules must be a list of module-path fragments"),
        (dict(init_seed="7"), "init_seed must be an integer"),
        (dict(init_seed=1.5), "init_seed must be an integer"),
    ],
)
def test_invalid_configs_say_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EtherConfig(**kwargs)


def test_unknown_version_and_fields_are_rejected():
    data = EtherConfig().to_dict()
    with pytest.raises(ValueError, match="format_version 99 is not supported.*upgrade"):
        EtherConfig.from_dict({**data, "format_version": 99})
    with pytest.raises(ValueError, match=r"unknown fields \['rank'\]"):
        EtherConfig.from_dict({**data, "rank": 4})


@pytest.mark.parametrize("name", ["a", "subject", "my-star_2", "0", "A" * 64])
def test_valid_adapter_names_pass_through(name):
    assert check_adapter_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "-lead", "_lead", "has space", "dot.ted", "../up", "a/b", "ä", "A" * 65, "trailing\n", None, 3],
)
def test_invalid_adapter_names_say_which_characters_are_allowed(name):
    with pytest.raises(ValueError, match=r"invalid adapter name .*letters.*digits, '_' or '-', starting with"):
        check_adapter_name(name)


def test_the_name_rule_is_the_one_inject_and_load_use():
    import torch

    from ether_diffusion import inject

    with pytest.raises(ValueError, match="invalid adapter name 'x y'"):
        inject(torch.nn.Sequential(torch.nn.Linear(4, 4)), EtherConfig(target_modules=["0"]), "x y")


def test_from_dict_refuses_what_is_not_a_dict():
    for data in (None, [], "ether", 3):
        with pytest.raises(ValueError, match="an EtherConfig is a JSON object of its fields"):
            EtherConfig.from_dict(data)
