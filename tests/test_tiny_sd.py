"""The shipped tiny Stable Diffusion: loads offline, samples fast, draws what it is asked; pretraining runs,
checkpoints without pickle and resumes exactly; broken assets fail with a message that says how to regenerate them."""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ether_diffusion.assets import AssetError, check_pipeline_folder
from ether_diffusion.checkpoints import COMPLETE_MARKER
from ether_diffusion.evaluation import evaluate, load_evaluator, read_images
from ether_diffusion.models import load_tiny_pipeline
from ether_diffusion.world import pretrain

pytestmark = pytest.mark.slow  # the tiny world's training and evaluation runs: the end-to-end tier

MODEL = Path("assets/tiny-sd")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On a small shared CPU, two intra-op threads competing with other work can slow this tiny model 30x;
    # one thread is steady (about 1 s for 25 steps).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipe():
    return load_tiny_pipeline()


def test_shipped_folder_is_small_safetensors_only_and_loads_with_plain_diffusers():
    from diffusers import StableDiffusionPipeline

    files = [f for f in MODEL.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 20 * 1024 * 1024
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    plain = StableDiffusionPipeline.from_pretrained(str(MODEL), local_files_only=True)
    assert plain.safety_checker is None and plain.feature_extractor is None
    assert plain.tokenizer.model_max_length == plain.text_encoder.config.max_position_embeddings == 32


def test_ether_targets_exist_with_block_friendly_widths(pipe):
    names = {n.rsplit(".", 1)[-1] for n, _ in pipe.unet.named_modules()}
    assert {"attn1", "attn2"} <= names
    linears = {
        n: m for n, m in pipe.unet.named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj"))
    }
    assert len([n for n in linears if ".attn2." in n]) >= 4
    for name, module in linears.items():
        assert module.in_features % 16 == 0, name


def test_generates_in_seconds(pipe):
    start = time.perf_counter()
    image = pipe(
        "a red star", num_inference_steps=25, height=64, width=64, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert time.perf_counter() - start < 10
    assert image.size == (64, 64)
    assert np.asarray(image).std() > 5  # not a flat or blank image


@pytest.mark.parametrize(
    ("prompt", "seed", "shape", "colour", "background"),
    [
        ("a large red solid star at center on a blue background", 0, "star", "red", "blue"),
        ("a small yellow dotted heart at top left on a gray background", 1, "heart", "yellow", "gray"),
        ("a large green striped circle at bottom right on a white background", 2, "circle", "green", "white"),
    ],
)
def test_generated_images_are_read_back_by_the_evaluator(pipe, prompt, seed, shape, colour, background):
    image = pipe(
        prompt,
        num_inference_steps=25,
        guidance_scale=5.0,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images
    (reading,) = read_images(image, load_evaluator())
    assert reading.background == background
    assert any(o.shape == shape and o.colour == colour for o in reading.objects), reading


def test_missing_or_corrupt_pipeline_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(AssetError, match=r"model_index\.json is missing.*ether-diffusion world pretrain"):
        load_tiny_pipeline(tmp_path / "nowhere")
    shutil.copytree(MODEL, tmp_path / "sd")
    check_pipeline_folder(tmp_path / "sd")
    weights = tmp_path / "sd" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(AssetError, match=r"unet/diffusion_pytorch_model\.safetensors is corrupt.*world pretrain"):
        load_tiny_pipeline(tmp_path / "sd")
    shutil.copy(MODEL / "unet" / "diffusion_pytorch_model.safetensors", weights)
    (tmp_path / "sd" / "vae" / "config.json").unlink()
    with pytest.raises(AssetError, match=r"vae/config\.json is missing"):
        check_pipeline_folder(tmp_path / "sd")


def test_pretraining_trains_saves_a_loadable_pipeline_and_resumes(tmp_path):
    from diffusers import StableDiffusionPipeline

    main, parse_args = pretrain.main, pretrain.parse_args
    common = [
        "--output_dir",
        str(tmp_path / "run"),
        "--num_images",
        "24",
        "--vae_steps",
        "2",
        "--vae_batch_size",
        "4",
        "--train_batch_size",
        "4",
        "--checkpointing_steps",
        "2",
        "--device",
        "cpu",
    ]
    out = main(parse_args([*common, "--max_train_steps", "2", "--export_dir", str(tmp_path / "export")]))
    first = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    assert (tmp_path / "run" / "checkpoint-4" / COMPLETE_MARKER).is_file()
    assert sorted(p.name for p in (tmp_path / "run").glob("*checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert json.loads((out / "training.json").read_text())["command"].startswith("ether-diffusion world pretrain ")
    resumed = main(parse_args([*common, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"]))
    second = StableDiffusionPipeline.from_pretrained(str(resumed), local_files_only=True)
    # The VAE was not retrained on resume; the UNet moved on.
    for a, b in zip(first.vae.parameters(), second.vae.parameters()):
        torch.testing.assert_close(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(first.unet.parameters(), second.unet.parameters()))
    image = second("a red star", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_a_resumed_pretraining_ends_where_the_uninterrupted_one_does(tmp_path):
    """Checkpoints hold models, optimizer states, EMA shadows and RNG states in safetensors, the rest in JSON; resumed
    in the VAE phase or in the diffusion phase, a run ends with the uninterrupted run's tensors, bit for bit."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    common = ["--num_images", "16", "--vae_steps", "4", "--vae_batch_size", "2", "--max_train_steps", "4",
              "--train_batch_size", "2", "--lr_warmup_steps", "2", "--checkpointing_steps", "2",
              "--checkpoints_total_limit", "0", "--device", "cpu"]  # fmt: skip
    whole = tmp_path / "whole"
    pretrain.main(pretrain.parse_args([*common, "--output_dir", str(whole)]))
    checkpoints = sorted(whole.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in checkpoints] == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"]
    for folder in checkpoints:
        assert sorted(p.name for p in folder.iterdir()) == sorted([COMPLETE_MARKER, "state.json", "state.safetensors"])
        with safe_open(str(folder / "state.safetensors"), framework="pt") as handle:
            keys = set(handle.keys())
        assert {"vae/encoder.conv_in.weight", "vae_opt/state/0/exp_avg", "emas/0/shadow/0", "generator"} <= keys
        assert "torch_rng" in keys
        assert {"phase", "step", "scaling", "args"} <= set(json.loads((folder / "state.json").read_text()))
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".pt", ".pkl", ".pth", ".bin")]

    final = load_file(str(whole / "checkpoint-8" / "state.safetensors"))
    assert "diff_opt/state/0/exp_avg" in final
    for resume_from, phase in (("checkpoint-2", "vae"), ("checkpoint-6", "diffusion")):
        resumed = tmp_path / f"from-{resume_from}"
        resumed.mkdir()
        shutil.copytree(whole / resume_from, resumed / resume_from)
        assert json.loads((resumed / resume_from / "state.json").read_text())["phase"] == phase
        pretrain.main(
            pretrain.parse_args([*common, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
        )
        again = load_file(str(resumed / "checkpoint-8" / "state.safetensors"))
        assert set(again) == set(final)
        different = [key for key in final if not torch.equal(again[key], final[key])]
        assert not different, (resume_from, different[:5])
        for component in ("unet", "vae", "text_encoder"):
            for (a_name, a), (b_name, b) in zip(
                sorted(load_file(str(next((whole / "pipeline" / component).glob("*.safetensors")))).items()),
                sorted(load_file(str(next((resumed / "pipeline" / component).glob("*.safetensors")))).items()),
            ):
                assert a_name == b_name and torch.equal(a, b), (resume_from, component, a_name)


def test_pretraining_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--num_images", "0"])
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--checkpoints_total_limit", "-1"])


def test_evaluation_scores_and_writes_a_model_card(tmp_path):
    main, parse_args = evaluate.main, evaluate.parse_args
    folder = tmp_path / "sd"
    shutil.copytree(MODEL, folder)
    for name in ("README.md", "samples.png", "eval.json"):
        (folder / name).unlink()
    args = [
        "--pretrained_model_name_or_path",
        str(folder),
        "--num_prompts",
        "3",
        "--num_class_images",
        "2",
        "--num_inference_steps",
        "3",
        "--write_model_card",
    ]
    result = main(parse_args(args))
    assert set(result["heldout_prompt_fidelity"]) >= {"shape", "colour", "background"}
    assert len(result["subjects"]) == 4
    card = (folder / "README.md").read_text()
    assert "Quality gate" in card and "orange_checkered_star" in card
    assert "`ether-diffusion world evaluate --write_model_card" in card and "scripts/" not in card
    assert (folder / "samples.png").is_file() and (folder / "eval.json").is_file()
