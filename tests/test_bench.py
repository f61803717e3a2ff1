"""The benchmarks' pieces: the DreamBooth dataset layout, the DINO / CLIP metrics on tiny random-weight models built
from configs (no downloads), segmentation scores, the resumable run folder, the aggregation and the configurations.
The end-to-end runs are in test_bench_e2e.py (slow tier)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import build_metric_models, dreambooth_config
from PIL import Image

from ether_diffusion.bench.dataset import (
    PROMPTS_FILE,
    WORLD_TEMPLATES,
    DatasetError,
    export_world_dataset,
    load_subject_dataset,
    parse_prompts_and_classes,
    write_prompts_and_classes,
)
from ether_diffusion.bench.metrics import (
    CLIP_MEAN,
    CLIP_STD,
    ClipEncoder,
    DinoClipMetrics,
    DinoEncoder,
    MetricModelError,
    TransformersSegmenter,
    preprocess,
    segmentation_scores,
)
from ether_diffusion.bench.report import summarise
from ether_diffusion.bench.runs import SCORES, BenchMismatchError, RunStore
from ether_diffusion.files import write_json

# The format of google/dreambooth's dataset/prompts_and_classes.txt (a few of its rows and templates).
PROMPTS_TEXT = """Classes

subject_name,class
backpack,backpack
dog,dog
cat2,cat
bear_plushie,stuffed animal


Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} in the snow'.format(unique_token, class_token),
'a cube shaped {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} wearing a red hat'.format(unique_token, class_token)
]
"""


def _image(seed: int, size=(40, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def make_dataset(root, text=PROMPTS_TEXT, subjects=("backpack", "dog", "cat2", "bear_plushie"), images=3):
    root.mkdir(parents=True, exist_ok=True)
    (root / PROMPTS_FILE).write_text(text)
    for k, name in enumerate(subjects):
        (root / name).mkdir()
        for i in range(images):
            _image(10 * k + i).save(root / name / f"{i:02d}.jpg")
    (root / "references_and_licenses.txt").write_text("not a subject\n")
    return root


# --- the dataset layout -----------------------------------------------------------------------------------------


def test_prompts_file_parses_classes_and_both_template_lists():
    classes, objects, live = parse_prompts_and_classes(PROMPTS_TEXT)
    assert classes == {"backpack": "backpack", "dog": "dog", "cat2": "cat", "bear_plushie": "stuffed animal"}
    assert objects == ["a {0} {1} in the jungle", "a {0} {1} in the snow", "a cube shaped {0} {1}"]
    assert live == ["a {0} {1} in the jungle", "a {0} {1} wearing a red hat"]


def test_dataset_subjects_kinds_and_prompts(tmp_path):
    data = load_subject_dataset(make_dataset(tmp_path / "dataset"))
    assert [s.name for s in data.subjects] == ["backpack", "dog", "cat2", "bear_plushie"]
    assert {s.name: s.live for s in data.subjects} == {"backpack": False, "dog": True, "cat2": True,
                                                       "bear_plushie": False}  # fmt: skip
    assert len(data.subject("dog").image_paths) == 3
    dog = data.prompts(data.subject("dog"))
    assert [p.text for p in dog] == ["a sks dog in the jungle", "a sks dog wearing a red hat"]
    assert [p.class_text for p in dog] == ["a dog in the jungle", "a dog wearing a red hat"]  # what CLIP-T reads
    plush = data.prompts(data.subject("bear_plushie"), identifier="zwx", count=2)
    assert [p.text for p in plush] == ["a zwx stuffed animal in the jungle", "a zwx stuffed animal in the snow"]
    assert plush[0].class_text == "a stuffed animal in the jungle"
    cube = data.prompts(data.subject("backpack"))[2]
    assert (cube.text, cube.class_text) == ("a cube shaped sks backpack", "a cube shaped backpack")
    assert data.subject("dog").instance_prompt() == "a sks dog" and data.subject("dog").class_prompt == "a dog"
    # a clone of the repository works too, and the fingerprint follows the content, not the path
    assert load_subject_dataset(tmp_path).fingerprint() == data.fingerprint()
    assert [s.name for s in data.select(["cat2", "dog"])] == ["cat2", "dog"]
    with pytest.raises(DatasetError, match="no subject 'cat3'.*backpack, dog"):
        data.select(["cat3"])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.replace("'a {0} {1} in the snow'", "a {0} {1} in the snow"), r"line 16: expected a quoted"),
        (lambda t: t.replace("'a cube shaped {0} {1}'", "'a cube shaped {1}'"), r"line 17: .*must name the identif"),
        (lambda t: t.replace("'a {0} {1} in the snow'", "'a {2} in the snow'"), r"line 16: .*not a format string"),
        (lambda t: t.replace("dog,dog", "dog,dog\ndog,dog"), r"line 6: subject 'dog' is listed twice"),
        (lambda t: t.replace("cat2,cat", "cat2"), r"line 6: expected 'subject_folder,class noun'"),
        (lambda t: t.rstrip().removesuffix("]"), r"'live' prompt list is not closed"),
        (lambda t: t.split("Prompts")[0], r"no object prompt templates"),
        (lambda t: t.replace("Live Subject Prompts", "Animal Prompts"), r"unexpected 'Animal Prompts'"),
    ],
)
def test_bad_prompts_files_say_where(edit, message):
    with pytest.raises(DatasetError, match=message):
        parse_prompts_and_classes(edit(PROMPTS_TEXT))


def test_bad_dataset_folders_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_subject_dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no prompts_and_classes.txt.*export-world"):
        load_subject_dataset(tmp_path / "empty")
    root = make_dataset(tmp_path / "a", subjects=("backpack", "dog"))  # cat2, bear_plushie have no folder
    with pytest.raises(DatasetError, match="2 subject.*'cat2' has no folder; 'bear_plushie' has no folder"):
        load_subject_dataset(root)
    root = make_dataset(tmp_path / "b", images=0)
    with pytest.raises(DatasetError, match="'backpack/' holds no images"):
        load_subject_dataset(root)
    no_live = PROMPTS_TEXT.split("Live Subject Prompts")[0]
    root = make_dataset(tmp_path / "c", text=no_live)
    with pytest.raises(DatasetError, match="live subjects \\(dog, cat2.*no 'Live Subject Prompts'"):
        load_subject_dataset(root)
    assert not load_subject_dataset(root, live_classes=()).subject("dog").live  # all objects: no live list needed


def test_templates_with_format_specs_are_refused_before_anything_is_formatted():
    """'{0:>300000000}' makes str.format build 300 million characters (it took the benchmark to 16 GB)."""
    for field in ("{0:>300000000}", "{1:{0}}", "{0!r}"):
        text = PROMPTS_TEXT.replace("'a {0} {1} in the snow'", f"'a {field} {{1}} in the snow'")
        with pytest.raises(DatasetError, match=r"line 16: .* has the field .* without format specs or conversions"):
            parse_prompts_and_classes(text)
    text = PROMPTS_TEXT.replace("in the snow", "x" * 4090)
    with pytest.raises(DatasetError, match=r"line 16: the template is 4,100 characters long, over the limit of 4,096"):
        parse_prompts_and_classes(text)


def test_a_prompt_filled_over_the_limit_is_refused_before_it_is_built(tmp_path):
    text = PROMPTS_TEXT.replace("backpack,backpack", "backpack," + "very " * 500 + "backpack").replace(
        "'a cube shaped {0} {1}'", "'a {0} {1} and a {1} and a {1}'"
    )
    data = load_subject_dataset(make_dataset(tmp_path / "dataset", text=text))
    with pytest.raises(DatasetError, match=r"the template 'a \{0\} \{1\} and a .* is 7,544 characters, over the lim"):
        data.prompts(data.subject("backpack"))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(PROMPTS_TEXT.replace("snow", "montaña").encode("latin-1")),
         r"prompts file '.*prompts_and_classes.txt' is not UTF-8 text \(byte 0xf1 .* it must be UTF-8 text"),
        (lambda p: os.truncate(p, 100 * 2**20),
         r"prompts file '.*prompts_and_classes.txt' is 104,857,600 bytes, over the limit of 1,048,576"),
        (lambda p: p.write_bytes(PROMPTS_TEXT.encode() + b"\0"), r"prompts_and_classes.txt' holds NUL bytes"),
    ],
    ids=["latin-1", "100-MB", "nul"],
)  # fmt: skip
def test_prompts_files_that_are_not_utf8_text_are_named(tmp_path, make, message):
    root = make_dataset(tmp_path / "dataset")
    make(root / PROMPTS_FILE)
    with pytest.raises(DatasetError, match=message):
        load_subject_dataset(root)


def test_prompts_file_round_trip(tmp_path):
    path = write_prompts_and_classes(tmp_path / PROMPTS_FILE, {"a": "dog", "b": "teddy bear"}, ["a {0} {1} x"],
                                     ["a {0} {1} y", "a red {0} {1}"])  # fmt: skip
    assert parse_prompts_and_classes(path.read_text()) == (
        {"a": "dog", "b": "teddy bear"},
        ["a {0} {1} x"],
        ["a {0} {1} y", "a red {0} {1}"],
    )


def test_world_export_is_a_dreambooth_dataset(tmp_path):
    from ether_diffusion.world.attributes import BACKGROUND_NAMES, COLOUR_NAMES, TEXTURES
    from ether_diffusion.world.scene import parse_prompt
    from ether_diffusion.world.subjects import load_subjects

    folder = export_world_dataset(tmp_path / "world")
    data = load_subject_dataset(folder)
    shipped = load_subjects()
    assert [(s.name, s.class_noun, s.live) for s in data.subjects] == [(s.name, s.class_noun, False) for s in shipped]
    for subject, source in zip(data.subjects, shipped):
        assert [p.read_bytes() for p in subject.image_paths] == [p.read_bytes() for p in source.image_paths]
        prompts = data.prompts(subject)
        assert len(prompts) == 25 == len(WORLD_TEMPLATES)
        own = source.attributes
        for prompt in prompts:  # every template asks for the subject in a context that differs from its own look
            assert prompt.text.count("sks") == 1 and "sks" not in prompt.class_text
            parsed = parse_prompt(prompt.class_text)
            (subject_object,) = [o for o in parsed.objects if o.shape == own["shape"]]
            assert subject_object.colour in (None, *COLOUR_NAMES) and subject_object.colour != own["colour"]
            assert subject_object.texture in (None, *TEXTURES) and subject_object.texture != own["texture"]
            assert parsed.background in (None, *BACKGROUND_NAMES) and parsed.background != own["colour"]
    with pytest.raises(DatasetError, match="not empty; pass --overwrite"):
        export_world_dataset(folder)
    export_world_dataset(folder, overwrite=True)
    assert load_subject_dataset(folder).fingerprint() == data.fingerprint()


# --- DINO / CLIP on tiny random-weight models -------------------------------------------------------------------


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory):
    return build_metric_models(tmp_path_factory.mktemp("metric-models"))


def test_dino_and_clip_embeddings_have_the_models_shapes(metric_models):
    dino_dir, clip_dir = metric_models
    images = [_image(i) for i in range(3)]
    dino = DinoEncoder(str(dino_dir)).embed(images)
    clip = ClipEncoder(str(clip_dir))
    image_features, text_features = clip.embed_images(images), clip.embed_texts(["a dog", "a dog in the snow"])
    assert dino.shape == (3, 32) and image_features.shape == (3, 16) and text_features.shape == (2, 16)
    for features in (dino, image_features, text_features):
        torch.testing.assert_close(features.norm(dim=-1), torch.ones(len(features)), atol=1e-5, rtol=0)
    long = " ".join(["word"] * 50)  # longer than the model's 16 positions: truncated, not an error
    assert clip.embed_texts([long]).shape == (1, 16)


def test_clip_preprocessing_matches_transformers_own_processor():
    """Our PIL/numpy transform (short side, centre crop, CLIP normalisation) is CLIP's: the same pixels as
    transformers' CLIPImageProcessor, without torchvision."""
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    images = [_image(1, (40, 48)), _image(2, (64, 64)), _image(3, (50, 31))]
    theirs = torch.as_tensor(np.asarray(processor(images=images, return_tensors="np")["pixel_values"]))
    torch.testing.assert_close(preprocess(images, 32, CLIP_MEAN, CLIP_STD), theirs, atol=2e-6, rtol=0)


