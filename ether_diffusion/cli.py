"""The ``ether-diffusion`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from .io import read_adapter_file


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
    for key, value in summary["extra"].items():
        print(f"{key:<12} {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ether-diffusion", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="summarise an adapter file (validated strictly)")
    inspect.add_argument("adapter", help="an adapter .safetensors file or a folder holding one")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.set_defaults(run=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
