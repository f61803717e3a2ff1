"""Flag parity with diffusers' DreamBooth scripts: every flag of train_dreambooth_lora.py and train_dreambooth.py is
accepted (and reaches the run's configuration) or refused with the reason it does not apply to ETHER and what to use
instead. Parsing only: what each flag does in training is tested in tests/test_training_flags.py."""

import dataclasses
import importlib.util

import pytest

from ether_diffusion import registry
from ether_diffusion.training.config import ConfigError, TaskKind
from ether_diffusion.training.dreambooth import DreamBoothConfig

# The flags of diffusers' examples/dreambooth/train_dreambooth_lora.py, in the order of its parse_args (diffusers
# main of 2024-2025: the 57 of the 0.22 release, read in huggingface/diffusers, plus --lora_dropout and
# --image_interpolation_mode: 59), each with a value a user might give.
TRAIN_DREAMBOOTH_LORA = {
    "pretrained_model_name_or_path": ["assets/tiny-sd"],
    "revision": ["main"],
    "variant": ["fp16"],
    "tokenizer_name": ["openai/clip-vit-large-patch14"],
    "instance_data_dir": ["dog"],
    "class_data_dir": ["dog-class"],
    "instance_prompt": ["a photo of sks dog"],
    "class_prompt": ["a photo of dog"],
    "validation_prompt": ["a photo of sks dog in a bucket"],
    "num_validation_images": ["2"],
    "validation_epochs": ["50", "--validation_prompt", "a photo of sks dog"],
    "with_prior_preservation": ["--class_prompt", "a photo of dog"],
    "prior_loss_weight": ["0.5"],
    "num_class_images": ["50"],
    "output_dir": ["lora-dreambooth-model"],
    "seed": ["42"],
    "resolution": ["512"],
    "center_crop": [],
    "train_text_encoder": [],
    "train_batch_size": ["4"],
    "sample_batch_size": ["2"],
    "num_train_epochs": ["2"],
    "max_train_steps": ["500"],
    "checkpointing_steps": ["100"],
    "checkpoints_total_limit": ["2"],
    "resume_from_checkpoint": ["latest"],
    "gradient_accumulation_steps": ["2"],
    "gradient_checkpointing": [],
    "learning_rate": ["5e-4"],
    "scale_lr": [],
    "lr_scheduler": ["cosine"],
    "lr_warmup_steps": ["10"],
    "lr_num_cycles": ["2"],
    "lr_power": ["2.0"],
    "dataloader_num_workers": ["2"],
    "use_8bit_adam": [],
    "adam_beta1": ["0.8"],
    "adam_beta2": ["0.99"],
    "adam_weight_decay": ["1e-2"],
    "adam_epsilon": ["1e-7"],
    "max_grad_norm": ["0.5"],
    "push_to_hub": [],
    "hub_token": ["hf_secret", "--push_to_hub"],
    "hub_model_id": ["me/sks-dog", "--push_to_hub"],
    "logging_dir": ["tb"],
    "allow_tf32": [],
    "report_to": ["none"],
    "mixed_precision": ["bf16"],
    "prior_generation_precision": ["fp32"],
    "local_rank": ["0"],
    "enable_xformers_memory_efficient_attention": [],
    "pre_compute_text_embeddings": [],
    "tokenizer_max_length": ["8"],
    "text_encoder_use_attention_mask": [],
    "validation_images": ["low_res.png", "other.png"],
    "class_labels_conditioning": ["timesteps"],
    "rank": ["4"],
    "lora_dropout": ["0.1"],
    "image_interpolation_mode": ["lanczos"],
}