def test_identical_images_score_one_and_clip_t_reads_the_text_given(metric_models):
    dino_dir, clip_dir = metric_models
    metrics = DinoClipMetrics(str(dino_dir), str(clip_dir))
    same = _image(7)
    scores = metrics.score([same, same.copy()], ["a dog", "a dog"], [same])
    assert set(scores) == {"dino", "clip_i", "clip_t"}
    assert scores["dino"] == pytest.approx(1.0, abs=1e-6) and scores["clip_i"] == pytest.approx(1.0, abs=1e-6)
    ceiling = metrics.real_ceiling([same, same.copy()])
    assert ceiling == pytest.approx({"dino": 1.0, "clip_i": 1.0}, abs=1e-6)
    other = metrics.score([_image(8)], ["a dog"], [same])
    assert other["dino"] < 0.999 and other["clip_i"] < 0.999
    # CLIP-T: the cosine of each image with its own text, computed here by hand from the two encoders
    images, texts = [_image(8), _image(9)], ["a dog in the jungle", "a red dog"]
    expected = (metrics.clip.embed_images(images) * metrics.clip.embed_texts(texts)).sum(-1).mean()
    assert metrics.score(images, texts, [same])["clip_t"] == pytest.approx(float(expected), abs=1e-6)
    swapped = metrics.score(images, texts[::-1], [same])["clip_t"]
    assert swapped != pytest.approx(float(expected), abs=1e-6)  # the text matters
    assert metrics.identity() == {"metrics": "dino-clip", "dino_model": str(dino_dir), "clip_model": str(clip_dir)}
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        metrics.score(images, texts[:1], [same])


