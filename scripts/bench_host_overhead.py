"""Host cost of an adapted layer: what each adapter adds per layer when the arithmetic is negligible.

On a GPU at SD-1.5 sizes the training step waits for the host (issue 18: the floor costs about the same at batch 1 and
4), so an adapter's cost is the host work it adds per layer: Python, dispatch, autograd. This measures that work on
any machine: a chain of ``--layers`` Linear(width, width) layers on ``--tokens`` tokens (tiny matrices), forward and
backward, for the floor (one trainable scalar per layer), ETHER, ETHER+ two-sided and PEFT LoRA r=4, in interleaved
rounds (every round runs every variant once, the order rotated), timed in process CPU time with one thread.

    python scripts/bench_host_overhead.py                      # 128 layers of width 64, 4 tokens, 9 rounds
    python scripts/bench_host_overhead.py --width 320 --rounds 15
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from ether_diffusion import EtherConfig, inject
from ether_diffusion.inject import adapter_parameters

VARIANTS = ("floor", "ether", "ether_plus", "lora")


def build(kind: str, layers: int, width: int) -> nn.Module:
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


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per visit")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    kinds = ["floor", *[k for k in args.variants if k != "floor"]]
    models = {kind: build(kind, args.layers, args.width) for kind in kinds}
    x = torch.randn(args.tokens, args.width)

    def step(kind):
        models[kind](x).square().mean().backward()

    times = {kind: [] for kind in kinds}
    for r in range(args.rounds):
        for kind in kinds[r % len(kinds) :] + kinds[: r % len(kinds)]:
            step(kind)  # warm-up
            started = time.process_time()
            for _ in range(args.steps):
                step(kind)
            times[kind].append((time.process_time() - started) / args.steps)
    per_layer = {}
    print(f"{args.layers} layers of width {args.width}, {args.tokens} tokens, {args.rounds} interleaved rounds, "
          f"torch {torch.__version__}, CPU time, 1 thread")  # fmt: skip
    print("| variant | step ms (median) | µs per layer over the floor (median of per-round differences) |")
    print("|---|---|---|")
    for kind in kinds:
        extra = [(t - f) / args.layers * 1e6 for t, f in zip(times[kind], times["floor"])]
        per_layer[kind] = statistics.median(extra)
        print(f"| {kind} | {statistics.median(times[kind]) * 1e3:.2f} | {per_layer[kind]:.1f} "
              f"({min(extra):.1f}–{max(extra):.1f}) |")  # fmt: skip
    return per_layer


if __name__ == "__main__":
    main()