# The flags of diffusers' examples/dreambooth/train_dreambooth.py (full fine-tuning), in the order of its parse_args
# as read in huggingface/diffusers (release 0.22 onwards), that train_dreambooth_lora.py does not have.
TRAIN_DREAMBOOTH_ONLY = {
    "validation_steps": ["100", "--validation_prompt", "a photo of sks dog"],
    "set_grads_to_none": [],
    "offset_noise": [],
    "snr_gamma": ["5.0"],
    "skip_save_text_encoder": [],
    "validation_scheduler": ["DDPMScheduler"],
}
# ...and the ones it shares with train_dreambooth_lora.py (every one but --validation_epochs, --rank, --lora_dropout
# and --image_interpolation_mode)
TRAIN_DREAMBOOTH = {
    **{f: v for f, v in TRAIN_DREAMBOOTH_LORA.items() if f not in ("validation_epochs", "rank", "lora_dropout",
                                                                   "image_interpolation_mode")},
    **TRAIN_DREAMBOOTH_ONLY,
}  # fmt: skip

# Flags of train_dreambooth_lora_sdxl.py that kohya/diffusers users expect in any DreamBooth
TRAIN_DREAMBOOTH_LORA_SDXL_EXTRAS = {
    "dataset_name": ["my-dataset"],
    "dataset_config_name": ["default"],
    "cache_dir": ["hf-cache"],
    "image_column": ["img"],
    "caption_column": ["prompt", "--dataset_name", "my-dataset"],
    "repeats": ["3"],
    "random_flip": [],
    "optimizer": ["prodigy", "--learning_rate", "1.0"],
    "prodigy_beta3": ["0.9", "--optimizer", "prodigy"],
    "prodigy_decouple": ["false", "--optimizer", "prodigy"],
    "prodigy_use_bias_correction": ["false", "--optimizer", "prodigy"],
    "prodigy_safeguard_warmup": ["false", "--optimizer", "prodigy"],
    "text_encoder_lr": ["5e-6", "--train_text_encoder"],
    "adam_weight_decay_text_encoder": ["1e-3", "--train_text_encoder"],
    "cache_latents": [],
    "output_kohya_format": [],
    "use_dora": [],
    "do_edm_style_training": [],
}

#: accepted when the package is installed, else a usage error saying how to install it
NEEDS_PACKAGE = {
    "use_8bit_adam": "bitsandbytes",
    "enable_xformers_memory_efficient_attention": "xformers",
    "optimizer": "prodigyopt",
    "prodigy_beta3": "prodigyopt",
    "prodigy_decouple": "prodigyopt",
    "prodigy_use_bias_correction": "prodigyopt",
    "prodigy_safeguard_warmup": "prodigyopt",
    "dataset_name": "datasets",
    "caption_column": "datasets",
    "push_to_hub": "huggingface_hub",
    "hub_token": "huggingface_hub",
    "hub_model_id": "huggingface_hub",
}

#: refused: the reason names what to use instead
REFUSED = {
    "rank": "--n_blocks",
    "lora_dropout": "--with_prior_preservation",
    "validation_images": "--validation_prompt",
    "class_labels_conditioning": "Drop the flag",
    "use_dora": "use --ether_method ether_plus",
    "do_edm_style_training": "Drop the flag",
}

BASE = ["--instance_data_dir", "dog", "--instance_prompt", "a photo of sks dog"]
#: flags that replace the instance folder (a dataset instead)
NO_FOLDER = ("dataset_name", "caption_column")
#: flags the base command line already gives
IN_BASE = ("instance_data_dir", "instance_prompt", "pretrained_model_name_or_path")


def _argv(flag: str, values: list[str]) -> list[str]:
    base = BASE[2:] if flag in NO_FOLDER else BASE
    return [*base, f"--{flag}", *values]


def test_the_lists_are_diffusers_counts():
    assert len(TRAIN_DREAMBOOTH_LORA) == 59
    assert len(TRAIN_DREAMBOOTH) == 61


ALL = {**TRAIN_DREAMBOOTH_LORA, **TRAIN_DREAMBOOTH_ONLY, **TRAIN_DREAMBOOTH_LORA_SDXL_EXTRAS}


