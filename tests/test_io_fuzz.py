"""Malformed adapter files, made by mutating a valid one in many ways: only the documented errors escape
(AdapterFileError, AdapterMismatchError, FileNotFoundError), and a model that a load refused is untouched."""

import json
import random

import pytest
import torch
from conftest import TinyMLP, assert_model_unchanged, model_record, randomize_adapters
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ether_diffusion import EtherConfig, inject
from ether_diffusion.io import AdapterFileError, AdapterMismatchError, load_adapter, read_adapter_file, save_adapter

DOCUMENTED = (AdapterFileError, AdapterMismatchError, FileNotFoundError)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
DEEP = "[" * 100_000 + "]" * 100_000  # json.loads raises RecursionError on this


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyMLP()
    inject(model, EtherConfig(method="ether_plus", n_blocks=2, target_modules=TARGETS), "subject")
    randomize_adapters(model)
    path = save_adapter(tmp_path_factory.mktemp("valid") / "a.safetensors", {"unet": model}, "subject")
    data = path.read_bytes()
    header_size = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + header_size])["__metadata__"]
    return data, header_size, metadata


def _rebuilt(data, metadata=None, tensors=None):
    """The valid file with its metadata entries or tensors replaced (``None`` deletes an entry)."""
    size = int.from_bytes(data[:8], "little")
    meta = dict(json.loads(data[8 : 8 + size])["__metadata__"])
    for key, value in (metadata or {}).items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    state = dict(load_safetensors(data))
    for key, value in (tensors or {}).items():
        if value is None:
            state.pop(key, None)
        else:
            state[key] = value
    return save_safetensors(state, metadata=meta)


def _config(**changes):
    config = EtherConfig(method="ether_plus", n_blocks=2, target_modules=TARGETS).to_dict()
    config.update(changes)
    return json.dumps({"unet": config})


def _fingerprint(valid_metadata, **layers):
    prints = json.loads(valid_metadata["fingerprint"])
    prints["unet"].update(layers)
    return json.dumps(prints)


def byte_mutations(data, header_size):
    rng = random.Random(0)
    cuts = sorted({0, 1, 7, 8, 9, 20, header_size, header_size + 7, header_size + 8, header_size + 9, len(data) - 1})
    cuts += sorted(rng.sample(range(len(data)), 30))
    for cut in cuts:
        yield f"truncated at {cut}", data[:cut]
    for position in rng.sample(range(len(data)), 120) + rng.sample(range(8, 8 + header_size), 80):
        flipped = bytearray(data)
        flipped[position] ^= rng.randrange(1, 256)
        yield f"byte {position} flipped", bytes(flipped)
    for size in (0, 1, header_size - 1, header_size + 1, len(data), 2**40, 2**64 - 1):
        yield f"header length {size}", size.to_bytes(8, "little") + data[8:]
    yield "empty", b""
    yield "random bytes", bytes(rng.randrange(256) for _ in range(500))
    yield "header only", data[: 8 + header_size]
    yield "doubled", data + data


def metadata_mutations(meta):
    bad_json = ["", "{", "null", "0", "1e999", "[]", '"text"', "true", DEEP, '{"unet": ' + DEEP + "}"]
    for key in ("config", "fingerprint", "modules", "format_version", "format", "adapter_name", "base_model"):
        for value in bad_json:
            yield f"{key}={value[:20]!r}", {key: value}
        yield f"{key} missing", {key: None}
    for value in (None, [], "x", 5, {"unet": None}):
        yield f"config={value!r}", {"config": json.dumps(value)}
    config_changes = [
        dict(method=5),
        dict(method=["ether"]),
        dict(method="lora"),
        dict(n_blocks="2"),
        dict(n_blocks=3),
        dict(n_blocks=0),
        dict(n_blocks=-2),
        dict(n_blocks=10**30),
        dict(n_blocks=True),
        dict(n_blocks=2.0),
        dict(sides="input"),
        dict(sides=[]),
        dict(sides=[1]),
        dict(sides=[["input"]]),
        dict(sides={"a": 1}),
        dict(target_modules=5),
        dict(target_modules=[]),
        dict(target_modules=[""]),
        dict(target_modules=[5]),
        dict(target_modules=[["to_q"]]),
        dict(target_modules="no-such-preset"),
        dict(target_modules=["conv"]),
        dict(exclude_modules=5),
        dict(exclude_modules=[None]),
        dict(exclude_modules=[{"a": 1}]),
        dict(exclude_modules="to_q"),
        dict(init_seed="x"),
        dict(init_seed=1.5),
        dict(init_seed=None),
        dict(format_version=2),
        dict(format_version="1"),
        dict(format_version=None),
        dict(unknown_field=1),
    ]
    for change in config_changes:
        yield f"config {change}", {"config": _config(**change)}
    fingerprints = [
        [],
        {"unet": []},
        {"unet": None},
        {"unet": {"to_q": 16}},
        {"unet": {"to_q": [16]}},
        {"unet": {"to_q": [16, 16, 16]}},
        {"unet": {"to_q": ["16", 16]}},
        {"unet": {"to_q": [-16, 16]}},
        {"unet": {"to_q": [0, 0]}},
        {"unet": {"to_q": [1e400, 16]}},
        {"unet": {"to_q": [True, 16]}},
        {"unet": {"to_q": [16.0, 16]}},
        {"unet": {"to_q": [None, 16]}},
        {"unet": {"to_q": {"in": 16}}},
        {"unet": {}, "text_encoder": {}},
        {"text_encoder": {"to_q": [16, 16]}},
        {"unet": {"": [16, 16]}},
    ]
    for value in fingerprints:
        yield f"fingerprint={json.dumps(value)[:40]}", {"fingerprint": json.dumps(value)}
    yield "fingerprint with an extra layer", {"fingerprint": _fingerprint(meta, **{"block.to_v2": [32, 16]})}
    yield "fingerprint with odd widths", {"fingerprint": _fingerprint(meta, to_q=[15, 16])}
    for value in ([], None, 5, {"unet": {}}, {"to_q": {}}, {"encoder": None}, {"": {}}):
        yield f"modules={value!r}", {"modules": json.dumps(value)}
    for name in ("../evil", "x y", "a" * 100, "-lead", "é"):
        yield f"adapter_name={name!r}", {"adapter_name": name}


