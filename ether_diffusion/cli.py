"""The ``ether-diffusion`` command line."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .files import atomic_write
from .sources import ModelLoadError, default_model

# torch, diffusers and the training package load where a command needs them, not here: `--help` and the parsing of
# every command stay well under a second
if TYPE_CHECKING:
    from .io import AdapterFile

DEMO_STEPS = 1000
CONTROL_DEMO_STEPS = 600
#: the training verbs: the kind each trains (a ``TaskKind`` value; ``registry.py`` picks its flags by the model)
TRAIN_VERBS = {"train": "dreambooth", "train-control": "control"}

#: ``bench <kind>``: the paper's benchmark of each kind of training (its module's ``parse_args`` and ``main``)
BENCHES = {"dreambooth": ".bench.dreambooth", "control": ".bench.control"}
#: ``bench <verb>`` and ``world <verb>`` tools: (group, verb) -> (module, help). Each module parses its own flags
#: (``parse_args(argv, prog)``, so ``--help`` lists them) and runs (``main(args)``), as its launcher in scripts/ does.
TOOLS = {
    ("bench", "speed"): (".bench.speed", "speed and memory of ETHER against the frozen-model floor and PEFT's methods"),
    ("bench", "host"): (".bench.host", "host time each adapter adds per layer (a chain of tiny layers, CPU time)"),
    ("bench", "memory"): (
        ".bench.memory",
        "training memory before activations per --base_quantization (SDXL, SD3, Flux)",
    ),
    ("bench", "pack"): (".bench.pack", "adapters trained per hour when K DreamBooth runs share each step (--pack)"),
    ("bench", "startup"): (".bench.startup", "how long --help, an export and a one-step run take as fresh processes"),
    ("bench", "cache-latents"): (".bench.cache_latents", "what --cache_latents saves per DreamBooth step"),
    ("bench", "lora-sizes"): (".bench.lora_sizes", "rank and file size of the exact LoRA of each ETHER setting"),
    ("bench", "ablation-table"): (".bench.ablation", "one table and plot over several bench dreambooth folders"),
    ("bench", "quality-sweep"): (".bench.quality_sweep", "draw docs/quality.md's learning-rate sweep from its JSON"),
    ("world", "pretrain"): (".world.pretrain", "pretrain the tiny Stable Diffusion (VAE, UNet, text encoder)"),
    ("world", "train-evaluator"): (".evaluation.train", "train the world evaluator and measure it on held-out images"),
    ("world", "evaluate"): (".evaluation.evaluate", "the tiny model's quality gate, and --write_model_card"),
}


def _inspect(args) -> int:
    from .io import read_adapter_file

    source = read_adapter_file(args.adapter)
    summary = {
        "adapter_name": source.adapter_name,
        "base_model": source.base_model,
        "model_family": source.model_family,
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
    if source.model_family:
        from .families import FAMILIES

        family = FAMILIES.get(source.model_family)
        print(f"made for     {family.label} ({family.pipeline})" if family else f"made for     {source.model_family}")
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


def _finite(text: str) -> float:
    """A number flag (argparse ``type``): NaN and infinity are refused at parsing, since every weight they touch
    would be written NaN or infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number: give one such as 0.8")
    return value


