"""The ``mtrank`` command line: one entry point, dispatched lazily.

Each subcommand lives in the half that owns it and is imported only when called, so the service
image (no torch) can run ``mtrank serve`` and ``mtrank models`` without the training stack.

This package is the top layer: it (and ``mtrank demo``, which drives both halves) may import
training/ and service/; nothing else in ``mtrank`` may (the import-linter contracts in
pyproject.toml keep it so).
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, help). Each module exposes ``main(argv: list[str]) -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("training.synthetic", "generate synthetic data sets (ecommerce, mmoe)"),
    "train": ("training.train", "train a multi-task model from a YAML config"),
    "evaluate": ("training.evaluate", "evaluate a checkpoint on a data split (JSON report)"),
    "export": ("training.export", "export a checkpoint to ONNX into the model registry"),
    "features": ("training.features", "build feature snapshots / load them into Redis"),
    "tune-fusion": ("training.tune_fusion", "grid/random search of the fusion parameters"),
    "train-recall": ("training.recall.train", "train a recall model (DSSM, YouTube DNN)"),
    "evaluate-recall": (
        "training.recall.evaluate",
        "HR/recall/NDCG@K of a recall checkpoint on a split (JSON report)",
    ),
    "export-recall": (
        "training.recall.export",
        "export a recall user tower (ONNX) and item embeddings for the ANN index",
    ),
    "publish-recall": (
        "training.recall.publish",
        "export a recall checkpoint, build its ANN index and publish it into the registry",
    ),
    "item2vec": (
        "training.recall.item2vec",
        "skip-gram item vectors from click sessions (to initialise item_id embeddings)",
    ),
    "train-ltr": (
        "training.ltr.train",
        "train a learned fusion (LambdaMART, BPR) over a ranker's outputs and publish it",
    ),
    "evaluate-ltr": (
        "training.ltr.evaluate",
        "NDCG@K and GMV@K of an LTR version and formula baselines on a split",
    ),
    "events": (
        "training.events_archive",
        "events archive: copy the event stream to Parquet through a consumer group",
    ),
    "logs": (
        "training.logs",
        "logs export: served-feature rows joined with later events, as a training data set",
    ),
    "models": ("mtrank.cli.models", "list model versions, promote one to current"),
    "serve": ("service.cli", "run the ranking service (uvicorn)"),
    "demo": ("mtrank.cli.demo", "train a small model if none exists, then serve it"),
}


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: mtrank COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {c.ljust(width)}  {h}" for c, (_, h) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    cmd, rest = args[0], args[1:]
    if cmd not in COMMANDS:
        print(f"mtrank: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name = COMMANDS[cmd][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        extra = "train" if module_name.startswith("training") else "serve"
        print(
            f"mtrank {cmd}: needs the '{extra}' extra ({e.name} is missing): "
            f"pip install 'mtrank[{extra}]'",
            file=sys.stderr,
        )
        return 2
    rc: int = module.main(rest)
    return rc
