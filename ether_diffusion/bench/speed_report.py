"""The markdown report of ``bench speed``: one table per section of the result dict that ``speed.main`` returns."""

from __future__ import annotations


def _range(stats: dict, scale: float = 1.0, digits: int = 1) -> str:
    return f"{stats['min'] * scale:.{digits}f}–{stats['max'] * scale:.{digits}f}"


def markdown(result) -> str:
    lines = [
        f"# Speed benchmark ({result['device']}, {result['dtype']})",
        "",
        f"Machine: {result['machine']}  ",
        f"Command: `{result['command']}`  ",
        f"{result['date']}; {result['rounds']} interleaved rounds (every round runs every variant once, the order "
        f"rotated), {result['steps_per_visit']} timed step(s) per visit after {result['warmup']} warm-up step(s); "
        f"clock: {result['clock']}; medians with min–max over rounds; a ratio is taken within each round. "
        f"Total {result.get('elapsed_s', 0):.0f} s.",
        "",
    ]
    train = [row for section in ("training", "sdxl") for row in result.get(section, [])]
    if train:
        lines += [
            "## Training step (forward, backward, AdamW step)",
            "",
            "| model | latents | batch | variant | trainable | median ms | min–max ms | × floor | × floor min–max "
            "| peak extra MB | × floor mem |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in train:
            floor = next(
                r
                for r in train
                if (r["model"], r["size"], r["batch"], r["key"]) == (row["model"], row["size"], row["batch"], "floor")
            )
            floor_mb = floor["peak_extra_mb"]["median"]
            mem = row["peak_extra_mb"]["median"] / floor_mb if floor_mb > 0 else float("nan")
            model = row["model"] + (" (gradient checkpointing)" if row["checkpointing"] else "")
            lines.append(
                f"| {model} | {row['size']}² | {row['batch']} | {row['variant']} | {row['trainable']:,} | "
                f"{row['time']['median'] * 1e3:.1f} | {_range(row['time'], 1e3)} | {row['ratio']['median']:.3f} | "
                f"{_range(row['ratio'], digits=3)} | {row['peak_extra_mb']['median']:.0f} | {mem:.2f} |"
            )
    sync = result.get("sync", [])
    if sync:
        lines += ["", "## Host-device synchronisation", "", "| variant | what ran | result |", "|---|---|---|"]
        lines += [f"| {row['variant']} | {row['check']} | {row['result']} |" for row in sync]
    infer = result.get("inference", [])
    if infer:
        lines += [
            "",
            "## Sampling (DDIM, classifier-free guidance)",
            "",
            "| variant | latents | prompts | steps | median s | min–max s | ratio | ratio min–max |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in infer:
            lines.append(
                f"| {row['variant']} | {row['size']}² | {row['batch']} | {row['steps']} | {row['time']['median']:.3f} "
                f"| {_range(row['time'], digits=3)} | {row['ratio']['median']:.3f} {row['ratio_to']} | "
                f"{_range(row['ratio'], digits=3)} |"
            )
    whole = result.get("compiled", [])
    if whole:
        lines += ["", "## Training step with the transformer blocks under torch.compile (fullgraph)", ""]
        lines += [
            "| model | latents | batch | variant | median ms | min–max ms | × floor | × floor min–max | first step s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {row['model']} | {row['size']}² | {row['batch']} | {row['variant']} "
            f"| {row['time']['median'] * 1e3:.1f} "
            f"| {_range(row['time'], 1e3)} | {row['ratio']['median']:.3f} | {_range(row['ratio'], digits=3)} "
            f"| {row['compile_s']:.0f} |"
            for row in whole
        ]
    compiled = result.get("compile", [])
    if compiled:
        lines += ["", "## torch.compile(fullgraph=True) of the adapted layers", ""]
        lines += [
            "| variant | backend | distinct layer shapes | forward + backward vs eager | result |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {row['variant']} | {row['backend']} | {row['layers']} | {row['max_error']} | {row['result']} |"
            for row in compiled
        ]
    captured = [row for row in result.get("captured", []) if "variant" in row]
    if captured:
        lines += ["", "## Training step captured as a CUDA graph (--cuda_graphs)", ""]
        lines += [
            "| model | latents | batch | variant | median ms | min–max ms | × eager floor | min–max | first step s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {row['model']} | {row['size']}² | {row['batch']} | {row['variant']} "
            f"| {row['time']['median'] * 1e3:.1f} | {_range(row['time'], 1e3)} | {row['ratio']['median']:.3f} "
            f"| {_range(row['ratio'], digits=3)} | {row['first_s']:.1f} |"
            for row in captured
        ]
        lines += [
            f"\n{row['check']}: largest difference {row['max_difference']:.2e} (training moved the vectors by up to "
            f"{row['max_change']:.2e})"
            for row in result.get("captured", [])
            if "check" in row
        ]
    packed = result.get("pack", [])
    if packed:
        lines += ["", "## K runs per training step (`train --jobs`): adapters per hour", ""]
        lines += [
            "| model | latents | K | batch | median ms | min–max ms | adapters / hour | × K=1 | × K=1 min–max | +MB |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {row['model']} | {row['size']}² | {row['pack']} | {row['batch']} | {row['time']['median'] * 1e3:.1f} "
            f"| {_range(row['time'], 1e3)} | {row['per_hour']:,.0f} | {row['ratio']['median']:.2f} "
            f"| {_range(row['ratio'], digits=2)} | {row['peak_extra_mb']['median']:.0f} |"
            for row in packed
        ]
    errors = result.get("errors", {})
    if errors:
        lines += ["", "## Sections that failed", ""] + [f"- {name}: `{text}`" for name, text in errors.items()]
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