def test_an_unloadable_metric_model_names_the_flag(tmp_path):
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(MetricModelError, match="DINO model.*--dino_model a local folder.*--metrics world"):
        DinoEncoder(str(tmp_path / "not-a-model"))
    with pytest.raises(MetricModelError, match="CLIP model.*--clip_model"):
        ClipEncoder(str(tmp_path / "not-a-model"))


# --- segmentation -----------------------------------------------------------------------------------------------


def test_segmentation_scores_by_hand():
    reference = np.array([[[0, 0, 1, 1], [0, 2, 2, 255]]])
    predicted = np.array([[[0, 1, 1, 1], [0, 2, 0, 3]]])
    # valid pixels: 7; class 0: I 2 / U 4; class 1: I 2 / U 3; class 2: I 1 / U 2; class 3 only in the ignored pixel
    scores = segmentation_scores(predicted, reference)
    assert scores["miou"] == pytest.approx((2 / 4 + 2 / 3 + 1 / 2) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(5 / 7)
    assert segmentation_scores(reference, reference) == {"miou": 1.0, "pixel_accuracy": 1.0}
    with pytest.raises(ValueError, match="shapes differ"):
        segmentation_scores(predicted[:, :1], reference)


def test_transformers_segmenter_on_a_tiny_segformer(tmp_path):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(0)
    config = SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                             num_attention_heads=[1, 1], patch_sizes=[3, 3], strides=[2, 2], mlp_ratios=[2, 2],
                             decoder_hidden_size=16, num_labels=5)  # fmt: skip
    SegformerForSemanticSegmentation(config).save_pretrained(tmp_path / "seg")
    (tmp_path / "seg" / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 32, "width": 32}}))
    segmenter = TransformersSegmenter(str(tmp_path / "seg"))
    assert segmenter.size == 32 and segmenter.identity() == {"segmenter": str(tmp_path / "seg")}
    masks = segmenter.segment([_image(1), _image(2)], (20, 24))
    assert masks.shape == (2, 20, 24) and masks.dtype == np.int64 and 0 <= masks.min() <= masks.max() < 5
    np.testing.assert_array_equal(segmenter.segment([_image(1), _image(2)], (20, 24)), masks)


# --- the run folder and the table -------------------------------------------------------------------------------


def test_run_store_refuses_other_settings_and_collects_finished_runs(tmp_path):
    store = RunStore(tmp_path, "dreambooth", {"max_train_steps": 600, "metrics": "world"}).open()
    RunStore(tmp_path, "dreambooth", {"max_train_steps": 600, "metrics": "world"}).open()  # same settings: resume
    with pytest.raises(BenchMismatchError, match="max_train_steps: 600 there, 1400 now"):
        RunStore(tmp_path, "dreambooth", {"max_train_steps": 1400, "metrics": "world"}).open()
    with pytest.raises(BenchMismatchError, match="holds a dreambooth benchmark, not a control one"):
        RunStore(tmp_path, "control", {"max_train_steps": 600, "metrics": "world"}).open()
    # a setting the library gained after the folder was made: its runs had the default, so they resume
    grown = {"max_train_steps": 600, "metrics": "world", "cache_latents": False}
    RunStore(tmp_path, "dreambooth", grown, defaults={"cache_latents": False}).open()
    with pytest.raises(BenchMismatchError, match="cache_latents: False there, True now"):
        RunStore(tmp_path, "dreambooth", {**grown, "cache_latents": True}, defaults={"cache_latents": False}).open()
    run = store.run_dir("dog", "ether-x1-seed0")
    (run / "train" / "checkpoint-5").mkdir(parents=True)
    assert store.finished(run) is None
    (run / SCORES).write_text("{ half a fi")  # damaged: not finished
    assert store.finished(run) is None and store.collect() == []
    store.finish(run, dict(subject="dog", method="ether", label="ETHER", lr=6e-3, lr_scale=1.0, seed=0, parameters=7,
                           diverged=False, metrics={"dino": 0.5}))  # fmt: skip
    assert store.finished(run)["metrics"] == {"dino": 0.5}
    assert not (run / "train" / "checkpoint-5").exists()  # checkpoints of finished runs go
    assert [r["run"] for r in store.collect()] == ["dog/ether-x1-seed0"]
    assert store.class_dir("stuffed animal").name == "stuffed_animal"