def tensor_mutations():
    key = "unet.to_q.ether_u"
    for dtype in (torch.int32, torch.int64, torch.bool, torch.uint8, torch.complex64, torch.float8_e4m3fn):
        yield f"{key} as {dtype}", {key: torch.ones(2, 8).to(dtype)}
    for value in (torch.tensor(1.0), torch.ones(2, 8, 1), torch.ones(16), torch.ones(0, 8), torch.ones(2, 0)):
        yield f"{key} shaped {tuple(value.shape)}", {key: value}
    for value in (float("nan"), float("inf"), -float("inf")):
        yield f"{key} holding {value}", {key: torch.full((2, 8), value)}
    yield f"{key} holding 1e300 in float64", {key: torch.full((2, 8), 1e300, dtype=torch.float64)}
    yield f"{key} missing", {key: None}
    yield "a tensor without component", {"to_q.ether_u": torch.ones(2, 8)}
    yield "a tensor with an empty name", {"": torch.ones(2, 8)}
    yield "a module tensor without its config", {"encoder.weight": torch.ones(3)}


def cases(valid):
    data, header_size, meta = valid
    yield from byte_mutations(data, header_size)
    for name, change in metadata_mutations(meta):
        yield name, _rebuilt(data, metadata=change)
    for name, change in tensor_mutations():
        yield name, _rebuilt(data, tensors=change)


def test_mutated_files_raise_only_documented_errors_and_leave_the_model_untouched(valid, tmp_path):
    escaped, outcomes = [], {"loaded": 0, "refused": 0}
    path = tmp_path / "mutated.safetensors"
    for number, (name, content) in enumerate(cases(valid)):
        path.write_bytes(content)
        try:
            read_adapter_file(path)
        except DOCUMENTED:
            pass
        except BaseException as err:  # noqa: BLE001 - collecting every escape is the point
            escaped.append(f"read, {name}: {type(err).__name__}: {str(err)[:120]}")
        torch.manual_seed(0)
        model = TinyMLP()
        if number % 2:  # half the loads go into a model that already carries an adapter
            inject(model, EtherConfig(method="ether", target_modules=["to_q"]), "old")
        before = model_record(model)
        try:
            load_adapter(path, {"unet": model})
            outcomes["loaded"] += 1  # e.g. a flipped byte in the data that still reads as a finite float
        except DOCUMENTED:
            outcomes["refused"] += 1
            try:
                assert_model_unchanged(model, before)
            except AssertionError:
                escaped.append(f"load, {name}: the refused load changed the model")
        except BaseException as err:  # noqa: BLE001
            escaped.append(f"load, {name}: {type(err).__name__}: {str(err)[:120]}")
    assert not escaped, f"{len(escaped)} undocumented outcomes:\n" + "\n".join(escaped)
    assert outcomes["refused"] > 300 and outcomes["loaded"] > 0, outcomes  # the mutations really ran


def test_the_studio_lists_a_folder_of_broken_files_with_each_problem(valid, tmp_path):
    """One malformed file must not break the studio's whole Adapters table: every file gets a row, broken ones with
    their problem (so they can be deleted), good ones as usual."""
    from ether_diffusion.studio import AdapterStore, Workspace

    data, header_size, metadata = valid
    store = AdapterStore(Workspace(tmp_path))
    (store.folder / "good.safetensors").write_bytes(data)
    broken = {
        "cut": data[: len(data) // 2],
        "deep": _rebuilt(data, {"config": DEEP}),
        "wrongtype": _rebuilt(data, {"config": json.dumps({"unet": {"method": 3}})}),
        "noformat": _rebuilt(data, {"format": None}),
        "nested": _rebuilt(data, {"fingerprint": json.dumps({"unet": [1, 2]})}),
        "garbage": bytes(range(256)) * 3,
    }
    for name, content in broken.items():
        (store.folder / f"{name}.safetensors").write_bytes(content)
    listed = {info.name: info for info in store.list()}
    assert set(listed) == {"good", *broken}
    assert listed["good"].error is None and listed["good"].method == "ETHER+"
    for name in broken:
        assert listed[name].method == "unreadable" and listed[name].error, name
