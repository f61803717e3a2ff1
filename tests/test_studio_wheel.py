"""The wheel is the product: ``ether-diffusion studio`` runs from an installed wheel, with no checkout on its path.

The wheel is built from the package's sources (a copy, so the checkout gets no ``build/``), installed (not editable)
into a fresh virtual environment whose own site-packages hold only that wheel; its dependencies come from the
running interpreter's site-packages through a ``.pth`` line, which adds that folder to ``sys.path`` without
reading the ``.pth`` files in it, so the checkout's editable install stays out. The studio is then started from a
folder outside the checkout and its page read over HTTP (Gradio's ``/config``). An installed wheel has no shipped
tiny model (``assets/`` is beside the package, not in it): without ``--model`` the command says to pass one.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, stop_process

pytestmark = pytest.mark.slow  # builds a wheel and a virtual environment, starts the studio: the end-to-end tier
ROOT = Path(__file__).resolve().parents[1]
TABS = ["Train", "Control", "Sample", "Adapters"]


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, f"{command} exited with {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    """A fresh virtual environment with the wheel installed; returns its folder and the environment to run it in."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # what the wheel is made of: pyproject.toml (which reads README.md) and the package
    shutil.copytree(ROOT / "ether_diffusion", source / "ether_diffusion", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(ROOT / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", tmp / "dist", source])  # fmt: skip
    (wheel,) = (tmp / "dist").glob("ether_diffusion-*.whl")

    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    # installed before the .pth line exists: pip sees an environment without ether-diffusion and touches no other
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel])
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    assert sorted(p.name for p in site.iterdir()) == ["ether_diffusion", wheel.name.split("-py3")[0] + ".dist-info"]
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, diffusers, gradio ...

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    env.setdefault("OMP_NUM_THREADS", "2")
    where = run([python, "-c", "import ether_diffusion.studio.ui as ui; print(ui.__file__)"], cwd=tmp, env=env)
    assert Path(where.stdout.strip()) == site / "ether_diffusion" / "studio" / "ui.py"  # the wheel's, not the checkout
    assert (venv / "bin" / "ether-diffusion").read_text().startswith(f"#!{python}")
    return venv, env


def test_the_installed_wheel_serves_the_studio(installed, tmp_path):
    venv, env = installed
    port = free_port()
    log = tmp_path / "log.txt"
    command = [venv / "bin" / "ether-diffusion", "studio", "--model", ROOT / "assets" / "tiny-sd",
               "--workdir", tmp_path / "ws", "--port", port]  # fmt: skip
    with open(log, "w") as handle:
        process = subprocess.Popen([str(c) for c in command], cwd=tmp_path, env=env, stdout=handle,
                                   stderr=subprocess.STDOUT)  # fmt: skip
    try:
        config, deadline = None, time.monotonic() + 120
        while config is None and time.monotonic() < deadline:
            assert process.poll() is None, f"the studio exited with {process.returncode}:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5) as response:
                    config = json.loads(response.read())
            except OSError:
                time.sleep(0.5)
        assert config is not None, f"the studio did not answer within 120 s:\n{log.read_text()[-3000:]}"
    finally:
        stop_process(process)

    assert config["title"] == "ETHER Studio"
    tabs = [c["props"].get("label") for c in config["components"] if c["type"] == "tabitem"]
    assert [label for label in tabs if label in TABS] == TABS, tabs
    header = next(c["props"]["value"] for c in config["components"] if c["type"] == "markdown")
    assert f"Base model: `{ROOT / 'assets' / 'tiny-sd'}`" in header
    # the wheel ships no subjects: the Train form starts on uploads
    source = next(c["props"] for c in config["components"] if c["props"].get("elem_id") == "image-source")
    assert source["value"] == "My images"


def test_the_installed_wheel_asks_for_a_model(installed, tmp_path):
    venv, env = installed
    done = subprocess.run([str(venv / "bin" / "ether-diffusion"), "studio", "--workdir", str(tmp_path / "ws"),
                           "--port", str(free_port())], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1 and errors[0].startswith("error: no --model given"), done.stderr[-3000:]
    assert "pass --model with a diffusers folder" in errors[0]
    assert not (tmp_path / "ws").exists()  # refused before anything was set up