def test_summary_averages_seeds_within_a_subject_then_over_subjects():
    from ether_diffusion.bench.metrics import Metric

    def row(subject, seed, value, diverged=False, seconds=10.0):
        return dict(subject=subject, seed=seed, method="ether_plus", label="ETHER+", lr=6e-3, lr_scale=1.0,
                    parameters=17, diverged=diverged, metrics={} if diverged else {"dino": value},
                    train_seconds=seconds, timed=True)  # fmt: skip

    rows = [row("a", 0, 0.5), row("a", 1, 0.7), row("b", 0, 0.9, seconds=20.0), row("b", 1, None, diverged=True)]
    rows.append(dict(row("a", None, 0.4), method="base", label="base", lr=None, lr_scale=None))
    summary = summarise(rows, (Metric("dino", "DINO"),), ["base", "ether_plus"], unit="subject")
    assert [s["method"] for s in summary] == ["base", "ether_plus"]
    ether = summary[1]
    assert (ether["runs"], ether["units"], ether["diverged"]) == (4, 2, 1)
    assert ether["metrics"]["dino"]["mean"] == pytest.approx((0.6 + 0.9) / 2)
    assert ether["metrics"]["dino"]["sd"] == pytest.approx(math.sqrt(2) * 0.15)  # stdev of 0.6 and 0.9
    assert ether["train_seconds"] == pytest.approx(40 / 3)
    assert summary[0]["metrics"]["dino"] == {"mean": 0.4, "sd": 0.0, "n": 1}


def test_write_json_is_atomic(tmp_path):
    path = write_json(tmp_path / "a.json", {"x": 1})
    circular = {}
    circular["self"] = circular
    with pytest.raises(ValueError, match="Circular"):
        write_json(path, circular)
    assert json.loads(path.read_text()) == {"x": 1}  # the failed write left the good file
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


# --- configurations ---------------------------------------------------------------------------------------------


def test_dreambooth_bench_flags_defaults_and_per_run_configs(tmp_path):
    from ether_diffusion.bench.config import DREAMBOOTH_METHODS
    from ether_diffusion.bench.dataset import BenchSubject
    from ether_diffusion.bench.dreambooth import DreamBoothBenchConfig

    tiny = DreamBoothBenchConfig.from_args(["--dataset", str(tmp_path)])
    assert (tiny.max_train_steps, tiny.num_class_images, tiny.inference_steps, tiny.guidance_scale,
            tiny.images_per_prompt, tiny.metrics) == (600, 50, 25, 5.0, 2, "world")  # fmt: skip
    assert tiny.methods == ["ether", "ether_plus", "lora", "oft"] and tiny.seeds == [0] and tiny.lr_scales == [1.0]
    real = DreamBoothBenchConfig.from_args(["--dataset", str(tmp_path), "--model", "some/sd-1.5", "--n_blocks", "4",
                                            "--gradient_checkpointing", "--method_learning_rates", "lora=1e-4",
                                            "--lr_scales", "0.1", "1", "--seeds", "0", "3"])  # fmt: skip
    assert (real.max_train_steps, real.num_class_images, real.inference_steps, real.guidance_scale,
            real.images_per_prompt, real.metrics) == (1400, 200, 50, 7.5, 4, "dino-clip")  # the paper's  # fmt: skip
    assert len(real.grid()) == 4 * 2 * 2 and real.grid()[0] == ("ether", 0.1, 0)
    subject = BenchSubject("dog", "dog", True, tmp_path / "dog", ())
    run = real.run_config(subject, "lora", 0.1, 3, tmp_path / "run", tmp_path / "class")
    assert (run.learning_rate, run.seed, run.n_blocks, run.gradient_checkpointing) == (
        pytest.approx(1e-5), 3, 4, True)  # fmt: skip
    assert DREAMBOOTH_METHODS["lora"].make_adapters(run).kind == "lora"  # the run trains the PEFT peer
    assert (run.instance_prompt, run.class_prompt, run.with_prior_preservation) == ("a sks dog", "a dog", True)
    assert run.output_dir == str(tmp_path / "run" / "train") and run.resume_from_checkpoint is None
    ether = real.run_config(subject, "ether", 1.0, 0, tmp_path / "run")
    assert (ether.ether_method, ether.learning_rate) == ("ether", 6e-3)
    assert DREAMBOOTH_METHODS["ether"].make_adapters(ether) is None  # ETHER: the task's own adapters
    quick = DreamBoothBenchConfig.from_args(["--dataset", str(tmp_path), "--quick"])
    assert (quick.max_train_steps, quick.num_prompts, quick.inference_steps) == (2, 2, 2)
    assert "max_train_steps" in real.settings() and "learning_rate" not in real.settings()
    # the shipped model is named, not located: a folder made in one checkout resumes from another
    assert tiny.settings()["pretrained_model_name_or_path"] == "the shipped tiny model"
    assert real.settings()["pretrained_model_name_or_path"] == "some/sd-1.5"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--learning_rate", "1"], "unrecognized arguments: --learning_rate"),  # set per method by the benchmark
        (["--instance_data_dir", "x"], "unrecognized arguments"),
        (["--methods", "ether", "dora"], "--methods: unknown dora"),
        (["--seeds", "0", "0"], "--seeds must be distinct"),
        (["--lr_scales", "0"], "--lr_scales must be positive"),
        (["--method_learning_rates", "lora:1e-4"], "is not method=rate"),
        (["--identifier", "two words"], "--identifier must be one word"),
        (["--n_blocks", "0"], "--n_blocks must be at least 1"),
        (["--eval_steps", "600"], "--eval_steps 600: [600] not whole steps before the last one (600)"),
        (["--eval_steps", "100", "-5"], "[-5] not whole steps before the last one"),
        (["--eval_steps", "0"], "[0] not whole steps"),
        (["--eval_steps", "100", "200", "100"], "--eval_steps 100 200 100: a step is given twice"),
        (["--quick", "--eval_steps", "2"], "before --max_train_steps (2); the last step is always evaluated"),
        (["--eval_steps", "1.5"], "invalid int value"),
    ],
)
def test_dreambooth_bench_bad_flags_are_usage_errors(tmp_path, capsys, flags, message):
    from ether_diffusion.bench.dreambooth import DreamBoothBenchConfig

    with pytest.raises(SystemExit):
        DreamBoothBenchConfig.from_args(["--dataset", str(tmp_path), *flags])
    assert message in capsys.readouterr().err


