"""The procedural world: determinism, captions that match the pixels, masks, edges, held-out splits, tokenizer,
subjects; pretraining checkpoints."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torch import nn

from ether_diffusion.checkpoints import COMPLETE_MARKER
from ether_diffusion.world import (
    BACKGROUND_NAMES,
    COLOUR_NAMES,
    SHAPES,
    caption,
    edge_map,
    parse_prompt,
    render,
    scene_for_seed,
)
from ether_diffusion.world.attributes import BACKGROUNDS, COLOURS, world_words
from ether_diffusion.world.checkpoints import (
    STATE_FILE,
    TENSORS_FILE,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from ether_diffusion.world.dataset import WorldDataset, caption_variants, render_arrays
from ether_diffusion.world.heldout import HELD_OUT_PAIRS, HELD_OUT_TRIPLES, SUBJECT_SPECS
from ether_diffusion.world.pretrain import ExponentialMovingAverage
from ether_diffusion.world.scene import PRETRAIN_DROPOUT, Scene, WorldObject
from ether_diffusion.world.subjects import load_subjects, write_subject
from ether_diffusion.world.tokenizer import encode_world_caption, load_tokenizer, save_tokenizer_files


def test_rendering_is_deterministic_per_seed_and_differs_between_seeds():
    a, b = render(scene_for_seed(17)), render(scene_for_seed(17))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert scene_for_seed(17) == scene_for_seed(17)
    assert not np.array_equal(render(scene_for_seed(18)).image, a.image)
    assert a.image.shape == (64, 64, 3) and a.image.dtype == np.uint8


def test_rendering_matches_pinned_scene():
    # A fixed scene's pixels are pinned: a change of the renderer must be deliberate (and retrain the assets).
    scene = Scene("blue", (WorldObject("square", "red", "solid", "large", "center", 32.0, 32.0),))
    out = render(scene)
    np.testing.assert_array_equal(out.image[32, 32], COLOURS["red"])
    np.testing.assert_array_equal(out.image[2, 2], BACKGROUNDS["blue"])
    assert out.mask.sum() == (1 + SHAPES.index("square")) * int((out.mask > 0).sum())
    assert 23 * 23 <= (out.mask > 0).sum() <= 26 * 26  # a 28 px box, the square drawn at 0.88 of it


@pytest.mark.parametrize("seed", range(40))
def test_caption_parses_back_to_the_scene(seed):
    scene = scene_for_seed(seed)
    parsed = parse_prompt(caption(scene))
    assert parsed.background == scene.background
    assert [(o.shape, o.colour, o.texture, o.size, o.position) for o in parsed.objects] == [
        (o.shape, o.colour, o.texture, o.size, o.position) for o in scene.objects
    ]


def test_caption_dropout_keeps_the_shape_and_only_drops_words():
    rng = np.random.default_rng(0)
    lengths = []
    for seed in range(200):
        scene = scene_for_seed(seed)
        full, short = caption(scene), caption(scene, rng, PRETRAIN_DROPOUT)
        assert set(short.split()) <= set(full.split())
        assert all(o.shape in short for o in scene.objects)
        lengths.append(len(short.split()) < len(full.split()))
    assert 0.3 < np.mean(lengths) < 1.0


def test_mask_and_pixels_agree_with_the_scene():
    for seed in range(60):
        scene = scene_for_seed(seed, "all")
        out = render(scene)
        classes = set(np.unique(out.mask)) - {0}
        assert classes == {1 + SHAPES.index(o.shape) for o in scene.objects}
        # Background pixels far from objects have the background colour.
        far = np.ones((64, 64), dtype=bool)
        for o in scene.objects:
            far[max(int(o.cy) - 16, 0) : int(o.cy) + 17, max(int(o.cx) - 16, 0) : int(o.cx) + 17] = False
        if far.any():
            assert np.all(out.image[far] == BACKGROUNDS[scene.background])
        for o in scene.objects:
            cls = 1 + SHAPES.index(o.shape)
            ys, xs = np.mgrid[0:64, 0:64]
            near = (np.abs(xs - o.cx) < 16) & (np.abs(ys - o.cy) < 16)
            ys, xs = np.nonzero((out.mask == cls) & near)
            assert abs(xs.mean() - o.cx) < 4 and abs(ys.mean() - o.cy) < 4
            if o.texture == "solid":  # interior pixels have exactly the object colour
                inside = out.mask == cls  # eroded by a 5x5 window, near this object only
                for dy in range(-2, 3):
                    for dx in range(-2, 3):
                        inside &= np.roll(out.mask, (dy, dx), axis=(0, 1)) == cls
                inside &= near
                assert inside.any()
                assert np.all(out.image[inside] == COLOURS[o.colour])


def test_edges_follow_object_boundaries_and_not_flat_background():
    flat = np.full((64, 64, 3), 128, dtype=np.uint8)
    assert edge_map(flat).max() == 0
    scene = Scene("white", (WorldObject("circle", "black", "solid", "large", "center", 32.0, 32.0),))
    out = render(scene)
    boundary = (out.mask > 0) != (np.roll(out.mask, 1, axis=1) > 0)
    assert out.edges[np.roll(boundary, -1, axis=1) | boundary].mean() > 0.9
    assert out.edges[:10, :10].max() == 0


def test_pretraining_never_shows_held_out_combinations_and_heldout_split_only_does():
    for seed in range(1500):
        scene = scene_for_seed(seed, "pretrain")
        for o in scene.objects:
            assert (o.shape, o.colour, scene.background) not in HELD_OUT_TRIPLES
            assert (o.colour, o.texture) not in HELD_OUT_PAIRS
            assert o.colour != scene.background
    seen = set()
    for seed in range(300):
        scene = scene_for_seed(seed, "heldout")
        (o,) = scene.objects
        assert (o.shape, o.colour, scene.background) in HELD_OUT_TRIPLES
        seen.add((o.shape, o.colour, scene.background))
    assert seen == set(HELD_OUT_TRIPLES)


def test_tokenizer_has_every_world_word_as_one_token_and_still_reads_new_words(tmp_path):
    tok = load_tokenizer(save_tokenizer_files(tmp_path))
    for word in world_words():
        assert len(tok.tokenize(word)) == 1, word
    pieces = tok.tokenize("sks")
    assert len(pieces) > 1 and tok.unk_token not in pieces
    vocab = tok.get_vocab()
    rng = np.random.default_rng(1)
    for seed in range(100):
        text = caption(scene_for_seed(seed), rng, PRETRAIN_DROPOUT)
        expected = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
        assert encode_world_caption(text, vocab) == expected


def test_shipped_tokenizer_is_the_world_tokenizer(tmp_path):
    tok = load_tokenizer("assets/tiny-sd/tokenizer")
    text = "a large red striped star at top left on a blue background"
    ids = tok(text, padding="max_length", max_length=tok.model_max_length).input_ids
    assert ids == encode_world_caption(text, tok.get_vocab())
    assert tok.model_max_length == 32
    # vocab.json + merges.txt alone (what transformers 4's slow tokenizer reads) give the same tokens.
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(Path("assets/tiny-sd/tokenizer") / name, tmp_path / name)
    from_bpe_files = load_tokenizer(tmp_path)
    for text in ("a sks star at center", "an orange checkered heart and a zebra"):
        assert from_bpe_files(text).input_ids == tok(text).input_ids


def test_bulk_rendering_matches_single_rendering_and_dataset():
    arrays = render_arrays(6, "all", start=100)
    for i in range(6):
        np.testing.assert_array_equal(arrays.images[i], render(scene_for_seed(100 + i, "all")).image)
    item = WorldDataset(6, "all", start=100)[2]
    assert item["pixel_values"].shape == (3, 64, 64) and -1 <= item["pixel_values"].min() <= 1
    np.testing.assert_array_equal(item["mask"].numpy(), arrays.masks[2])
    assert item["caption"] == caption(arrays.scenes[2])
    ids = caption_variants(arrays.scenes, load_tokenizer("assets/tiny-sd/tokenizer").get_vocab(), 3, seed=0)
    assert ids.shape == (6, 3, 32)


def test_shipped_subjects_are_complete_new_and_reproducible(tmp_path):
    subjects = load_subjects()
    assert len(subjects) >= 4
    for spec, subject in zip(SUBJECT_SPECS, subjects):
        assert 4 <= len(subject.image_paths) <= 6
        assert len(subject.eval_prompts) >= 10
        assert all("sks" in p and subject.class_noun in p for p in subject.eval_prompts)
        assert subject.class_prompt == f"a {subject.class_noun}" and "sks" in subject.instance_prompt
        assert (spec.colour, spec.texture) in HELD_OUT_PAIRS
        regenerated = write_subject(spec, tmp_path)
        for shipped in subject.image_paths:
            np.testing.assert_array_equal(
                np.asarray(Image.open(shipped)), np.asarray(Image.open(regenerated / shipped.name))
            )
        shipped_json = json.loads((subject.image_paths[0].parent / "subject.json").read_text())
        assert shipped_json == json.loads((regenerated / "subject.json").read_text())
        parsed = [parse_prompt(p) for p in subject.eval_prompts]
        assert any(p.background for p in parsed) and any(len(p.objects) == 2 for p in parsed)


def test_vocabularies_are_disjoint_where_they_must_be():
    assert not set(SHAPES) & set(COLOUR_NAMES)
    assert set(BACKGROUND_NAMES) - set(COLOUR_NAMES) == {"gray"}


def _assert_same_state(loaded, saved, path="state"):
    """Equal values of the same types all the way down: tensors bit for bit, tuples as tuples, int keys as ints (a
    state dict's OrderedDict comes back a dict in the same order)."""
    if isinstance(saved, dict):
        assert isinstance(loaded, dict), path
    else:
        assert type(loaded) is type(saved), (path, type(loaded), type(saved))
    if isinstance(saved, torch.Tensor):
        assert loaded.dtype == saved.dtype and torch.equal(loaded, saved.cpu()), path
    elif isinstance(saved, dict):
        assert list(loaded) == list(saved), path
        for key in saved:
            _assert_same_state(loaded[key], saved[key], f"{path}/{key}")
    elif isinstance(saved, (list, tuple)):
        assert len(loaded) == len(saved), path
        for i, (a, b) in enumerate(zip(loaded, saved)):
            _assert_same_state(a, b, f"{path}/{i}")
    else:
        assert loaded == saved, path


def test_a_pretraining_checkpoint_holds_no_pickle_and_loads_back_exactly(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.9))
    for _ in range(2):
        model(torch.randn(2, 4)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    ema = ExponentialMovingAverage(model, 0.9)
    generator = torch.Generator().manual_seed(3)
    torch.randn(2, generator=generator)
    state = {
        "phase": "diffusion",
        "step": 7,
        "scaling": 0.25,
        "args": {"seed": 0, "export_dir": None, "sizes": [1, 2]},
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),  # int keys, a tuple of betas, a tensor step
        "emas": [ema.state_dict()],
        "generator": generator.get_state(),
        "odd": {"$tensor": "not a reference", 2: (3, [4.5, None]), "empty": {}, "pair": ()},
    }
    folder = save_checkpoint(tmp_path, 7, state, total_limit=2)
    assert folder == tmp_path / "checkpoint-7"
    assert sorted(p.name for p in folder.iterdir()) == sorted([COMPLETE_MARKER, STATE_FILE, TENSORS_FILE])
    with safe_open(str(folder / TENSORS_FILE), framework="pt") as handle:  # every tensor in the safetensors file
        assert {"model/weight", "optimizer/state/0/exp_avg", "optimizer/state/1/step", "emas/0/shadow/1",
                "generator"} <= set(handle.keys())  # fmt: skip
    json.loads((folder / STATE_FILE).read_text())  # the rest is plain JSON
    loaded = load_checkpoint(folder)
    _assert_same_state(loaded, state)

    # the restored optimizer takes the same next step as the original
    twin = nn.Linear(4, 3)
    twin.load_state_dict(loaded["model"])
    twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-2, betas=(0.8, 0.9))
    twin_optimizer.load_state_dict(loaded["optimizer"])
    _assert_same_state(twin_optimizer.state_dict(), optimizer.state_dict())
    x = torch.randn(2, 4)
    for m, o in ((model, optimizer), (twin, twin_optimizer)):
        m(x).square().mean().backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)

    with pytest.raises(TypeError, match="'odd/x' is a object, which a checkpoint cannot hold without pickle"):
        save_checkpoint(tmp_path, 8, {"odd": {"x": object()}})
    assert not (tmp_path / "checkpoint-8").exists() and not (tmp_path / ".checkpoint-8.partial").exists()


