"""The console script, run as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import TinyMLP, randomize_adapters

from ether_diffusion import EtherConfig, inject, save_adapter

CLI = str(Path(sys.executable).parent / "ether-diffusion")  # the console script installed beside this Python


def test_inspect_summarises_and_rejects_bad_files(tmp_path):
    model = TinyMLP()
    inject(model, EtherConfig(method="ether", n_blocks=2, target_modules=["to_q", "to_k"]), "dog")
    randomize_adapters(model)
    path = save_adapter(tmp_path / "dog.safetensors", {"unet": model}, "dog", base_model="tiny", extra={"steps": "9"})
    out = subprocess.run([CLI, "inspect", str(path), "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["adapter_name"] == "dog" and summary["base_model"] == "tiny"
    assert summary["parameters"] == 16 + 16 and summary["components"]["unet"]["layers"] == 2
    assert summary["extra"] == {"steps": "9"}
    text = subprocess.run([CLI, "inspect", str(path)], capture_output=True, text=True).stdout
    assert "ether, n_blocks=2" in text

    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 10)
    bad = subprocess.run(
        [CLI, "inspect", str(tmp_path / "broken.safetensors")], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "not a readable safetensors file" in bad.stderr
