"""The ``ether-diffusion`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .io import AdapterFile, read_adapter_file

DEMO_STEPS = 1000
CONTROL_DEMO_STEPS = 600


def _inspect(args) -> int:
    source = read_adapter_file(args.adapter)
    summary = {
        "adapter_name": source.adapter_name,
        "base_model": source.base_model,
        "library_version": source.library_version,
        "parameters": source.num_parameters(),
        "components": {
            component: {
                "config": config.to_dict(),
                "layers": len(source.fingerprints[component]),
                "parameters": source.num_parameters(component),
            }
            for component, config in source.configs.items()
        },
        "modules": {
            name: {"config": module["config"], "parameters": sum(v.numel() for v in module["state"].values())}
            for name, module in source.modules.items()
        },
        "extra": source.extra,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"adapter      {summary['adapter_name']}  ({summary['parameters']:,} parameters)")
    print(f"base model   {summary['base_model'] or 'unknown'}")
    for component, info in summary["components"].items():
        config = info["config"]
        print(
            f"{component:<12} {config['method']}, n_blocks={config['n_blocks']}, sides={'+'.join(config['sides'])}, "
            f"{info['layers']} layers, {info['parameters']:,} parameters, targets={config['target_modules']}"
        )
    for name, info in summary["modules"].items():
        print(f"{name:<12} {info['parameters']:,} parameters, {json.dumps(info['config'])}")
    for key, value in summary["extra"].items():
        print(f"{key:<12} {value}")
    return 0


def _adapter_spec(text: str) -> tuple[str, float]:
    """``path`` or ``path:weight``."""
    path, sep, weight = text.rpartition(":")
    if sep and path and weight.replace(".", "", 1).replace("-", "", 1).isdigit():
        return path, float(weight)
    return text, 1.0


def _load_pipeline(model: str | None):
    from diffusers import StableDiffusionPipeline

    if model is None:
        from .world.assets import load_tiny_pipeline

        return load_tiny_pipeline()
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _read_adapters(specs: list[str]) -> list[tuple[AdapterFile, float]]:
    """Every ``--adapter`` read and validated, before any model is loaded: a bad file fails in a moment."""
    return [(read_adapter_file(path), weight) for path, weight in map(_adapter_spec, specs)]


def _load_adapters(pipe, adapters: list[tuple[AdapterFile, float]]) -> None:
    from .pipeline import load_ether_weights, set_ether_adapters

    names = [load_ether_weights(pipe, source, adapter_name=f"adapter{i}") for i, (source, _) in enumerate(adapters)]
    if names:
        set_ether_adapters(pipe, names, [weight for _, weight in adapters])


def _sample(args) -> int:
    adapters = _read_adapters(args.adapter)  # first: a bad file fails before diffusers is even imported
    import torch

    from .pipeline import disable_ether

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    pipe = _load_pipeline(args.model)
    _load_adapters(pipe, adapters)
    size = {} if args.size is None else {"height": args.size, "width": args.size}
    written = []
    for p, prompt in enumerate(args.prompt):
        for seed in args.seed or [0]:
            runs = [("adapted" if args.adapter else "base", None)]
            if args.compare and args.adapter:
                runs.append(("base", disable_ether))
            for label, switch in runs:
                if switch is not None:
                    switch(pipe)
                image = pipe(
                    prompt,
                    negative_prompt=args.negative_prompt,
                    num_inference_steps=args.steps,
                    guidance_scale=args.guidance_scale,
                    generator=torch.Generator().manual_seed(seed),
                    **size,
                ).images[0]
                path = output_dir / f"{p:02d}_seed{seed}_{label}.png"
                image.save(path)
                written.append(path)
            if args.compare and args.adapter:
                from .pipeline import enable_ether

                enable_ether(pipe)
    for path in written:
        print(path)
    return 0


def _fuse(args) -> int:
    import shutil
    import tempfile

    from .pipeline import fuse_ether, unload_ether_weights

    output = Path(args.output_dir)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        print(f"error: '{output}' is not empty; pass --overwrite to replace it", file=sys.stderr)
        return 2
    adapters = _read_adapters(args.adapter)
    pipe = _load_pipeline(args.model)
    _load_adapters(pipe, adapters)
    fuse_ether(pipe, safe_fusing=True)
    unload_ether_weights(pipe)  # plain diffusers modules again, with the adapter folded into the weights
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"fused model written to {output} (load it with StableDiffusionPipeline.from_pretrained)")
    return 0


def _demo(args) -> int:
    if args.task in ("control", "control-edges"):
        from .control.demo import run_control_demo

        run_control_demo(
            args.output_dir if args.output_dir != "outputs/demo" else "outputs/demo-control",
            task="edges" if args.task == "control-edges" else "segmentation",
            max_train_steps=args.max_train_steps or CONTROL_DEMO_STEPS,
            train_scenes=args.train_scenes,
            eval_scenes=args.eval_scenes,
            quiet=args.quiet,
        )
        return 0
    from .demo import run_demo

    run_demo(
        args.output_dir,
        subject=args.subject,
        max_train_steps=args.max_train_steps or DEMO_STEPS,
        method=args.method,
        num_class_images=args.num_class_images,
        seeds_per_prompt=args.seeds_per_prompt,
        max_prompts=args.max_prompts,
        quiet=args.quiet,
    )
    return 0


def _studio(argv: list[str]) -> int:
    """Run ``app/app.py`` (the Gradio studio, beside the package like ``assets/``) with ``argv``."""
    import importlib.util

    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: the studio needs gradio: pip install -e '.[app]'", file=sys.stderr)
        return 2
    path = Path(__file__).resolve().parents[1] / "app" / "app.py"
    if not path.is_file():
        print(f"error: {path} is missing; run the studio from a checkout of ether-diffusion", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("ether_studio_app", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv, prog="ether-diffusion studio")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ether-diffusion", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "train", help="DreamBooth with ETHER (flags of train_dreambooth_lora; see train --help)", add_help=False
    )

    commands.add_parser(
        "train-control",
        help="controllable synthesis: condition encoder + ETHER (flags of train_controlnet; see train-control --help)",
        add_help=False,
    )

    sample = commands.add_parser("sample", help="generate PNGs with one or more adapters")
    sample.add_argument("--model", default=None, help="diffusers folder or hub id (default: the shipped tiny model)")
    sample.add_argument("--adapter", action="append", default=[], help="adapter file or folder, optionally :weight")
    sample.add_argument("--prompt", action="append", required=True)
    sample.add_argument("--negative_prompt", default=None)
    sample.add_argument("--seed", type=int, action="append", default=None)
    sample.add_argument("--steps", type=int, default=25)
    sample.add_argument("--guidance_scale", type=float, default=5.0)
    sample.add_argument("--size", type=int, default=None, help="height and width (default: the model's)")
    sample.add_argument("--compare", action="store_true", help="also save the base model's image for each seed")
    sample.add_argument("--output_dir", default="samples")
    sample.set_defaults(run=_sample)

    fuse = commands.add_parser("fuse", help="save a plain diffusers model with adapters fused into its weights")
    fuse.add_argument("--model", default=None)
    fuse.add_argument("--adapter", action="append", required=True, help="adapter file or folder, optionally :weight")
    fuse.add_argument("--output_dir", required=True)
    fuse.add_argument("--overwrite", action="store_true")
    fuse.set_defaults(run=_fuse)

    demo = commands.add_parser("demo", help="teach the shipped tiny model a subject and show before/after")
    demo.add_argument(
        "--task",
        choices=["dreambooth", "control", "control-edges"],
        default="dreambooth",
        help="dreambooth: learn a subject; control: follow segmentation maps; control-edges: follow edge maps",
    )
    demo.add_argument("--output_dir", default="outputs/demo")
    demo.add_argument("--subject", default="orange_checkered_star")
    demo.add_argument("--method", choices=["ether", "ether_plus"], default="ether_plus")
    demo.add_argument(
        "--max_train_steps", type=int, default=None, help=f"default {DEMO_STEPS} (control: {CONTROL_DEMO_STEPS})"
    )
    demo.add_argument("--num_class_images", type=int, default=50)
    demo.add_argument("--seeds_per_prompt", type=int, default=4)
    demo.add_argument("--max_prompts", type=int, default=None)
    demo.add_argument("--train_scenes", type=int, default=1000, help="control: rendered training scenes")
    demo.add_argument("--eval_scenes", type=int, default=16, help="control: held-out scenes sampled and scored")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(run=_demo)
    inspect = commands.add_parser("inspect", help="summarise an adapter file (validated strictly)")
    inspect.add_argument("adapter", help="an adapter .safetensors file or a folder holding one")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.set_defaults(run=_inspect)
    commands.add_parser(
        "studio",
        help="the Gradio app: train, sample, manage adapters (--host 127.0.0.1, --port, --model, --workdir)",
        add_help=False,
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["train"]:
            from .training.dreambooth import parse_args, train

            result = train(parse_args(argv[1:]))
            print(f"adapter written to {result.adapter_path}")
            return 0
        if argv[:1] == ["train-control"]:
            from .control.train import parse_args as parse_control_args
            from .control.train import train as train_control

            result = train_control(parse_control_args(argv[1:]))
            print(f"condition encoder and adapter written to {result.adapter_path}")
            return 0
        if argv[:1] == ["studio"]:
            return _studio(argv[1:])
        args = build_parser().parse_args(argv)
        return args.run(args)
    # ValueError covers AdapterFileError and AdapterMismatchError; OSError a missing file, a full disk, a permission
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