def test_pretraining_checkpoints_are_complete_or_absent_and_pruned(tmp_path):
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, {"step": step, "weight": torch.full((2,), float(step))}, total_limit=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6"]
    (tmp_path / ".checkpoint-8.partial").mkdir()  # a run killed mid-save: no marker, never resumed from
    (tmp_path / ".checkpoint-8.partial" / TENSORS_FILE).write_bytes(b"")
    assert find_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-6"
    assert find_checkpoint(tmp_path, None) is None and find_checkpoint(tmp_path / "empty", "latest") is None
    assert load_checkpoint(find_checkpoint(tmp_path, str(tmp_path / "checkpoint-4")))["step"] == 4
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint.*--resume_from_checkpoint latest"):
        find_checkpoint(tmp_path, str(tmp_path / ".checkpoint-8.partial"))
    legacy = tmp_path / "checkpoint-1"
    legacy.mkdir()
    (legacy / "state.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="state.pt is a pickle, which is never loaded"):
        find_checkpoint(tmp_path, str(legacy))
    with pytest.raises(FileNotFoundError, match="nowhere is not a checkpoint folder"):
        find_checkpoint(tmp_path, str(tmp_path / "nowhere"))
    save_checkpoint(tmp_path, 8, {"step": 8}, total_limit=0)  # 0 keeps every checkpoint
    complete = sorted(p.parent.name for p in tmp_path.glob(f"checkpoint-*/{COMPLETE_MARKER}"))
    assert complete == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
