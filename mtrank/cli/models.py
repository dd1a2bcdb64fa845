"""``mtrank models``: inspect the registry and switch the serving version.

    mtrank models list [--root models] [NAME]
    mtrank models promote NAME VERSION [--root models]

A running service polls ``models/NAME/current`` and hot-swaps to the promoted version; rolling
back is promoting the previous version.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mtrank.registry import Registry, RegistryError


def _metric_summary(meta: dict[str, Any]) -> str:
    """``ctr_auc=0.7312 cvr_auc=…`` from the flat validation metrics the trainer records."""
    metrics = meta.get("metrics") or {}
    keys = sorted(k for k in metrics if k.endswith(("_auc", "_rmse")) and "_ctcvr" not in k)
    parts = [f"{k}={metrics[k]:.4f}" for k in keys if isinstance(metrics[k], int | float)]
    return " ".join(parts) or "-"


def cmd_list(reg: Registry, names: list[str]) -> int:
    names = names or reg.names()
    if not names:
        print(f"no models under {reg.root}")
        return 0
    for name in names:
        current = reg.current(name)
        print(f"{name}  (current: {current or 'none'})")
        for version in reg.versions(name):
            mark = "*" if version == current else " "
            try:
                meta = reg.resolve(name, version).metadata()
            except (OSError, json.JSONDecodeError) as e:
                print(f"  {mark} {version}  unreadable metadata: {e}")
                continue
            model_type = meta.get("model_type", "?")
            created = meta.get("created_at", "?")
            print(f"  {mark} {version}  {model_type:<14} {created}  {_metric_summary(meta)}")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mtrank models", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="models", help="registry root (default: models)")
    sub = parser.add_subparsers(dest="action", required=True)
    p_list = sub.add_parser("list", help="versions with their metrics; * marks current")
    p_list.add_argument("names", nargs="*")
    p_promote = sub.add_parser("promote", help="point NAME/current at VERSION (atomic)")
    p_promote.add_argument("name")
    p_promote.add_argument("version")
    args = parser.parse_args(argv)
    reg = Registry(args.root)
    try:
        if args.action == "list":
            return cmd_list(reg, args.names)
        previous = reg.current(args.name)
        mv = reg.promote(args.name, args.version)
        print(f"{mv.name}: current {previous or 'none'} -> {mv.version}")
        return 0
    except RegistryError as e:
        print(f"mtrank models: {e}", file=sys.stderr)
        return 1
