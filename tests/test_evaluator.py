"""The shipped world evaluator and the metrics built on it."""

import shutil

import numpy as np
import pytest
import torch

from ether_diffusion.assets import AssetError
from ether_diffusion.evaluation import (
    diversity,
    instance_self_similarity,
    load_evaluator,
    miou,
    prompt_fidelity,
    read_images,
    segment,
    subject_fidelity,
)
from ether_diffusion.evaluation.metrics import ImageReading, SlotReading, as_pixel_batch, score_reading
from ether_diffusion.world import caption, parse_prompt, render, scene_for_seed
from ether_diffusion.world.subjects import load_subjects


@pytest.fixture(scope="module")
def evaluator():
    return load_evaluator()


@pytest.fixture(scope="module")
def rendered():
    scenes = [scene_for_seed(20_000_000 + i, "all") for i in range(48)]  # seeds no training set used
    outs = [render(s) for s in scenes]
    return scenes, np.stack([o.image for o in outs]), np.stack([o.mask for o in outs])


def test_evaluator_reads_rendered_images(evaluator, rendered):
    scenes, images, masks = rendered
    readings = read_images(images, evaluator)
    hits = {k: [] for k in ("shape", "colour", "texture", "size", "position", "background")}
    for scene, reading in zip(scenes, readings):
        hits["background"].append(reading.background == scene.background)
        by_position = {r.position: r for r in reading.objects}
        hits["position"].append(set(by_position) == {o.position for o in scene.objects})
        for o in scene.objects:
            r = by_position.get(o.position)
            for key in ("shape", "colour", "texture", "size"):
                hits[key].append(r is not None and getattr(r, key) == getattr(o, key))
    for key, values in hits.items():
        assert np.mean(values) >= 0.95, (key, np.mean(values))
    assert miou(segment(images, evaluator), masks) >= 0.9


def test_prompt_fidelity_is_one_on_true_captions_and_drops_on_wrong_ones(evaluator, rendered):
    scenes, images, _ = rendered
    true = [caption(s) for s in scenes]
    assert prompt_fidelity(images, true, evaluator)["overall"] >= 0.97
    swapped = [caption(s).replace(" on a ", " XX ").replace("red", "blue") for s in scenes]  # no background
    wrong = [caption(s) for s in reversed(scenes)]
    result = prompt_fidelity(images, wrong, evaluator)
    assert result["background"] < 0.6 and result["overall"] < 0.7
    assert "background" not in prompt_fidelity(images, swapped, evaluator)
    with pytest.raises(ValueError, match="prompts"):
        prompt_fidelity(images[:2], true[:3], evaluator)


def test_score_reading_binds_attributes_to_the_right_object():
    reading = ImageReading(
        (
            SlotReading("top left", "star", "red", "solid", "small", 1.0),
            SlotReading("bottom right", "circle", "blue", "dotted", "large", 1.0),
        ),
        "gray",
    )
    found = score_reading(reading, parse_prompt("a blue dotted circle at bottom right and a red star at top left"))
    assert found["shape"] == [True, True] and found["colour"] == [True, True] and found["position"] == [True, True]
    found = score_reading(reading, parse_prompt("a blue circle at top left on a white background"))
    assert found["shape"] == [True] and found["colour"] == [True] and found["background"] == [False]
    assert found["position"] == [False]  # the blue circle it found sits at bottom right
    found = score_reading(reading, parse_prompt("a green square"))
    assert found["shape"] == [False] and found["colour"] == [False] and found["position"] == []


def test_subject_fidelity_and_diversity_rank_as_they_should(evaluator):
    subjects = load_subjects()
    own = [instance_self_similarity(s.images(), evaluator) for s in subjects]
    cross = subject_fidelity(subjects[0].images(), subjects[1].images(), evaluator)
    assert min(own) > 0.95 and cross < min(own) - 0.1
    same = np.stack([np.asarray(subjects[0].images()[0])] * 4)
    assert diversity(same, evaluator) == pytest.approx(0.0, abs=1e-5)
    varied = np.stack([np.asarray(s.images()[0]) for s in subjects])
    assert diversity(varied, evaluator) > 0.1


def test_miou_exact_values():
    true = np.array([[0, 0, 1, 1]])
    assert miou(true, true) == 1.0
    pred = np.array([[0, 1, 1, 1]])
    assert miou(pred, true) == pytest.approx((1 / 2 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="shapes differ"):
        miou(pred, true[:, :3])


def test_image_formats_all_give_the_same_batch():
    image = render(scene_for_seed(3)).image
    from PIL import Image

    a = as_pixel_batch(image[None])
    torch.testing.assert_close(as_pixel_batch([Image.fromarray(image)]), a)
    torch.testing.assert_close(as_pixel_batch(image.astype(np.float32) / 255.0), a)
    torch.testing.assert_close(as_pixel_batch(a), a)
    assert as_pixel_batch(np.repeat(np.repeat(image, 2, 0), 2, 1)).shape == (1, 3, 64, 64)


def test_missing_or_corrupt_evaluator_names_the_file_and_the_fix(tmp_path):
    shutil.copytree("assets/evaluator", tmp_path / "ev")
    weights = tmp_path / "ev" / "evaluator.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(AssetError, match=r"evaluator\.safetensors.*corrupt.*ether-diffusion world train-evaluator"):
        load_evaluator(tmp_path / "ev")
    weights.unlink()
    with pytest.raises(AssetError, match=r"evaluator\.safetensors is missing.*ether-diffusion world train-evaluator"):
        load_evaluator(tmp_path / "ev")


def test_train_evaluator_runs_end_to_end(tmp_path):
    from ether_diffusion.evaluation.train import main, parse_args

    info = main(
        parse_args(
            [
                "--output_dir",
                str(tmp_path / "ev"),
                "--num_images",
                "16",
                "--num_eval_images",
                "8",
                "--max_train_steps",
                "2",
                "--train_batch_size",
                "4",
                "--device",
                "cpu",
            ]
        )
    )
    assert set(info["held_out_clean"]) >= {"shape", "colour", "texture", "size", "position", "background"}
    model = load_evaluator(tmp_path / "ev")
    readme = (tmp_path / "ev" / "README.md").read_text()
    assert "Held-out accuracy" in readme and "    ether-diffusion world train-evaluator --output_dir" in readme
    assert model(torch.zeros(1, 3, 64, 64)).embedding.shape == (1, 128)
