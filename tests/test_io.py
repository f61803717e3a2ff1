"""The adapter file: cross-process round trip, strict loading errors, atomic writes."""

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import TinyMLP, assert_model_unchanged, model_record, randomize_adapters
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.testing import assert_close

from ether_diffusion import EtherConfig, adapter_names, count_parameters, inject, io
from ether_diffusion.finite import NonFiniteError
from ether_diffusion.io import (
    DEFAULT_WEIGHT_NAME,
    AdapterFileError,
    AdapterMismatchError,
    load_adapter,
    read_adapter_file,
    save_adapter,
)
from ether_diffusion.layers import EtherLayer

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CONFIG = EtherConfig(method="ether_plus", n_blocks=2, target_modules=TARGETS)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP()
    inject(model, CONFIG, "subject")
    randomize_adapters(model)
    path = save_adapter(tmp_path / "adapter.safetensors", {"unet": model}, "subject", base_model="tiny-mlp")
    return model, path


def rewrite(path, out, drop=None, add=None, reshape=None, metadata=None):
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if drop:
        del tensors[drop]
    if add:
        tensors.update(add)
    if reshape:
        tensors[reshape] = torch.zeros(3, 3)
    meta.update(metadata or {})
    save_file(tensors, str(out), metadata=meta)
    return out


def test_file_layout(saved):
    model, path = saved
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert "unet.to_q.ether_u" in keys and "unet.block.to_out.0.ether_v_out" in keys
    assert not any("base_layer" in k or "ether_adapters" in k for k in keys)
    assert meta["format"] == "ether-diffusion" and meta["format_version"] == "1"
    assert json.loads(meta["config"])["unet"]["method"] == "ether_plus"
    assert json.loads(meta["fingerprint"])["unet"]["block.to_v"] == [32, 16]
    # ETHER+ two-sided: 2·in + 2·out per layer
    assert read_adapter_file(path).num_parameters() == count_parameters(model) == 64 + 96 + 96 + 48


SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import TinyMLP, assert_model_unchanged, model_record, randomize_adapters
    from ether_diffusion import EtherConfig, inject, load_adapter, save_adapter
    torch.manual_seed(0)
    model = TinyMLP()
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(7))
    if sys.argv[1] == "save":
        inject(model, EtherConfig(method="ether_plus", n_blocks=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        randomize_adapters(model)
        save_adapter(sys.argv[2], {{"unet": model}}, "default")
    else:
        load_adapter(sys.argv[2], {{"unet": model}})
    with torch.no_grad():
        torch.save(model(x), sys.argv[3])
""")


@pytest.mark.slow
def test_save_in_one_process_load_in_another(tmp_path):
    script = tmp_path / "roundtrip.py"
    script.write_text(SCRIPT.format(tests=os.path.dirname(__file__)))
    adapter = tmp_path / "a.safetensors"
    for mode, out in (("save", "saved.pt"), ("load", "loaded.pt")):
        subprocess.run([sys.executable, str(script), mode, str(adapter), str(tmp_path / out)], check=True)
    saved, loaded = torch.load(tmp_path / "saved.pt"), torch.load(tmp_path / "loaded.pt")
    assert_close(loaded, saved, rtol=0, atol=0)


def test_load_into_fresh_model_and_folder(saved, tmp_path):
    model, path = saved
    x = torch.randn(3, 16)
    torch.manual_seed(0)
    fresh = TinyMLP()
    assert load_adapter(path, {"unet": fresh}) == "subject"
    assert_close(fresh(x), model(x), rtol=0, atol=0)
    # a folder with the default file name loads too, under another name
    folder = tmp_path / "folder"
    folder.mkdir()
    path.rename(folder / DEFAULT_WEIGHT_NAME)
    assert load_adapter(folder, {"unet": fresh}, adapter_name="again") == "again"
    assert adapter_names(fresh) == ["subject", "again"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (dict(drop="unet.to_q.ether_u"), "1 missing keys: unet.to_q.ether_u"),
        (dict(add={"unet.to_q.ether_w": torch.zeros(2, 8)}), "1 unexpected keys: unet.to_q.ether_w"),
        (dict(reshape="unet.to_k.ether_v"), r"wrong shape: unet.to_k.ether_v \(3, 3\) instead of \(2, 8\)"),
        (dict(metadata={"format_version": "7"}), "format_version '7'.*upgrade ether-diffusion"),
        (dict(metadata={"format": "lora"}), "not an ether-diffusion adapter"),
        (dict(metadata={"config": "{not json"}), "unreadable 'config' metadata"),
        (dict(add={"unet.to_q.ether_u": torch.full((2, 8), float("nan"))}), "non-finite"),
    ],
)
def test_strict_loading_errors(saved, tmp_path, edit, message):
    _, path = saved
    bad = rewrite(path, tmp_path / "bad.safetensors", **edit)
    torch.manual_seed(0)
    fresh = TinyMLP()
    with pytest.raises(AdapterFileError, match=message):
        load_adapter(bad, {"unet": fresh})
    assert not any(isinstance(m, EtherLayer) for m in fresh.modules())  # nothing was injected


def test_truncated_and_foreign_files(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    foreign = tmp_path / "pickle.safetensors"
    torch.save({"a": torch.zeros(2)}, foreign)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    for bad in (truncated, foreign, empty):
        with pytest.raises(AdapterFileError, match="not a readable safetensors file"):
            read_adapter_file(bad)
    with pytest.raises(FileNotFoundError, match="no adapter file at"):
        read_adapter_file(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="holds 4 .safetensors files"):
        read_adapter_file(tmp_path)


def test_a_model_or_a_lora_given_as_an_adapter_is_named(tmp_path, capsys):
    from ether_diffusion.cli import main

    files = {
        "model.safetensors": ({"model.diffusion_model.out.2.weight": torch.zeros(2)}, {"format": "pt"}),
        "kohya.safetensors": ({"lora_unet_x.lora_down.weight": torch.zeros(1, 2)}, {"ss_network_module": "lora"}),
        "peft.safetensors": ({"unet.x.lora_A.weight": torch.zeros(1, 2)}, {}),
    }
    for name, (tensors, metadata) in files.items():
        save_file(tensors, str(tmp_path / name), metadata=metadata)
    with pytest.raises(AdapterFileError, match="is a Stable Diffusion model checkpoint, not an ETHER adapter: pass it"):
        read_adapter_file(tmp_path / "model.safetensors")
    for name in ("kohya.safetensors", "peft.safetensors"):
        with pytest.raises(AdapterFileError, match="is a LoRA file but not an ether-diffusion adapter; LoRA files"):
            read_adapter_file(tmp_path / name)
    assert main(["inspect", str(tmp_path / "model.safetensors")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (  # after any warning the first import of diffusers prints
        f"error: '{tmp_path / 'model.safetensors'}' is a Stable Diffusion model checkpoint, not an ETHER adapter: "
        "pass it as the base model (CLI: --model)"
    )


def test_adapter_for_another_model_fails_clearly(saved):
    _, path = saved
    other = TinyMLP(width=32)  # same layer names, other widths
    with pytest.raises(
        AdapterMismatchError,
        match=r"made for tiny-mlp.*other widths.*block.to_v \(adapter \[32, 16\], model \[64, 32\]",
    ):
        load_adapter(path, {"unet": other})
    assert not any(isinstance(m, EtherLayer) for m in other.modules())
    with pytest.raises(AdapterMismatchError, match="text_encoder"):
        rewritten = read_adapter_file(path)
        rewritten.configs = {"text_encoder": rewritten.configs["unet"]}
        rewritten.fingerprints = {"text_encoder": rewritten.fingerprints["unet"]}
        load_adapter(rewritten, {"unet": other})


def test_interrupted_save_keeps_the_good_file(saved, tmp_path, monkeypatch):
    model, path = saved
    good = path.read_bytes()

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("ether_diffusion.io.save_file", disk_full)
    with pytest.raises(OSError, match="No space left on device.*unchanged"):
        save_adapter(path, {"unet": model}, "subject")
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]  # no temporary left behind
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_adapter(tmp_path / "no" / "such" / "dir.safetensors", {"unet": model}, "subject")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_vector_is_never_written(saved, value):
    """read_adapter_file refuses such a file, so saving one would lose the good file for one that cannot load."""
    model, path = saved
    good = path.read_bytes()
    with torch.no_grad():
        model.to_k.ether_adapters["subject"].ether_u[0, 0] = value
    with pytest.raises(NonFiniteError, match=r"^the adapter tensor unet\.to_k\.ether_u holds .*: nothing was written"):
        save_adapter(path, {"unet": model}, "subject")
    assert path.read_bytes() == good and sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_a_save_removes_what_a_killed_save_of_the_same_file_left(saved):
    """Temporaries of earlier writers of this file (the hidden ``.<name>.<hex>.tmp`` file or folder), older than
    this process and held by no one, go; anything else beside it stays."""
    model, path = saved
    stale = [path.with_name(f".{path.name}.0123456789ab.tmp"), path.with_name(f".{path.name}.fedcba987654.tmp")]
    stale[0].write_bytes(b"")  # an empty temporary file
    stale[1].mkdir()  # a staging folder with the writer's half-written file in it
    (stale[1] / ".tmpAbC123").write_bytes(b"half an adapter")
    kept = [path.with_name(f".{path.name}.tmp"), path.with_name("other.safetensors.0123456789ab.tmp")]
    for other in kept:
        other.write_bytes(b"not a temporary of this writer")
    for old in (*stale, *kept):
        os.utime(old, (1e9, 1e9))  # 2001: long before this process started
    save_adapter(path, {"unet": model}, "subject")
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, *(k.name for k in kept)])


def test_saved_adapter_is_readable_by_others_and_a_resave_keeps_the_mode(saved):
    model, path = saved
    old = os.umask(0o022)
    try:
        fresh = save_adapter(path.with_name("fresh.safetensors"), {"unet": model}, "subject")
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644  # as open() makes it, not mkstemp's 0600
        os.chmod(path, 0o640)
        save_adapter(path, {"unet": model}, "subject")
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    finally:
        os.umask(old)


class _WithConv(nn.Module):
    def __init__(self, kernel):
        super().__init__()
        self.to_q = nn.Linear(8, 8)
        self.proj = nn.Conv2d(8, 8, kernel, padding=kernel // 2)
        self.to_v = nn.Linear(8, 8)


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "with-another-adapter"])
def test_file_targeting_a_3x3_conv_is_refused_and_the_model_is_untouched(tmp_path, existing):
    torch.manual_seed(0)
    source = _WithConv(1)  # proj is a 1×1 convolution where the file was made
    inject(source, EtherConfig(method="ether", target_modules=["to_q", "proj", "to_v"]), "subject")
    path = save_adapter(tmp_path / "a.safetensors", {"unet": source}, "subject")
    model = _WithConv(3)  # same widths, but a 3×3 convolution: the fingerprint alone cannot tell
    if existing:
        inject(model, EtherConfig(method="ether_plus", target_modules=["to_q"]), "old")
        randomize_adapters(model)
    before = model_record(model)
    with pytest.raises(AdapterMismatchError, match=r"cannot adapt: proj \(a 3×3 convolution; ETHER adapts only 1×1"):
        load_adapter(path, {"unet": model})
    assert_model_unchanged(model, before)
    if existing:  # and the studio's next import works: nothing left over
        assert load_adapter(read_adapter_file(path), {"unet": _WithConv(1)}) == "subject"


@pytest.mark.parametrize("fail_on", [1, 2])
def test_a_load_failing_half_way_restores_every_component(saved, monkeypatch, fail_on):
    _, path = saved
    two = read_adapter_file(path)  # the same adapter for two components
    two.configs["text_encoder"] = two.configs["unet"]
    two.fingerprints["text_encoder"] = two.fingerprints["unet"]
    two.tensors.update({"text_encoder." + k[len("unet.") :]: v for k, v in list(two.tensors.items())})
    torch.manual_seed(0)
    unet, text_encoder = TinyMLP(), TinyMLP()
    inject(text_encoder, EtherConfig(method="ether", target_modules=["to_q"]), "old")
    records = {"unet": model_record(unet), "text_encoder": model_record(text_encoder)}
    calls = []
    real = io.load_adapter_state_dict

    def fail_on_call(model, name, state):
        calls.append(name)
        if len(calls) == fail_on:
            raise RuntimeError("simulated: device lost")
        return real(model, name, state)

    monkeypatch.setattr(io, "load_adapter_state_dict", fail_on_call)
    with pytest.raises(RuntimeError, match="device lost"):
        load_adapter(two, {"unet": unet, "text_encoder": text_encoder})
    assert_model_unchanged(unet, records["unet"])
    assert_model_unchanged(text_encoder, records["text_encoder"])
    monkeypatch.undo()
    assert load_adapter(two, {"unet": unet, "text_encoder": text_encoder}) == "subject"  # nothing left in the way


def _with_vector(path, out, key, value):
    """A copy of the file whose vector ``key`` is ``value`` (any dtype): a hand-made or foreign file."""
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[key] = value
    save_file(tensors, str(out), metadata=meta)
    return out


@pytest.mark.parametrize(
    "value, model_dtype, message",
    [
        (1e300, torch.float32, r"unet.to_q.ether_u overflows torch.float32 \(largest magnitude .*e\+300\)"),
        (1e300, torch.float64, "directions u/|u| are lost in torch.float64"),  # 1e300² is beyond float64 too
        (1e30, torch.float32, "directions u/|u| are lost in torch.float32"),  # finite, but |u| overflows: u/|u| = 0
        (1e-21, torch.float32, "directions u/|u| are lost in torch.float32"),  # |u|² is subnormal: inaccurate
        (1e5, torch.float16, "overflows torch.float16"),
        (1e-10, torch.float16, "directions u/|u| are lost in torch.float16"),  # every value underflows to 0
    ],
)
def test_values_are_checked_in_the_models_dtype(saved, tmp_path, value, model_dtype, message):
    _, path = saved
    shape = read_adapter_file(path).tensors["unet.to_q.ether_u"].shape
    wide = torch.randn(shape, dtype=torch.float64) * value
    bad = _with_vector(path, tmp_path / "bad.safetensors", "unet.to_q.ether_u", wide)
    torch.manual_seed(0)
    model = TinyMLP().to(model_dtype)
    before = model_record(model)
    with pytest.raises(AdapterFileError, match=message):
        load_adapter(bad, {"unet": model})
    assert_model_unchanged(model, before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_an_ordinary_file_loads_into_a_model_of_any_dtype(saved, dtype):
    model, path = saved
    torch.manual_seed(0)
    fresh = TinyMLP().to(dtype)
    load_adapter(path, {"unet": fresh})
    x = torch.randn(3, 16)
    assert_close(fresh(x.to(dtype)).float(), model(x), rtol=0.05 if dtype.itemsize == 2 else 1e-5, atol=0.02)


def test_a_float64_file_with_representable_values_loads_into_float32(saved, tmp_path):
    model, path = saved
    u = read_adapter_file(path).tensors["unet.to_q.ether_u"]
    # directions are what count: a small float64 vector means what the saved one means
    scaled = _with_vector(path, tmp_path / "scaled.safetensors", "unet.to_q.ether_u", u.double() * 1e-12)
    torch.manual_seed(0)
    fresh = TinyMLP()
    load_adapter(scaled, {"unet": fresh})
    x = torch.randn(3, 16)
    assert_close(fresh(x), model(x))


def test_sample_refuses_an_overflowing_file_instead_of_writing_black_images(tmp_path, capsys):
    from ether_diffusion import cli
    from ether_diffusion.models import load_tiny_pipeline

    pipe = load_tiny_pipeline()
    inject(pipe.unet, EtherConfig(method="ether", target_modules=["to_q"]), "subject")
    path = save_adapter(tmp_path / "a.safetensors", {"unet": pipe.unet}, "subject")
    key = next(iter(read_adapter_file(path).tensors))
    shape = read_adapter_file(path).tensors[key].shape
    bad = _with_vector(path, tmp_path / "bad.safetensors", key, torch.full(shape, 1e300, dtype=torch.float64))
    args = ["sample", "--adapter", str(bad), "--prompt", "a star", "--steps", "1", "--output_dir", tmp_path / "out"]
    assert cli.main([str(a) for a in args]) == 2
    assert "overflows torch.float32" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*.png"))


WRITER = textwrap.dedent("""
    import os, sys, time
    path, stop, first, second = sys.argv[1:5]
    contents = [open(first, "rb").read(), open(second, "rb").read()]
    i = 0
    while not os.path.exists(stop):  # atomically replace the file, alternating two valid adapters, as saves do
        tmp = f"{path}.{i}.tmp"
        with open(tmp, "wb") as handle:
            handle.write(contents[i % 2])
        os.replace(tmp, path)
        i += 1
    print(i)
""")


def test_reads_racing_a_writer_are_always_one_complete_save(saved, tmp_path):
    model, _ = saved
    versions = []
    for seed in (1, 2):  # two valid adapters of different sizes: a torn read would mix header and data
        randomize_adapters(model, seed=seed)
        extra = {"padding": "x" * 1000 * seed}
        versions.append(save_adapter(tmp_path / f"v{seed}.safetensors", {"unet": model}, "subject", extra=extra))
    expected = [read_adapter_file(v).tensors for v in versions]
    target, stop = tmp_path / "racing.safetensors", tmp_path / "stop"
    target.write_bytes(versions[0].read_bytes())
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(target), str(stop), *map(str, versions)], stdout=subprocess.PIPE, text=True
    )
    try:
        seen = [0, 0]
        for _ in range(400):
            tensors = read_adapter_file(target).tensors  # never a raw RuntimeError, never a mix
            matches = [i for i, e in enumerate(expected) if all(torch.equal(tensors[k], e[k]) for k in e)]
            assert tensors.keys() == expected[0].keys() and len(matches) == 1
            seen[matches[0]] += 1
    finally:
        stop.touch()
        replaced = int(writer.communicate(timeout=30)[0])
    assert replaced > 10 and min(seen) > 0  # the race really ran: both versions were read
