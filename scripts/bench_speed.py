"""Speed and memory of ETHER against the frozen-model floor and its peers, measured side by side in one process.

    python scripts/bench_speed.py                 # SD-1.5 UNet, fp32 CPU, latents 16² and 32², batch 1 and 4
    python scripts/bench_speed.py --full          # adds 64² latents
    python scripts/bench_speed.py --quick         # tiny UNet, one repeat: a smoke test (CI), not a measurement
    python scripts/bench_speed.py --device cuda   # bf16 autocast on a GPU

Every number is a median over ``--repeats`` timed runs after a warm-up; ratios divide medians taken in this run.
Peak memory is what a training step adds on top of the loaded model (CPU: peak resident set after resetting the
kernel's high-water mark; GPU: ``max_memory_allocated``). Writes a markdown report and a JSON file.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ether_diffusion import (
    EtherConfig,
    count_parameters,
    eject,
    inject,
    load_adapter,
    mark_only_adapters_trainable,
    merge_adapters,
    mixed_batch,
    save_adapter,
    set_active_adapters,
    unmerge_adapters,
)
from ether_diffusion.config import TARGET_PRESETS

TARGETS = list(TARGET_PRESETS["unet-attention"])


# --- measuring ------------------------------------------------------------------------------------------------


class Meter:
    def __init__(self, device: torch.device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def reset_peak(self) -> int:
        """Start a peak-memory window; returns the current footprint in bytes."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed blocks back, so RSS tracks live tensors
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark VmHWM to the current RSS
        return self._status("VmRSS")

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated()
        return self._status("VmHWM")

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def time(self, fn, repeats: int, warmup: int = 1) -> list[float]:
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return times


# --- the variants -------------------------------------------------------------------------------------------


def target_modules(unet: nn.Module) -> list[tuple[str, nn.Linear]]:
    config = EtherConfig(target_modules=TARGETS)
    return [(n, m) for n, m in unet.named_modules() if n and config.is_target(n) and isinstance(m, nn.Linear)]


def _set(model: nn.Module, path: str, module: nn.Module):
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@contextlib.contextmanager
def floor_variant(unet):
    """The frozen UNet with one trainable scalar scaling each targeted layer's output: the whole backward runs."""
    unet.requires_grad_(False)
    scales, handles = [], []
    for _, module in target_modules(unet):
        scale = nn.Parameter(torch.ones((), device=module.weight.device))
        scales.append(scale)
        handles.append(module.register_forward_hook(lambda m, i, out, s=scale: out * s.to(out.dtype)))
    try:
        yield scales
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def ether_variant(unet, method: str, n_blocks: int):
    inject(unet, EtherConfig(method=method, n_blocks=n_blocks, target_modules=TARGETS), "bench")
    params = mark_only_adapters_trainable(unet)
    for p in params:
        p.data = p.data.float()  # trainables in fp32 when the frozen model runs in low precision
    try:
        yield params
    finally:
        eject(unet)