def test_control_bench_flags(tmp_path, capsys):
    from ether_diffusion.bench.config import CONTROL_METHODS
    from ether_diffusion.bench.control import ControlBenchConfig

    args = ["--train_data_dir", str(tmp_path), "--eval_data_dir", str(tmp_path)]
    tiny = ControlBenchConfig.from_args(args + ["--lr_scales", "0.1", "1"])
    assert (tiny.segmenter, tiny.max_train_steps, tiny.train_batch_size, tiny.scheduler) == ("world", 600, 8, "dpm")
    assert [(m, s) for m, s, _ in tiny.grid()][:3] == [("encoder", 0.1), ("ether", 0.1), ("ether", 1.0)]
    assert tiny.run_name("encoder", 0.1, 0) == "encoder-seed0"  # no adapter rate: one run per seed
    encoder = tiny.run_config("encoder", 1.0, 0, tmp_path / "r")
    assert encoder.no_adapters and encoder.encoder_learning_rate == 1e-4
    oft = tiny.run_config("oft", 0.1, 2, tmp_path / "r")
    assert (oft.learning_rate, oft.seed, oft.target_modules) == (pytest.approx(1e-6), 2, ("unet-attention-ff",))
    assert CONTROL_METHODS["oft"].make_adapters(oft).kind == "oft"
    with pytest.raises(SystemExit):
        ControlBenchConfig.from_args(args + ["--model", "some/sd-1.5"])
    assert "--segmenter is needed on a real model" in capsys.readouterr().err
    real = ControlBenchConfig.from_args(args + ["--model", "some/sd-1.5", "--segmenter", "seg"])
    assert (real.max_train_steps, real.num_train_epochs, real.train_batch_size, real.guidance_scale) == (
        None, 20, 10, 9.0)  # fmt: skip