@pytest.mark.parametrize("flag", list(ALL))
def test_every_diffusers_flag_is_accepted_or_refused_with_a_reason(flag, capsys):
    argv = _argv(flag, ALL[flag])
    package = NEEDS_PACKAGE.get(flag)
    if flag in REFUSED:
        with pytest.raises(SystemExit):
            registry.parse_args(TaskKind.DREAMBOOTH, argv)
        err = capsys.readouterr().err
        assert f"--{flag} does not apply to ETHER" in err and REFUSED[flag] in err, err
        return
    if package and importlib.util.find_spec(package) is None:
        with pytest.raises(SystemExit):
            registry.parse_args(TaskKind.DREAMBOOTH, argv)
        assert f"pip install {package}" in capsys.readouterr().err
        return
    config = registry.parse_args(TaskKind.DREAMBOOTH, argv)
    if flag in DreamBoothConfig.foreign_flags:  # accepted without a field: what it asks for is always so here
        assert DreamBoothConfig.foreign_flags[flag].accepted
        return
    assert any(f.name == flag for f in dataclasses.fields(config))
    if flag not in IN_BASE:  # the value reaches the configuration
        assert getattr(config, flag) != getattr(registry.parse_args(TaskKind.DREAMBOOTH, BASE), flag), flag


def test_refused_flags_are_refused_in_code_too():
    with pytest.raises(TypeError):
        DreamBoothConfig(instance_data_dir="dog", instance_prompt="a sks dog", rank=4)


def test_switches_on_by_default_take_a_value(capsys):
    assert registry.parse_args(TaskKind.DREAMBOOTH, [*BASE, "--prodigy_decouple", "no"]).prodigy_decouple is False
    assert registry.parse_args(TaskKind.DREAMBOOTH, [*BASE, "--prodigy_decouple=True"]).prodigy_decouple is True
    with pytest.raises(SystemExit):
        registry.parse_args(TaskKind.DREAMBOOTH, [*BASE, "--prodigy_decouple", "maybe"])
    assert "expected true or false" in capsys.readouterr().err


def test_optimizer_names_are_taken_in_any_case():
    assert registry.parse_args(TaskKind.DREAMBOOTH, [*BASE, "--optimizer", "AdamW"]).optimizer == "adamw"
    with pytest.raises(ConfigError, match="not one of AdamW, prodigy"):
        DreamBoothConfig(instance_data_dir="dog", instance_prompt="a sks dog", optimizer="sgd").validate()


def test_missing_optional_packages_say_how_to_install_them(monkeypatch):
    import sys

    for module, changes, message in [
        ("prodigyopt", dict(optimizer="prodigy"), r"pip install prodigyopt"),
        ("datasets", dict(dataset_name="d", instance_data_dir=None), r"pip install datasets"),
        ("huggingface_hub", dict(push_to_hub=True), r"pip install huggingface_hub"),
    ]:
        monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError, as if not installed
        config = DreamBoothConfig(**{"instance_data_dir": "dog", "instance_prompt": "a sks dog", **changes})
        with pytest.raises(ConfigError, match=message):
            config.validate()
        monkeypatch.undo()


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(instance_data_dir=None), "one of --instance_data_dir"),
        (dict(dataset_name="d"), "not both"),
        (dict(caption_column="text"), "caption file beside each image"),
        (dict(caption_extension="txt"), "must look like .txt"),
        (dict(pre_compute_text_embeddings=True, train_text_encoder=True), "use one of them"),
        (dict(text_encoder_lr=1e-4), "need --train_text_encoder"),
        (dict(hub_model_id="me/x"), "are for --push_to_hub"),
        (dict(optimizer="prodigy", use_8bit_adam=True), "drop it"),
    ],
)
def test_contradicting_new_flags_say_what_to_do(changes, message):
    config = DreamBoothConfig(**{"instance_data_dir": "dog", "instance_prompt": "a sks dog", **changes})
    with pytest.raises(ConfigError, match=message):
        config.validate()


def test_the_hub_token_is_not_part_of_the_run_or_its_records():
    config = registry.parse_args(TaskKind.DREAMBOOTH, [*BASE, "--push_to_hub", "--hub_token", "hf_secret"])
    assert "hub_token" not in config.identity() and "hub_token" not in config.public_dict()
    assert "hf_secret" not in repr(config.identity()) + repr(config.public_dict())
