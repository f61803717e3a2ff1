"""Host cost of an adapted layer: what each adapter adds per layer when the arithmetic is negligible.

On a GPU at SD-1.5 sizes the training step waits for the host (docs/performance.md: the floor costs about the same at
batch 1 and 4), so an adapter's cost is the host work it adds per layer: Python, dispatch, autograd. This measures that
work on any machine: a chain of ``--layers`` Linear(width, width) layers on ``--tokens`` tokens (tiny matrices), forward
and backward, for the floor (one trainable scalar per layer), ETHER, ETHER+ two-sided and PEFT LoRA r=4, in interleaved
rounds (every round runs every variant once, the order rotated), timed in process CPU time with one thread.

    ether-diffusion bench host                      # 128 layers of width 64, 4 tokens, 9 rounds
    ether-diffusion bench host --width 320 --rounds 15
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from ..config import EtherConfig
from ..inject import adapter_parameters, inject
from .timing import interleaved

VARIANTS = ("floor", "ether", "ether_plus", "lora")


def build(kind: str, layers: int, width: int) -> nn.Module:
    """``layers`` frozen Linear(width, width) in a chain, adapted by ``kind``; only the adapter trains."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    model.requires_grad_(False)
    names = [str(i) for i in range(layers)]
    if kind == "floor":
        for layer in model:
            scale = nn.Parameter(torch.ones(()))
            layer.register_parameter("floor_scale", scale)
            layer.register_forward_hook(lambda module, args, out: out * module.floor_scale)
    elif kind in ("ether", "ether_plus"):
        inject(model, EtherConfig(method=kind, target_modules=names), "bench")
        for p in adapter_parameters(model):
            p.requires_grad_(True)
    else:
        import peft

        config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=names, init_lora_weights="gaussian")
        model = peft.inject_adapter_in_model(config, model)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    return model


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per visit")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = parser.parse_args(argv)
    for name in ("layers", "width", "tokens", "rounds", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def main(args: argparse.Namespace) -> dict[str, float]:
    """Print the table; returns each variant's median extra µs per layer over the floor (the floor's is 0)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU time of one thread is the host work itself, whatever else the machine runs
    try:
        times = _measure(args)
    finally:
        torch.set_num_threads(threads)
    per_layer = {}
    print(f"{args.layers} layers of width {args.width}, {args.tokens} tokens, {args.rounds} interleaved rounds, "
          f"torch {torch.__version__}, CPU time, 1 thread")  # fmt: skip
    print("| variant | step ms (median) | µs per layer over the floor (median of per-round differences) |")
    print("|---|---|---|")
    for kind, kind_times in times.items():
        extra = [(t - f) / args.layers * 1e6 for t, f in zip(kind_times, times["floor"])]
        per_layer[kind] = statistics.median(extra)
        print(f"| {kind} | {statistics.median(kind_times) * 1e3:.2f} | {per_layer[kind]:.1f} "
              f"({min(extra):.1f}–{max(extra):.1f}) |")  # fmt: skip
    return per_layer


def _measure(args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds per step of every variant, one per round, rounds interleaved."""
    kinds = ["floor", *[k for k in args.variants if k != "floor"]]
    models = {kind: build(kind, args.layers, args.width) for kind in kinds}
    x = torch.randn(args.tokens, args.width)

    def step(kind):
        models[kind](x).square().mean().backward()

    def visit(kind):
        step(kind)  # warm-up
        started = time.process_time()
        for _ in range(args.steps):
            step(kind)
        return (time.process_time() - started) / args.steps

    return interleaved(kinds, args.rounds, visit)