def _whole(low: int, high: int):
    """An argparse ``type``: a whole number from ``low`` to ``high``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not from {low} to {high}")
        return value

    return parse


def _adapter_spec(text: str) -> tuple[str, float | None]:
    """``path`` or ``path:weight`` (argparse ``type`` of the adapter arguments); the weight is None where not given.
    An existing file whose name ends in ``:number`` is a path; a weight that is not finite is refused at parsing."""
    path, sep, weight = text.rpartition(":")
    if not sep or not path or Path(text).exists():
        return text, None
    try:
        value = float(weight)
    except ValueError:
        return text, None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"the weight of '{text}' is not a finite number: give one such as {path}:0.8")
    return path, value


def _add_model_arguments(parser, default_help: str = "default: the shipped tiny model") -> None:
    parser.add_argument(
        "--model", default=None, help=f"diffusers folder, hub id, or single .safetensors/.ckpt file ({default_help})"
    )
    parser.add_argument(
        "--config",
        default=None,
        help="for a single-file --model: a local diffusers folder of the same architecture (its configs and "
        "tokenizer; no weights needed), so nothing is fetched from the Hub",
    )
    parser.add_argument(
        "--original_config", default=None, help="for a single-file --model: its original LDM .yaml (v1-inference.yaml)"
    )


def _read_adapters(specs: list[tuple[str, float | None]], default: float = 1.0) -> list[tuple[AdapterFile, float]]:
    """Every ``--adapter`` read and validated, before any model is loaded: a bad file fails in a moment."""
    from .io import read_adapter_file

    return [(read_adapter_file(path), default if weight is None else weight) for path, weight in specs]


def _load_adapters(pipe, adapters: list[tuple[AdapterFile, float]]) -> None:
    from .pipeline import load_ether_weights, set_ether_adapters

    names = [load_ether_weights(pipe, source, adapter_name=f"adapter{i}") for i, (source, _) in enumerate(adapters)]
    if names:
        set_ether_adapters(pipe, names, [weight for _, weight in adapters])


def _overwritten_input(output: Path, model: str | None, adapters: list[tuple[AdapterFile, float]]) -> str | None:
    """The error for an output that would replace one of the command's inputs (the same file, or a folder holding
    it), or None. ``--overwrite`` replaces an earlier output, never the model or an adapter being read."""
    inputs = [("the base model", Path(model or default_model()))]
    inputs += [("an adapter being read", source.path) for source, _ in adapters if source.path is not None]
    written = output.resolve()
    for what, path in inputs:
        if path.exists() and (path.resolve() == written or written in path.resolve().parents):
            held = "is" if path.resolve() == written else "holds"
            return f"error: '{output}' {held} {what} ('{path}'): write the result elsewhere, it would replace its input"
    return None


def _sample(args) -> int:
    adapters = _read_adapters(args.adapter)  # first: a bad file fails before diffusers is even imported
    from .models import load_pipeline
    from .sampling import sample_images

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(args.model, config=args.config, original_config=args.original_config)
    _load_adapters(pipe, adapters)
    size = {} if args.size is None else {"height": args.size, "width": args.size}
    variants = ("adapted", "base") if args.compare and args.adapter else ("adapted" if args.adapter else "base",)
    samples = sample_images(
        pipe,
        args.prompt,
        args.seed or [0],
        variants=variants,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt,
        **size,
    )
    index = {prompt: p for p, prompt in reversed(list(enumerate(args.prompt)))}
    for sample in samples:
        path = output_dir / f"{index[sample.prompt]:02d}_seed{sample.seed}_{sample.variant}.png"
        with atomic_write(path, "the image") as tmp:  # a full disk leaves no half image over a whole one
            sample.image.save(tmp, format="PNG")
        print(path)
    return 0


def _fuse(args) -> int:
    from .config import DTYPES
    from .models import load_pipeline, save_folder, save_single_file
    from .pipeline import fuse_ether, unload_ether_weights

    if args.single_file is not None:
        target = Path(args.single_file)
        if target.suffix != ".safetensors":
            print(f"error: --single_file must name a .safetensors file, not '{target}'", file=sys.stderr)
            return 2
        if target.exists() and not args.overwrite:
            print(f"error: '{target}' exists; pass --overwrite to replace it", file=sys.stderr)
            return 2
    else:
        output = Path(args.output_dir)
        if output.exists() and not output.is_dir():
            print(f"error: '{output}' is a file; --output_dir names a folder to write", file=sys.stderr)
            return 2
        if output.exists() and any(output.iterdir()) and not args.overwrite:
            print(f"error: '{output}' is not empty; pass --overwrite to replace it", file=sys.stderr)
            return 2
    adapters = _read_adapters(args.adapter)
    overwritten = _overwritten_input(target if args.single_file is not None else output, args.model, adapters)
    if overwritten:
        print(overwritten, file=sys.stderr)
        return 2
    pipe = load_pipeline(args.model, config=args.config, original_config=args.original_config)
    _load_adapters(pipe, adapters)
    fuse_ether(pipe, safe_fusing=True)
    unload_ether_weights(pipe)  # plain diffusers modules again, with the adapter folded into the weights
    dtype = DTYPES.get(args.dtype)
    if args.single_file is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        save_single_file(pipe, target, dtype=dtype)
        print(f"fused model written to {target} (original SD checkpoint layout: A1111/Forge/ComfyUI, from_single_file)")
        return 0
    save_folder(pipe, output, dtype=dtype)
    print(f"fused model written to {output} (load it with {type(pipe).__name__}.from_pretrained)")
    return 0


def _recorded_base_model(adapters: list[tuple[AdapterFile, float]]) -> str | None:
    """The model to export against when no ``--model`` is given: the base model the adapters record (None: the
    shipped tiny model, also when recorded as it sits in another checkout). A local path that is not here, or
    adapters that name different models, are errors that say to pass ``--model``."""
    recorded = sorted({source.base_model for source, _ in adapters if source.base_model})
    if len(recorded) > 1:
        raise ValueError(
            f"the adapters record different base models ({', '.join(recorded)}): pass --model with the one to "
            "export against"
        )
    if not recorded:
        return None
    base = recorded[0]
    if Path(base).exists():
        return base
    if Path(base).name == Path(default_model()).name:  # the shipped tiny model, from another machine or checkout
        return None
    if Path(base).expanduser().is_absolute() or base.startswith((".", "~")):
        raise FileNotFoundError(
            f"the adapter was trained on '{base}', which is not on this machine: pass --model with that model's "
            "folder or checkpoint file"
        )
    return base  # a hub id: from the local cache, or the loader says why it cannot be fetched


def _export(args) -> int:
    from .export import export_to_lora

    output = Path(args.output)
    target = output / "pytorch_lora_weights.safetensors" if output.is_dir() else output
    if target.exists() and not args.overwrite:
        print(f"error: '{target}' exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    if not output.is_dir() and output.suffix != ".safetensors":
        print(f"error: --output must be a .safetensors file (or an existing folder), not '{output}'", file=sys.stderr)
        return 2
    adapters = _read_adapters(args.adapter, args.strength)  # first: a bad file fails before the model loads
    model = args.model if args.model is not None else _recorded_base_model(adapters)
    overwritten = _overwritten_input(target, model, adapters)
    if overwritten:
        print(overwritten, file=sys.stderr)
        return 2
    if args.model is None and model is not None:
        print(f"note: no --model given: exporting against the base model the adapter records, '{model}'")
    try:
        summary = export_to_lora(adapters, output, model, args.format, args.dtype, args.config, args.original_config,
                                 args.unet_only)  # fmt: skip
    except ModelLoadError as err:
        if args.model is not None or model is None:
            raise
        raise ModelLoadError(
            f"the adapter's recorded base model '{model}' could not be loaded ({err}); pass --model with that "
            "model's folder, checkpoint file or hub id"
        ) from err
    for note in summary.notes:
        print(f"note: {note}")
    layers = sum(summary.layers.values())
    ranks = sorted({r for rs in summary.ranks.values() for r in rs})
    if summary.file_rank:
        rank = f"rank {summary.file_rank} on all {layers} layers"
    else:
        rank = f"rank {ranks[0]} on {layers} layers" if len(ranks) == 1 else f"ranks {ranks} on {layers} layers"
    print(
        f"{args.format} LoRA written to {summary.path} ({summary.dtype}, {rank}, {summary.bytes / 1e6:.2f} MB). At "
        f"LoRA weight 1 it applies the adapters' weight changes to within {summary.max_weight_error:.1e} "
        f"({summary.max_relative_error:.1e} of a layer's largest change: {summary.dtype} rounding; docs/export.md)"
    )
    return 0


def _demo(args) -> int:
    if args.task in ("control", "control-edges"):
        from .demo import run_control_demo

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


def _export_world(args) -> int:
    if args.control:
        from .bench.control import export_world_control

        train, held_out = export_world_control(
            args.output, args.control, args.train_scenes, args.eval_scenes, overwrite=args.overwrite
        )
        print(f"tiny-world {args.control} data written: {train} ({args.train_scenes} rows), {held_out} "
              f"({args.eval_scenes} held-out rows with masks). Benchmark it with\n  ether-diffusion bench control "
              f"--train_data_dir {train} --eval_data_dir {held_out}")  # fmt: skip
        return 0
    from .bench.dataset import export_world_dataset

    folder = export_world_dataset(args.output, overwrite=args.overwrite)
    print(f"the tiny world's subjects written in the DreamBooth layout to {folder}. Benchmark them with\n"
          f"  ether-diffusion bench dreambooth --dataset {folder}")  # fmt: skip
    return 0


def _bench(kind: str, argv: list[str]) -> int:
    """``bench dreambooth`` / ``bench control``: the benchmark of ``kind`` (``BENCHES``), its flags derived from its
    configuration (``--help`` lists them)."""
    import importlib

    command = " ".join(["ether-diffusion", "bench", str(kind), *argv])
    try:
        module = importlib.import_module(BENCHES[kind], __package__)
        module.main(module.parse_args(argv, prog=f"ether-diffusion bench {kind}"), command=command)
    except KeyboardInterrupt:
        # Ctrl-C: every file the benchmark writes is atomic and its runs resume from their last checkpoint (the
        # run's claim is released on the way out), so the interruption is a state to resume from, not a crash
        print(f"stopped; rerun the same command to resume (bench {kind} keeps its finished runs and checkpoints)",
              file=sys.stderr)  # fmt: skip
        return 130
    return 0


def _tool(group: str, verb: str, argv: list[str]) -> int:
    """Run the ``TOOLS`` entry ``group verb`` with ``argv``."""
    import importlib

    module = importlib.import_module(TOOLS[group, verb][0], __package__)
    module.main(module.parse_args(argv, prog=f"ether-diffusion {group} {verb}"))
    return 0


def _make_subjects(args) -> int:
    from .world.heldout import SUBJECT_SPECS
    from .world.subjects import write_subject

    for spec in SUBJECT_SPECS:
        print(write_subject(spec, args.output_dir))
    return 0


def _studio(argv: list[str]) -> int:
    """Run the Gradio studio (``ether_diffusion.studio.ui``, the package's one module that needs gradio) with
    ``argv``."""
    try:
        from .studio.ui import main as studio_main
    except ModuleNotFoundError as err:
        if err.name != "gradio":
            raise
        print("error: the studio needs gradio: pip install 'ether-diffusion[app]'", file=sys.stderr)
        return 2
    return studio_main(argv, prog="ether-diffusion studio")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ether-diffusion", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "train",
        help="DreamBooth with ETHER on SD 1.x/2.x, SDXL, SD3 or Flux (the flags of diffusers' train_dreambooth_lora "
        "scripts for that model; see train --help)",
        add_help=False,
    )

    commands.add_parser(
        "train-control",
        help="controllable synthesis: condition encoder + ETHER (flags of train_controlnet; see train-control --help)",
        add_help=False,
    )

    sample = commands.add_parser("sample", help="generate PNGs with one or more adapters")
    _add_model_arguments(sample)
    sample.add_argument(
        "--adapter", action="append", default=[], type=_adapter_spec, help="adapter file or folder, optionally :weight"
    )
    sample.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    sample.add_argument("--negative_prompt", default=None, help="what to steer away from")
    sample.add_argument("--seed", type=int, action="append", default=None, help="a seed; repeat for several (0)")
    sample.add_argument("--steps", type=_whole(1, 1000), default=25, help="denoising steps (1 to 1000)")
    sample.add_argument("--guidance_scale", type=_finite, default=5.0, help="classifier-free guidance scale")
    sample.add_argument("--size", type=_whole(8, 8192), default=None, help="height and width (default: the model's)")
    sample.add_argument("--compare", action="store_true", help="also save the base model's image for each seed")
    sample.add_argument("--output_dir", default="samples", help="where the PNGs go (NN_seedS_adapted|base.png)")
    sample.set_defaults(run=_sample)

    fuse = commands.add_parser(
        "fuse", help="save the model with adapters fused into its weights (a diffusers folder or one checkpoint file)"
    )
    _add_model_arguments(fuse)
    fuse.add_argument(
        "--adapter",
        action="append",
        required=True,
        type=_adapter_spec,
        help="adapter file or folder, optionally :weight; repeat to stack",
    )
    where = fuse.add_mutually_exclusive_group(required=True)
    where.add_argument("--output_dir", help="write a diffusers folder (StableDiffusionPipeline.from_pretrained)")
    where.add_argument(
        "--single_file", help="write one .safetensors in the original SD 1.x layout (A1111, Forge, ComfyUI)"
    )
    fuse.add_argument(
        "--dtype",
        choices=["fp16", "bf16", "fp32"],
        default=None,
        help="dtype of the written weights (default: as loaded)",
    )
    fuse.add_argument("--overwrite", action="store_true", help="replace an existing output")
    fuse.set_defaults(run=_fuse)

    export = commands.add_parser(
        "export", help="write adapters as one exact LoRA file for diffusers, ComfyUI, A1111, Forge (docs/export.md)"
    )
    export.add_argument(
        "adapter",
        nargs="+",
        type=_adapter_spec,
        help="adapter file or folder, optionally :strength; several are composed in order",
    )
    _add_model_arguments(
        export, "the base model the adapters were trained on; default: the one the adapter file records"
    )
    export.add_argument(
        "--format",
        choices=["diffusers", "kohya"],
        required=True,
        help="diffusers: pipe.load_lora_weights keys (SD, SDXL, SD3, Flux); kohya: lora_unet_/lora_te_ keys for A1111, "
        "Forge, ComfyUI (SD, SDXL; Flux in sd-scripts' names; no SD3)",
    )
    export.add_argument("--output", required=True, help="the .safetensors file to write (or an existing folder)")
    export.add_argument(
        "--dtype",
        choices=["fp16", "bf16", "fp32"],
        default="fp32",
        help="the file's dtype (default fp32: exact to float rounding; fp16 halves a file of well under 1 MB and "
        "rounds each weight change by about 5e-4 of its size)",
    )
    export.add_argument(
        "--strength",
        type=_finite,
        default=1.0,
        help="ETHER strength of adapters given without :strength (two-sided ETHER+ is not linear in it: export "
        "at the strength you want and load the LoRA at weight 1)",
    )
    export.add_argument(
        "--unet_only",
        action="store_true",
        help="export a controllable-synthesis file's UNet adapters without its condition encoder (not a LoRA)",
    )
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(run=_export)

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
    bench = commands.add_parser(
        "bench",
        help="the paper's benchmarks: dreambooth (DINO, CLIP-I, CLIP-T), control (mIoU), export-world; speed and sizes",
    )
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    bench_commands.add_parser(
        "dreambooth",
        help="train, sample and score every subject × method × seed of a DreamBooth-layout dataset (see --help)",
        add_help=False,
    )
    bench_commands.add_parser(
        "control", help="train, sample and score every method × seed of a control dataset folder (see --help)",
        add_help=False,
    )  # fmt: skip
    export_world = bench_commands.add_parser(
        "export-world", help="write the tiny world as benchmark data: DreamBooth layout, or --control folders"
    )
    export_world.add_argument("--output", required=True, help="the folder to write")
    export_world.add_argument(
        "--control", choices=["segmentation", "edges"], default=None,
        help="write control training and held-out folders (train/, eval/) instead of the DreamBooth subjects",
    )  # fmt: skip
    export_world.add_argument("--train_scenes", type=int, default=2000, help="--control: training rows")
    export_world.add_argument("--eval_scenes", type=int, default=64, help="--control: held-out rows (with masks)")
    export_world.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    export_world.set_defaults(run=_export_world)
    world = commands.add_parser("world", help="the tiny world: pretrain its model, train its evaluator, evaluate")
    world_commands = world.add_subparsers(dest="world_command", required=True)
    groups = {"bench": bench_commands, "world": world_commands}
    for (group, verb), (_, text) in TOOLS.items():
        groups[group].add_parser(verb, help=f"{text} (see --help)", add_help=False)
    make_subjects = world_commands.add_parser("make-subjects", help="write the DreamBooth subjects of the tiny world")
    make_subjects.add_argument("--output_dir", default="assets/subjects", help="where the subject folders go")
    make_subjects.set_defaults(run=_make_subjects)
    commands.add_parser(
        "studio",
        help="the Gradio app (needs the app extra): train, sample, manage adapters (--host 127.0.0.1, --port, --model: "
        "default the tiny model of a checkout, --workdir; --auth/--auth_file: a login, needed beyond the loopback)",
        add_help=False,
    )
    return parser


def jobs_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ether-diffusion train --jobs",
        description="train the DreamBooth runs of a jobs file (TOML: [defaults] and one [[job]] per run, keys are "
        "train's flags; docs/training.md) side by side, --pack at a time, each into its own output folder. Under "
        "`accelerate launch --num_processes N` each process trains every N-th job",
    )
    parser.add_argument("--jobs", required=True, help="the jobs file")
    parser.add_argument(
        "--pack", type=_whole(1, 64), default=None,
        help="runs trained in one step (default: the file's pack, else the measured default of docs/performance.md)",
    )  # fmt: skip
    parser.add_argument(
        "--resume_from_checkpoint", choices=("latest",), default=None,
        help="continue a killed packed run from its latest checkpoint (finished jobs are kept)",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def train_jobs(argv: list[str]) -> int:
    """``train --jobs FILE``: every job checked, then trained packed (``training/pack.py``)."""
    args = jobs_parser().parse_args(argv)
    from .jobs import JobsFileError, load_jobs
    from .training.pack import DEFAULT_PACK, PackedTrainer

    try:
        found = load_jobs(args.jobs)
    except JobsFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    pack = args.pack or found.pack or DEFAULT_PACK
    trainer = PackedTrainer(found.jobs, pack, found.state_dir, resume=bool(args.resume_from_checkpoint),
                            quiet=args.quiet)  # fmt: skip
    result = trainer.train()
    return 1 if result.diverged else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["train"] and any(a == "--jobs" or a.startswith("--jobs=") for a in argv[1:]):
            return train_jobs(argv[1:])
        if argv[:1] and argv[0] in TRAIN_VERBS:
            from . import registry

            kind = TRAIN_VERBS[argv[0]]
            config = registry.parse_args(kind, argv[1:], prog=f"ether-diffusion {argv[0]}")  # the model's family's
            registry.train(config)  # the loop prints where the adapter, checkpoints and images went
            return 0
        if argv[:1] == ["studio"]:
            return _studio(argv[1:])
        if argv[:1] == ["bench"] and argv[1:2] and argv[1] in BENCHES:
            return _bench(argv[1], argv[2:])
        if tuple(argv[:2]) in TOOLS:
            return _tool(argv[0], argv[1], argv[2:])
        args = build_parser().parse_args(argv)
        return args.run(args)
    # ValueError covers AdapterFileError and AdapterMismatchError; OSError a missing file, a full disk, a permission
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