def test_control_eval_rows_need_masks_on_all_rows_or_none(tmp_path):
    from ether_diffusion.bench.control import ControlBenchConfig, read_eval_rows, read_mask
    from ether_diffusion.control.data import ControlDataError

    folder = tmp_path / "eval"
    folder.mkdir()
    lines = []
    for i in range(3):
        _image(i, (8, 8)).save(folder / f"i{i}.png")
        _image(i + 5, (8, 8)).save(folder / f"c{i}.png")
        Image.fromarray(np.full((8, 8), i, np.uint8)).save(folder / f"m{i}.png")
        lines.append({"image": f"i{i}.png", "conditioning_image": f"c{i}.png", "text": f"t{i}", "mask": f"m{i}.png"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    config = ControlBenchConfig.from_args(["--train_data_dir", str(folder), "--eval_data_dir", str(folder)])
    rows = read_eval_rows(config)
    assert [r.caption for r in rows] == ["t0", "t1", "t2"] and rows[2].mask == folder / "m2.png"
    assert (read_mask(rows[2].mask) == 2).all()
    config.num_eval = 2
    assert len(read_eval_rows(config)) == 2
    del lines[1]["mask"]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    with pytest.raises(ControlDataError, match="1 of 2 evaluation rows have a 'mask'"):
        read_eval_rows(config)
    with pytest.raises(ControlDataError, match="single-channel image of class ids"):
        read_mask(folder / "i0.png")


# --- points along a run: adapter snapshots and trade-off curves -------------------------------------------------


def _train(world, output_dir, snapshots=None, callbacks=(), **changes):
    from ether_diffusion.bench.runs import AdapterSnapshots
    from ether_diffusion.registry import task_for
    from ether_diffusion.training.trainer import Trainer

    fields = dict(max_train_steps=3, checkpointing_steps=100, no_final_reload=True, learning_rate=1e-2)
    task = task_for(dreambooth_config(world, output_dir, **{**fields, **changes}))
    saver = [AdapterSnapshots(task, snapshots)] if snapshots else []
    return Trainer(task, [*saver, *callbacks]).train()


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_same_adapter(a, b):
    a, b = _tensors(a), _tensors(b)
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_snapshots_are_the_adapter_of_a_run_that_many_steps_long_and_a_resume_writes_the_rest(training_world,
                                                                                               tmp_path):  # fmt: skip
    from safetensors import safe_open

    from ether_diffusion.bench.runs import SnapshotMissing
    from ether_diffusion.training import Callback

    snapshots = {1: tmp_path / "snap" / "step-1" / "a.safetensors", 2: tmp_path / "snap" / "step-2" / "a.safetensors"}
    full = _train(training_world, tmp_path / "full", snapshots)
    assert all(p.is_file() for p in snapshots.values())
    with safe_open(str(snapshots[2]), framework="pt") as handle:
        assert handle.metadata()["steps"] == "2" and handle.metadata()["instance_prompt"] == "a sks star"
    # the loop is deterministic on the CPU: a run of 2 steps (constant schedule) ends where the 3-step run was at 2
    _assert_same_adapter(snapshots[2], _train(training_world, tmp_path / "two", max_train_steps=2).adapter_path)
    # and saving snapshots changes nothing about the training
    _assert_same_adapter(full.adapter_path, _train(training_world, tmp_path / "plain").adapter_path)
    first = _tensors(snapshots[1])
    assert any(not torch.equal(first[k], v) for k, v in _tensors(snapshots[2]).items())  # the points differ

    class StopAfterFirstStep(Callback):
        def on_step(self, step, logs):
            self.step = step

        def should_stop(self):
            return getattr(self, "step", 0) >= 1

    # interrupted after step 1 (checkpoint 1): the snapshot of step 1 is there, the one of step 2 not yet
    resumed = {s: tmp_path / "resumed" / f"step-{s}.safetensors" for s in (1, 2)}
    stopped = _train(training_world, tmp_path / "run", resumed, [StopAfterFirstStep()], checkpointing_steps=1)
    assert stopped.stopped_early and resumed[1].is_file() and not resumed[2].exists()
    written = resumed[1].stat().st_mtime_ns
    again = _train(training_world, tmp_path / "run", resumed, checkpointing_steps=1, resume_from_checkpoint="latest")
    assert again.global_step == 3 and resumed[1].stat().st_mtime_ns == written  # step 1 was not trained again
    for step in (1, 2):
        _assert_same_adapter(resumed[step], snapshots[step])
    _assert_same_adapter(again.adapter_path, full.adapter_path)
    # a snapshot before the checkpoint a run resumes from cannot be made again: said before any step
    resumed[1].unlink()
    with pytest.raises(SnapshotMissing, match=r"from step 3, past the adapter snapshot\(s\) of step\(s\) \[1\]"):
        _train(training_world, tmp_path / "run", resumed, checkpointing_steps=1, resume_from_checkpoint="latest")
    with pytest.raises(ValueError, match=r"snapshot steps \[3\] are not before the run's last step"):
        _train(training_world, tmp_path / "late", {3: tmp_path / "late.safetensors"})


def test_eval_steps_are_sorted_recorded_and_old_folders_resume(tmp_path):
    from ether_diffusion.bench.dreambooth import DreamBoothBenchConfig

    config = DreamBoothBenchConfig.from_args(["--dataset", str(tmp_path), "--eval_steps", "300", "100"])
    assert config.eval_steps == [100, 300] and config.settings()["eval_steps"] == [100, 300]
    plain = DreamBoothBenchConfig.from_args(["--dataset", str(tmp_path)])
    assert plain.eval_steps is None and DreamBoothBenchConfig(dataset=str(tmp_path), eval_steps=[]).validate(
        ).eval_steps is None  # fmt: skip
    # a folder made before the flag existed has no eval_steps in its record: it resumes without the flag
    old = {k: v for k, v in plain.settings().items() if k != "eval_steps"}
    RunStore(tmp_path / "bench", "dreambooth", old).open()
    RunStore(tmp_path / "bench", "dreambooth", plain.settings(), defaults=plain.defaults()).open()
    with pytest.raises(BenchMismatchError, match=r"eval_steps: None there, \[100, 300\] now"):
        RunStore(tmp_path / "bench", "dreambooth", config.settings(), defaults=config.defaults()).open()


def test_both_metric_backends_declare_their_trade_off_axes():
    from ether_diffusion.bench.metrics import SubjectMetrics, WorldMetrics

    for backend in (DinoClipMetrics, WorldMetrics):
        keys = [m.key for m in backend.metrics]
        assert backend.subject_metric in keys and backend.prompt_metric in keys
    assert (DinoClipMetrics.subject_metric, DinoClipMetrics.prompt_metric) == ("dino", "clip_t")
    assert SubjectMetrics.subject_metric is None  # a backend without the pair gets no trade-off plot


def _record(subject, seed, method, scale, curve, label=None):
    last = curve[-1]
    return dict(subject=subject, seed=seed, method=method, label=label or method, lr=1e-3 * scale, lr_scale=scale,
                parameters=10, diverged=False, metrics=last["metrics"], curve=curve)  # fmt: skip


def test_curve_points_average_seeds_then_subjects_and_are_written_as_plot_and_table(tmp_path):
    from ether_diffusion.bench.metrics import Metric
    from ether_diffusion.bench.report import curve_summary, write_curves

    metrics = (Metric("sf", "subject fidelity"), Metric("pf", "prompt fidelity"))

    def curve(a, b):  # subject fidelity rises, prompt fidelity falls along the run
        return [{"step": 1, "metrics": {"sf": a, "pf": 1 - a}}, {"step": 4, "metrics": {"sf": b, "pf": 1 - b}}]

    rows = [
        _record("star", 0, "ether", 1.0, curve(0.5, 0.7)),
        _record("star", 1, "ether", 1.0, curve(0.7, 0.9)),
        _record("heart", 0, "ether", 1.0, curve(0.8, 0.9)),
        _record("star", 0, "lora", 1.0, curve(0.4, 0.6)),
        _record("star", 0, "ether", 10.0, curve(0.9, 0.95)),
        dict(_record("heart", 1, "ether", 1.0, curve(0.0, 0.0)), diverged=True, metrics={}, curve=None),
    ]
    rows.append(dict(subject="star", seed=None, method="base", label="base", lr=None, lr_scale=None, parameters=0,
                     diverged=False, metrics={"sf": 0.3, "pf": 0.95}))  # fmt: skip
    # a run without a curve (made without --eval_steps) is one point at the last step
    rows.append({k: v for k, v in _record("heart", 0, "lora", 1.0, curve(0.2, 0.5)).items() if k != "curve"})
    points = curve_summary(rows, metrics, ["base", "ether", "lora"], "subject", last_step=4)
    assert [(p["method"], p["lr_scale"], p["step"], p["units"]) for p in points] == [
        ("ether", 1.0, 1, 2), ("ether", 1.0, 4, 2), ("ether", 10.0, 1, 1), ("ether", 10.0, 4, 1),
        ("lora", 1.0, 1, 1), ("lora", 1.0, 4, 2)]  # fmt: skip
    ether_1 = points[0]["metrics"]["sf"]  # star: mean of its seeds (0.5, 0.7) = 0.6; heart 0.8
    assert ether_1["mean"] == pytest.approx(0.7) and ether_1["sd"] == pytest.approx(math.sqrt(0.02))
    assert points[1]["metrics"]["pf"]["mean"] == pytest.approx(1 - (0.8 + 0.9) / 2)
    assert points[5]["metrics"]["sf"]["mean"] == pytest.approx((0.6 + 0.5) / 2)

    result = dict(command="ether-diffusion bench dreambooth --eval_steps 1", machine="m", date="d", about=[],
                  summary=summarise(rows, metrics, ["base", "ether", "lora"], unit="subject"), curves=points,
                  references=[dict(kind="ceiling", label="real images (to each other)", runs=2,
                                   metrics={"sf": {"mean": 0.99, "sd": 0.0, "n": 2}})],
                  tradeoff=dict(x="sf", y="pf", x_label="subject fidelity", y_label="prompt fidelity",
                                figure="t.png", table="t.md"))  # fmt: skip
    write_curves(tmp_path, "t", result, metrics, "DreamBooth benchmark: test", "subjects")
    table = (tmp_path / "t.md").read_text()
    assert "| method | lr (× paper) | step | runs | subject fidelity ↑ | prompt fidelity ↑ |" in table
    assert "| ether | 1e-03 (×1) | 1 | 3 | 0.700 ± 0.141 | 0.300 ± 0.141 |" in table  # 3 runs, 2 subjects
    assert "| base | — | — | 1 | 0.300 | 0.950 |" in table
    assert "| real images (to each other) | — | — | 2 | 0.990 ± 0.000 | — |" in table
    image = Image.open(tmp_path / "t.png")
    assert image.size[0] > 600 and image.size[1] > 400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.md", "t.png"]  # written atomically, nothing else left


# --- the ablation knobs through the benchmark's flags ----------------------------------------------------------


def test_ablation_presets_split_the_attention_as_named_for_ether_and_the_peers(tiny_unet):
    import copy

    import peft

    from ether_diffusion.config import EtherConfig
    from ether_diffusion.inject import find_targets

    def adapted(preset):
        return sorted(t.path for t in find_targets(tiny_unet, EtherConfig(target_modules=preset)))

    every = adapted("unet-attention")
    self_attention, q_out, kv = (adapted(p) for p in ("unet-self-attention", "unet-cross-attention-q-out",
                                                      "unet-cross-attention-kv"))  # fmt: skip
    assert self_attention and q_out and kv
    assert sorted(self_attention + q_out + kv) == every  # a partition of the paper's targets
    assert all(".attn1." in p for p in self_attention)
    assert {p.rpartition(".attn2.")[2] for p in q_out} == {"to_q", "to_out.0"}
    assert {p.rpartition(".attn2.")[2] for p in kv} == {"to_k", "to_v"}
    assert adapted("unet-attention-image") == sorted(self_attention + q_out)  # all but the text-reading k/v
    # keys and values of cross-attention read the text tokens: their input width is the text encoder's
    widths = {t.widths[0] for t in find_targets(tiny_unet, EtherConfig(target_modules="unet-cross-attention-kv"))}
    assert widths == {tiny_unet.config.cross_attention_dim}
    # a PEFT peer given the same suffixes (as the benchmark gives them) adapts the same modules
    unet = copy.deepcopy(tiny_unet)
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=4, target_modules=list(
        EtherConfig(target_modules="unet-cross-attention-kv").target_suffixes)), unet)  # fmt: skip
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert sorted(n for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)) == kv


