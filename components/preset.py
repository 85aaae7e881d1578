"""Apply a preset (a YAML file of params overrides) as `dvc exp run -S` arguments, or into params.yaml.

    dvc exp run $(python -m components.preset presets/real_lite0.yaml)
    python -m components.preset presets/tiny.yaml --write    # edit params.yaml in place

The merged params are validated with every stage's own config first, so a
preset with an unknown key or a bad value fails here, naming the key.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import yaml

from components.params import ParamsError, load_yaml, read_params


def merge(base: Mapping, overrides: Mapping, prefix: str = "") -> dict:
    """Deep-merge `overrides` into `base`; a key that `base` lacks is refused."""
    merged = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        path = f"{prefix}{key}"
        if key not in merged:
            raise ParamsError(f"{path}: unknown key; allowed keys: {', '.join(sorted(map(str, merged)))}")
        if isinstance(value, Mapping) and isinstance(merged[key], Mapping) and merged[key]:
            merged[key] = merge(merged[key], value, f"{path}.")
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def leaves(overrides: Mapping, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in overrides.items():
        if isinstance(value, Mapping) and value:
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def set_args(overrides: Mapping) -> list[str]:
    """`-S key=value` pairs; values in JSON, which DVC reads as YAML."""
    args = []
    for key, value in leaves(overrides):
        text = value if isinstance(value, str) and value and not any(c in value for c in " :#{}[],'\"") else json.dumps(value, separators=(",", ":"))
        args += ["-S", f"{key}={text}"]
    return args


def validate(params: Mapping, where: Path) -> None:
    """Every stage's config must load from the merged params."""
    from components import convert, download, evaluate, extract, finetune, train_head

    tmp = where.with_name(f".{where.name}.preset-check.yaml")
    tmp.write_text(yaml.safe_dump(dict(params), sort_keys=False), encoding="utf-8")
    try:
        for stage in (download, convert, extract, train_head, finetune, evaluate):
            stage.load_config(tmp)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", type=Path, help="a YAML file of overrides, e.g. presets/tiny.yaml")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--write", action="store_true", help="write the merged params into --params instead of printing -S args")
    args = parser.parse_args(argv)
    overrides = load_yaml(args.preset.read_text(encoding="utf-8")) or {}
    merged = merge(read_params(args.params), overrides)
    validate(merged, args.params)
    if args.write:
        args.params.write_text(yaml.safe_dump(merged, sort_keys=False, allow_unicode=True), encoding="utf-8")
    else:
        print(" ".join(set_args(overrides)))
    return 0


if __name__ == "__main__":
    from components.cli import run_main

    run_main(main)