class DenseEtherLinear(nn.Module):
    """ETHER as the official code computes it: dense (n, b, b) reflections and a rebuilt weight every forward."""

    def __init__(self, base: nn.Linear, n_blocks: int):
        super().__init__()
        self.base = base
        self.n_blocks = n_blocks
        self.u = nn.Parameter(torch.randn(n_blocks, base.in_features // n_blocks, device=base.weight.device))

    def forward(self, x):
        n, b = self.u.shape
        u = self.u / self.u.norm(dim=-1, keepdim=True)
        eye = torch.eye(b, device=u.device, dtype=u.dtype)
        reflections = eye - 2 * torch.einsum("ni,nj->nij", u, u)  # (n, b, b)
        weight = self.base.weight.view(-1, n, b).to(u.dtype)
        new_weight = torch.einsum("onb,nbc->onc", weight, reflections).reshape(self.base.weight.shape)
        return F.linear(x, new_weight.to(x.dtype), self.base.bias)


@contextlib.contextmanager
def dense_ether_variant(unet, n_blocks: int = 1):
    originals = target_modules(unet)
    unet.requires_grad_(False)
    wrappers = [DenseEtherLinear(m, n_blocks) for _, m in originals]
    for (path, _), wrapper in zip(originals, wrappers):
        _set(unet, path, wrapper)
    try:
        yield [w.u for w in wrappers]
    finally:
        for path, module in originals:
            _set(unet, path, module)


@contextlib.contextmanager
def peft_variant(unet, kind: str):
    import peft

    configs = {
        "hra": lambda: peft.HRAConfig(r=1, target_modules=TARGETS, init_weights=False),
        "lora": lambda: peft.LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights="gaussian"),
        "oft": lambda: peft.OFTConfig(target_modules=TARGETS),
        "boft": lambda: peft.BOFTConfig(target_modules=TARGETS),
    }
    originals = dict(target_modules(unet))
    unet.requires_grad_(False)
    peft.inject_adapter_in_model(configs[kind](), unet, adapter_name="bench")
    params = [p for n, p in unet.named_parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    try:
        yield params
    finally:
        for path, module in originals.items():
            _set(unet, path, module)


def training_variants(skip_peers: bool):
    variants = {
        "floor (frozen + 1 scalar/layer)": lambda u: floor_variant(u),
        "ETHER n=1": lambda u: ether_variant(u, "ether", 1),
        "ETHER n=4": lambda u: ether_variant(u, "ether", 4),
        "ETHER n=16": lambda u: ether_variant(u, "ether", 16),
        "ETHER+ two-sided n=1": lambda u: ether_variant(u, "ether_plus", 1),
        "ETHER+ two-sided n=4": lambda u: ether_variant(u, "ether_plus", 4),
        "official-style dense ETHER n=1": lambda u: dense_ether_variant(u, 1),
    }
    if not skip_peers:
        variants.update(
            {
                "PEFT HRA r=1": lambda u: peft_variant(u, "hra"),
                "PEFT LoRA r=4": lambda u: peft_variant(u, "lora"),
                "PEFT OFT (default)": lambda u: peft_variant(u, "oft"),
                "PEFT BOFT (default)": lambda u: peft_variant(u, "boft"),
            }
        )
    return variants


# --- the measurements ---------------------------------------------------------------------------------------


def build_unet(quick: bool, device, dtype):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if quick:
        unet = UNet2DConditionModel(
            sample_size=8,
            layers_per_block=1,
            block_out_channels=(32, 64),
            cross_attention_dim=64,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=8,
            norm_num_groups=16,
        )
    else:
        unet = UNet2DConditionModel(cross_attention_dim=768)  # the SD-1.5 architecture, random weights
    return unet.to(device=device, dtype=dtype)


def autocast(device, dtype):
    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def bench_training(unet, args, meter, device, dtype):
    rows = []
    context_dim = unet.config.cross_attention_dim
    for size in args.sizes:
        for batch in args.batches:
            generator = torch.Generator().manual_seed(0)
            latents = torch.randn(batch, 4, size, size, generator=generator).to(device)
            context = torch.randn(batch, 77, context_dim, generator=generator).to(device)
            timesteps = torch.randint(0, 1000, (batch,), generator=generator).to(device)
            target = torch.randn(batch, 4, size, size, generator=generator).to(device)
            for name, make in training_variants(args.skip_peers).items():
                with make(unet) as params:
                    optimizer = torch.optim.AdamW(params, lr=1e-4)

                    def step(latents=latents, timesteps=timesteps, context=context, target=target, opt=optimizer):
                        with autocast(device, dtype):
                            prediction = unet(latents, timesteps, context).sample
                        loss = F.mse_loss(prediction.float(), target)
                        loss.backward()
                        opt.step()
                        opt.zero_grad(set_to_none=True)

                    step()  # warm-up (also creates the optimizer state)
                    base_memory = meter.reset_peak()
                    times = meter.time(step, args.repeats, warmup=0)
                    peak = meter.peak() - base_memory
                    trainable = sum(p.numel() for p in params)
                rows.append(
                    dict(
                        size=size,
                        batch=batch,
                        variant=name,
                        median_s=statistics.median(times),
                        times=times,
                        peak_extra_mb=peak / 2**20,
                        trainable=trainable,
                    )
                )
                print(
                    f"  train {size}² b{batch} {name:<32} {statistics.median(times) * 1e3:9.1f} ms  "
                    f"+{peak / 2**20:8.0f} MB  {trainable:>10,} params",
                    flush=True,
                )
    return rows


def sample_loop(unet, latents, context, steps, device, dtype):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler.set_timesteps(steps)
    uncond = torch.zeros_like(context)
    x = latents
    with torch.no_grad(), autocast(device, dtype):
        for t in scheduler.timesteps:
            noise = unet(torch.cat([x, x]), t, torch.cat([uncond, context])).sample
            noise_uncond, noise_cond = noise.chunk(2)
            x = scheduler.step(noise_uncond + 7.5 * (noise_cond - noise_uncond), t, x).prev_sample
    return x


def randomized(unet, name, method, seed):
    inject(unet, EtherConfig(method=method, target_modules=TARGETS), name, activate=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        from ether_diffusion import adapter_parameters

        for p in adapter_parameters(unet, name):
            p.copy_(torch.randn(p.shape, generator=generator).to(p))


def bench_inference(unet, args, meter, device, dtype):
    unet.requires_grad_(False)
    size = args.sizes[0]
    context_dim = unet.config.cross_attention_dim
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, size, size, generator=generator).to(device, dtype)
    context = torch.randn(1, 77, context_dim, generator=generator).to(device, dtype)
    rows = []

    def record(name, steps, batch, fn):
        times = meter.time(fn, args.repeats)
        rows.append(
            dict(variant=name, steps=steps, batch=batch, size=size, median_s=statistics.median(times), times=times)
        )
        print(f"  sample {name:<40} {statistics.median(times):8.3f} s", flush=True)

    steps = args.steps
    record("base", steps, 1, lambda: sample_loop(unet, latents, context, steps, device, dtype))
    for method, label in (("ether", "ETHER"), ("ether_plus", "ETHER+ two-sided")):
        randomized(unet, "one", method, 1)
        set_active_adapters(unet, ["one"])
        record(f"{label} unfused", steps, 1, lambda: sample_loop(unet, latents, context, steps, device, dtype))
        merge_adapters(unet)
        record(f"{label} fused", steps, 1, lambda: sample_loop(unet, latents, context, steps, device, dtype))
        unmerge_adapters(unet)
        eject(unet)

    # 8 prompts, 8 adapters in one batch vs the same batch with one adapter
    batch = 8
    names = [f"user{i}" for i in range(batch)]
    for i, name in enumerate(names):
        randomized(unet, name, "ether_plus", 10 + i)
    latents8 = torch.randn(batch, 4, size, size, generator=generator).to(device, dtype)
    context8 = torch.randn(batch, 77, context_dim, generator=generator).to(device, dtype)
    mixed_steps = args.mixed_steps
    set_active_adapters(unet, [names[0]])
    record(
        f"batch {batch}, one adapter",
        mixed_steps,
        batch,
        lambda: sample_loop(unet, latents8, context8, mixed_steps, device, dtype),
    )

    def mixed():
        with mixed_batch(unet, names):
            sample_loop(unet, latents8, context8, mixed_steps, device, dtype)

    record(f"batch {batch}, {batch} different adapters", mixed_steps, batch, mixed)
    eject(unet)
    return rows


def bench_adapters(unet, args, meter):
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for method, label in (("ether", "ETHER"), ("ether_plus", "ETHER+ two-sided")):
            randomized(unet, "a", method, 1)
            path = save_adapter(Path(folder) / f"{method}.safetensors", {"unet": unet}, "a")
            params = count_parameters(unet, "a")
            eject(unet)
            load_times = []
            for _ in range(args.repeats * 2):
                start = time.perf_counter()
                load_adapter(path, {"unet": unet}, "loaded")  # read, validate, inject, copy, activate
                load_times.append(time.perf_counter() - start)
                eject(unet)
            load_adapter(path, {"unet": unet}, "x")
            load_adapter(path, {"unet": unet}, "y")
            switch_times = []
            for i in range(args.repeats * 2):
                start = time.perf_counter()
                set_active_adapters(unet, ["x" if i % 2 else "y"])
                switch_times.append(time.perf_counter() - start)
            eject(unet)
            rows.append(
                dict(
                    method=label,
                    parameters=params,
                    file_bytes=path.stat().st_size,
                    load_ms=statistics.median(load_times) * 1e3,
                    switch_ms=statistics.median(switch_times) * 1e3,
                )
            )
            print(
                f"  adapter {label:<18} {path.stat().st_size / 1024:8.0f} KiB  load {rows[-1]['load_ms']:.1f} ms  "
                f"switch {rows[-1]['switch_ms']:.2f} ms",
                flush=True,
            )
    return rows


# --- report -------------------------------------------------------------------------------------------------


def machine_description(device) -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if device.type == "cuda":
        text = f"{torch.cuda.get_device_name(device)}; host {text}"
    return text


def markdown(result) -> str:
    lines = [
        f"# Speed benchmark ({result['device']}, {result['dtype']})",
        "",
        f"Machine: {result['machine']}  ",
        f"Command: `{result['command']}`  ",
        f"Model: {result['model']}; medians of {result['repeats']} runs after a warm-up; {result['date']}",
        "",
    ]
    train = result.get("training", [])
    if train:
        lines += [
            "## Training step (forward, backward, AdamW step)",
            "",
            "| latents | batch | variant | trainable | median ms | × floor | peak extra MB | × floor mem |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in train:
            floor = next(
                r
                for r in train
                if r["size"] == row["size"] and r["batch"] == row["batch"] and r["variant"].startswith("floor")
            )
            mem_ratio = row["peak_extra_mb"] / floor["peak_extra_mb"] if floor["peak_extra_mb"] > 0 else float("nan")
            lines.append(
                f"| {row['size']}² | {row['batch']} | {row['variant']} | {row['trainable']:,} | "
                f"{row['median_s'] * 1e3:.1f} | {row['median_s'] / floor['median_s']:.3f} | "
                f"{row['peak_extra_mb']:.0f} | {mem_ratio:.2f} |"
            )
    infer = result.get("inference", [])
    if infer:
        base = next(r for r in infer if r["variant"] == "base")
        one = next((r for r in infer if "one adapter" in r["variant"]), None)
        lines += [
            "",
            "## Sampling (DDIM, classifier-free guidance)",
            "",
            "| variant | latents | prompts | steps | median s | ratio |",
            "|---|---|---|---|---|---|",
        ]
        for row in infer:
            ref, label = (base, "× base") if row["batch"] == 1 else (one, "× one adapter")
            lines.append(
                f"| {row['variant']} | {row['size']}² | {row['batch']} | {row['steps']} | "
                f"{row['median_s']:.3f} | {row['median_s'] / ref['median_s']:.3f} {label} |"
            )
    adapters = result.get("adapters", [])
    if adapters:
        lines += [
            "",
            "## Adapter files",
            "",
            "| method | parameters | file KiB | load + activate ms | switch ms |",
            "|---|---|---|---|---|",
        ]
        for row in adapters:
            lines.append(
                f"| {row['method']} | {row['parameters']:,} | {row['file_bytes'] / 1024:.0f} | "
                f"{row['load_ms']:.1f} | {row['switch_ms']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny UNet, one repeat, small sizes: a smoke test")
    parser.add_argument("--full", action="store_true", help="also measure 64×64 latents")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default: fp32 on CPU, bf16 autocast on GPU"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="latent sizes (default 16 32)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=25, help="sampling steps for base/unfused/fused")
    parser.add_argument("--mixed_steps", type=int, default=5, help="sampling steps for the batch-of-8 comparison")
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["training", "inference", "adapters"],
        choices=["training", "inference", "adapters"],
    )
    parser.add_argument("--skip_peers", action="store_true", help="skip the PEFT variants")
    parser.add_argument("--output_dir", default="docs/benchmarks", help="where speed_<device>.md/.json go")
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "fp32" if args.device == "cpu" else "bf16"
    if args.sizes is None:
        args.sizes = [8] if args.quick else [16, 32] + ([64] if args.full else [])
    if args.quick:
        args.repeats, args.batches, args.steps, args.mixed_steps = 1, [1], 2, 2
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(args) -> dict:
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    # on GPU the frozen weights are cast to the low-precision dtype and trainables kept in fp32 (diffusers' way)
    unet = build_unet(args.quick, device, torch.float32 if device.type == "cpu" else dtype)
    meter = Meter(device)
    result = dict(
        device=str(device),
        dtype=args.dtype,
        machine=machine_description(device),
        command="python " + " ".join([sys.argv[0], *sys.argv[1:]]) if sys.argv else "",
        model="tiny UNet (smoke test)" if args.quick else "SD-1.5 UNet2DConditionModel(cross_attention_dim=768)",
        repeats=args.repeats,
        date=time.strftime("%Y-%m-%d"),
    )
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"speed_{device.type}" + ("_quick" if args.quick else "")
    sections = {
        "training": lambda: bench_training(unet, args, meter, device, dtype),
        "inference": lambda: bench_inference(unet, args, meter, device, dtype),
        "adapters": lambda: bench_adapters(unet, args, meter),
    }
    for name in args.sections:  # the report is rewritten after each section: a cut-short run keeps what it measured
        result[name] = sections[name]()
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
        (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main(parse_args())