def test_issue_17_ablation_knobs_are_benchmark_flags_that_reach_every_run(tmp_path):
    from ether_diffusion.bench.dataset import BenchSubject
    from ether_diffusion.bench.dreambooth import DreamBoothBenchConfig

    config = DreamBoothBenchConfig.from_args(
        ["--dataset", str(tmp_path), "--target_modules", "unet-cross-attention-kv", "--ether_sides", "input",
         "--n_blocks", "4", "--prior_loss_weight", "0.5", "--num_class_images", "20", "--lr_scheduler", "cosine",
         "--max_train_steps", "300", "--eval_steps", "100", "200"])  # fmt: skip
    subject = BenchSubject("dog", "dog", True, tmp_path / "dog", ())
    for method in ("ether", "ether_plus", "lora"):
        run = config.run_config(subject, method, 1.0, 2, tmp_path / "run", tmp_path / "class")
        assert (run.target_modules, run.ether_sides, run.n_blocks, run.prior_loss_weight, run.num_class_images,
                run.lr_scheduler, run.max_train_steps) == (("unet-cross-attention-kv",), "input", 4, 0.5, 20,
                                                           "cosine", 300)  # fmt: skip
        assert run.adapter_config().target_suffixes == ("attn2.to_k", "attn2.to_v")
    settings = config.settings()  # each arm of an ablation is a benchmark of its own (its own --output_dir)
    assert (settings["target_modules"], settings["ether_sides"], settings["lr_scheduler"]) == (
        ("unet-cross-attention-kv",), "input", "cosine")  # fmt: skip
    assert DreamBoothBenchConfig.from_args(["--dataset", str(tmp_path), "--no_prior_preservation"]).run_config(
        subject, "ether", 1.0, 0, tmp_path / "run").with_prior_preservation is False  # fmt: skip


