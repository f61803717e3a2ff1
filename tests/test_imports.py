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


def test_the_package_names_load_on_first_use_and_help_needs_no_torch():
    """``import ether_diffusion`` and the command line's parsing import neither torch nor diffusers (issue 26: `--help`
    under a second); every public name still resolves, to the object its module defines."""
    import importlib
    import subprocess
    import sys

    probe = ("import sys, ether_diffusion, ether_diffusion.cli as cli\n"
             "cli.build_parser()\n"
             "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")  # fmt: skip
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", loaded
    import ether_diffusion
    import ether_diffusion.inject  # noqa: F401  (binding the submodule on the package must not hide the function)
    from ether_diffusion import inject

    assert callable(inject) and inject.__module__ == "ether_diffusion.inject"
    for name in ether_diffusion.__all__:
        value = getattr(ether_diffusion, name)
        module = ether_diffusion._EXPORTS.get(name)
        if module is not None:
            assert value is getattr(importlib.import_module(module, "ether_diffusion"), name), name


def test_the_packages_static_imports_name_exactly_its_lazy_exports():
    """ether_diffusion/__init__.py lists its public names twice: ``_EXPORTS`` (what loads on first use) and the
    TYPE_CHECKING imports (what type checkers and the architecture test read). They must name the same things from the
    same modules."""
    import ast
    from pathlib import Path

    import ether_diffusion

    tree = ast.parse(Path(ether_diffusion.__file__).read_text())
    guarded = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    static = {alias.name: "." + node.module for node in guarded.body for alias in node.names}
    assert static == ether_diffusion._EXPORTS
