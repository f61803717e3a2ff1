"""The math and layer modules must not need diffusers (nor gradio)."""

import subprocess
import sys
import textwrap


def test_core_modules_import_with_diffusers_blocked():
    code = textwrap.dedent("""
        import sys
        sys.modules["diffusers"] = None  # any import of diffusers now raises ImportError
        sys.modules["gradio"] = None
        import torch
        from ether_diffusion import EtherConfig, inject
        from ether_diffusion.layers import EtherLinear
        from ether_diffusion.mixed import MixedBatch  # noqa: F401
        from ether_diffusion.reflection import METHODS
        from ether_diffusion.io import save_adapter, load_adapter
        layer = EtherLinear(torch.nn.Linear(4, 4), "x")
        layer.add_adapter("a", EtherConfig(method="ether"))
        layer.set_active(["a"])
        print(tuple(layer(torch.randn(2, 4)).shape))
        try:
            import ether_diffusion.pipeline
        except ImportError:
            print("pipeline needs diffusers")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["(2,", "4)", "pipeline", "needs", "diffusers"]