def test_training_defaults_to_the_image_attention_and_the_benchmark_keeps_the_papers_targets(tmp_path):
    """The default chosen by the ablations: DreamBooth training adapts unet-attention-image (no cross-attention keys
    and values); the benchmark stays the paper's protocol (q/k/v/out of every attention) for every method unless told
    otherwise."""
    from pathlib import Path

    from ether_diffusion.bench.dataset import BenchSubject
    from ether_diffusion.bench.dreambooth import DreamBoothBenchConfig
    from ether_diffusion.config import TARGET_PRESETS
    from ether_diffusion.training.dreambooth import DreamBoothConfig

    trained = DreamBoothConfig(instance_data_dir=str(tmp_path), instance_prompt="a sks dog")
    assert trained.adapter_config().target_suffixes == TARGET_PRESETS["unet-attention-image"]
    assert not {"attn2.to_k", "attn2.to_v"} & set(trained.adapter_config().target_suffixes)
    config = DreamBoothBenchConfig.from_args(["--dataset", str(tmp_path)])
    subject = BenchSubject("dog", "dog", True, tmp_path / "dog", ())
    for method in ("ether", "ether_plus", "lora"):
        run = config.run_config(subject, method, 1.0, 0, tmp_path / "run", tmp_path / "class")
        assert run.target_modules == ("unet-attention",)
    # the SD-1.5 sizes docs/dreambooth.md gives for the default (the UNet built on the meta device)
    from diffusers import UNet2DConditionModel

    from ether_diffusion import count_parameters, delete_adapter, inject
    from ether_diffusion.architectures import SD15_UNET
    from ether_diffusion.config import EtherConfig

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    docs = (Path(__file__).resolve().parents[1] / "docs" / "dreambooth.md").read_text()
    for method in ("ether", "ether_plus"):
        inject(unet, EtherConfig(method=method, target_modules="unet-attention-image"), "size")
        assert f"{count_parameters(unet, 'size'):,}" in docs
        delete_adapter(unet, "size")


def test_ablation_table_pairs_arms_with_lora_and_checks_the_goal(tmp_path):
    """bench ablation-table: a subject's value is its seeds' mean, Δ is paired over the subjects both
    folders have, the goal is subject ≥ LoRA + 0.02 and prompt ≥ LoRA − 0.01; snapshots are points of their own."""
    from ether_diffusion.bench import ablation
    from ether_diffusion.cli import main

    def run(folder, subject, name, method, seed, subject_fid, prompt_fid, curve=None):
        path = tmp_path / folder / "runs" / subject / name / "scores.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        metrics = {"subject_fidelity": subject_fid, "prompt_fidelity": prompt_fid}
        path.write_text(json.dumps({"method": method, "lr_scale": 1.0, "seed": seed, "steps": 600, "metrics": metrics,
                                    "curve": curve}))  # fmt: skip

    for subject, (s, p) in {"a": (0.80, 0.90), "b": (0.90, 0.94)}.items():
        run("ref", subject, "lora-x1-seed0", "lora", 0, s, p)
    # arm: subject a over two seeds in two folders (pooled: mean 0.83 / 0.90), b one seed with a snapshot at step 200
    run("arm", "a", "ether-x1-seed0", "ether", 0, 0.82, 0.91)
    run("arm_s1", "a", "ether-x1-seed1", "ether", 1, 0.84, 0.89)
    curve = [{"step": 200, "metrics": {"subject_fidelity": 0.85, "prompt_fidelity": 0.95}},
             {"step": 600, "metrics": {"subject_fidelity": 0.92, "prompt_fidelity": 0.94}}]  # fmt: skip
    run("arm", "b", "ether-x1-seed0", "ether", 0, 0.92, 0.94, curve)
    base = tmp_path / "arm" / "runs" / "a" / "base" / "scores.json"
    base.parent.mkdir(parents=True)
    base.write_text(json.dumps({"metrics": {"subject_fidelity": 0.7, "prompt_fidelity": 0.95}}))

    rows, bases, lora, lora_runs = ablation.build(
        [("arm", [tmp_path / "arm", tmp_path / "arm_s1"])], [tmp_path / "ref"]
    )
    assert lora_runs == 2 and bases == {"a": (0.7, 0.95)}
    by_step = {r["step"]: r for r in rows}
    assert by_step[200]["subjects"] == {"b": (0.85, 0.95)}
    assert by_step[600]["subjects"]["a"] == pytest.approx((0.83, 0.90))
    text = ablation.table(rows, bases, lora, lora_runs)
    last = next(line for line in text.splitlines() if line.startswith("| arm | ether | 1.0 | 600 |"))
    # Δ subject = mean(0.83 − 0.80, 0.92 − 0.90) = +0.025, Δ prompt = mean(0.90 − 0.90, 0.94 − 0.94) = 0: the goal
    assert "| +0.025 | +0.000 | yes |" in last, last
    early = next(line for line in text.splitlines() if line.startswith("| arm | ether | 1.0 | 200 |"))
    assert "| -0.050 | +0.010 | no |" in early, early  # subject b only: 0.85 − 0.90
    # the command line: an arm's folders comma-separated, the same pooled rows
    out = tmp_path / "table"
    assert main(["bench", "ablation-table", "--arm", f"arm={tmp_path / 'arm'},{tmp_path / 'arm_s1'}", "--reference",
                 str(tmp_path / "ref"), "--output", str(out)]) == 0  # fmt: skip
    assert last in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 0
    with pytest.raises(SystemExit):  # a folder that is no bench dreambooth output: the message says what to give
        ablation.parse_args(["--arm", f"arm={tmp_path / 'nowhere'}", "--output", str(out)])
