"""Training throughput (samples/s) of every architecture in training/models, through the real
trainer (training.train.train), on the synthetic e-commerce data with its five tasks.

The trainer is given a training split that notes the time at which each batch is handed out;
the time from batch W to batch W + N covers N whole steps of the loop (reading the batch from
the memory-mapped cache, forward, per-task losses, weighting, backward and the Adam step), so
N x batch / that time is the steady-state rate, with model building, the first steps (warm-up)
and checkpoint writing left out. Validation is skipped (no valid split is passed). One torch
thread, one process at a time by default, so models do not compete with each other; the load
average is recorded because other people share the machine's two cores.

    python -m bench.train_throughput [--seeds 3] [--quick]
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import (
    CONFIGS,
    DATA,
    argv_of,
    base_parser,
    format_table,
    make_config,
    output_paths,
    plt_agg,
    quiet,
    run_jobs,
    summarise,
    write_result,
)
from training.config import MODEL_TYPES
from training.data import Batch, Encoded

NAME = "train_throughput"
DATA_SEED = 0
VARIANTS = {  # label -> (model.type, model.esmm_bottom): every registered type, ESMM twice
    **{kind: (kind, "shared_bottom") for kind in MODEL_TYPES},
    "esmm (mmoe bottom)": ("esmm", "mmoe"),
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    impressions: int
    batch_size: int
    warmup_steps: int  # W
    timed_steps: int  # N


FULL = Sizes(impressions=1_000_000, batch_size=2048, warmup_steps=10, timed_steps=100)
QUICK = Sizes(impressions=20_000, batch_size=512, warmup_steps=2, timed_steps=10)


@dataclasses.dataclass(frozen=True)
class Job:
    seed: int
    variant: str
    sizes: Sizes

    def __str__(self) -> str:
        return f"seed={self.seed} {self.variant}"


def data_dir(impressions: int) -> Path:
    return DATA / f"ecommerce_n{impressions}_seed{DATA_SEED}"


def dataset(impressions: int) -> Any:
    """ecommerce.dataset.yaml (all five tasks) on the generated files."""
    from training.config import load_dataset_spec

    ds = load_dataset_spec(CONFIGS / "ecommerce.dataset.yaml")
    out = data_dir(impressions)
    return ds.model_copy(update={s: str(out / f"{s}.parquet") for s in ("train", "valid", "test")})


def prepare_data(impressions: int) -> None:
    from training.data import prepare
    from training.synthetic import generate_ecommerce

    out = data_dir(impressions)
    if not (out / "meta.json").is_file():
        generate_ecommerce(out, impressions, DATA_SEED)
    prepare(dataset(impressions), DATA / ".cache")


def config(job: Job, max_steps: int) -> Any:
    kind, bottom = VARIANTS[job.variant]
    # model sizes: the ModelConfig defaults, the sizes of training/configs/ecommerce_mmoe.yaml
    return make_config(
        CONFIGS / "ecommerce_mmoe.yaml",
        dataset(job.sizes.impressions),
        {
            "model.type": kind,
            "model.esmm_bottom": bottom,
            "batch_size": job.sizes.batch_size,
            "epochs": 1,
            "max_steps": max_steps,
            "seed": job.seed,
            "early_stopping": {"metric": "valid_loss", "patience": 1},
            "device": "cpu",
        },
    )


@dataclasses.dataclass(frozen=True)
class TimedEncoded(Encoded):
    """An encoded split that records ``time.perf_counter()`` as it hands out each batch."""

    stamps: list[float] = dataclasses.field(default_factory=list)

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[Batch]:
        for batch in super().batches(batch_size, shuffle, seed, rank, world_size):
            self.stamps.append(time.perf_counter())
            yield batch


def run_one(job: Job) -> dict[str, Any]:
    """Train ``W + N`` steps; the rate over steps W..W+N from the batch time stamps."""
    from training.data import prepare
    from training.train import train

    s = job.sizes
    cfg = config(job, s.warmup_steps + s.timed_steps)
    data = prepare(cfg.dataset, DATA / ".cache")
    timed = TimedEncoded(
        **{f.name: getattr(data.train, f.name) for f in dataclasses.fields(Encoded)}
    )
    data = dataclasses.replace(data, train=timed, valid=None, test=None)  # the loop only
    load_before = os.getloadavg()[0]
    out = Path(tempfile.mkdtemp(prefix="throughput-bench-"))
    try:
        with quiet():
            result = train(cfg, out, data)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    # the loop fetches batch W + N + 1 before it sees max_steps: stamps has W + N + 1 entries
    seconds = timed.stamps[s.warmup_steps + s.timed_steps] - timed.stamps[s.warmup_steps]
    return {
        "seed": job.seed,
        "variant": job.variant,
        "params": sum(p.numel() for p in result.model.parameters()),
        "samples_per_s": s.timed_steps * s.batch_size / seconds,
        "step_ms": 1000.0 * seconds / s.timed_steps,
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    plt = plt_agg()
    fig, ax = plt.subplots(figsize=(8, 4))
    names = [r["variant"] for r in rows]
    means = [r["samples_per_s"]["mean"] for r in rows]
    spread = [
        [r["samples_per_s"]["mean"] - r["samples_per_s"]["min"] for r in rows],
        [r["samples_per_s"]["max"] - r["samples_per_s"]["mean"] for r in rows],
    ]
    ax.barh(names, means, xerr=spread, color="tab:blue", alpha=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("training samples/s (1 thread; bars: mean, whiskers: min-max)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = argv_of(argv)
    p = base_parser(__doc__.split("\n")[0], seeds=3)
    p.set_defaults(workers=1)  # measure one model at a time
    args = p.parse_args(argv)
    started = time.perf_counter()
    sizes = QUICK if args.quick else FULL
    seeds = list(range(args.seeds))
    json_path, png_path = output_paths(NAME, args)

    print(f"{NAME}: generating/encoding {sizes.impressions:,} impressions", flush=True)
    prepare_data(sizes.impressions)
    # seeds outermost: repeats of one model are spread over the run, not back to back
    jobs = [Job(s, v, sizes) for s in seeds for v in VARIANTS]
    print(f"{NAME}: {len(jobs)} measurements on {args.workers} worker(s)", flush=True)
    runs = run_jobs(run_one, jobs, args.workers)

    rows = []
    for v in VARIANTS:
        mine = [r for r in runs if r["variant"] == v]
        rows.append(
            {"variant": v, "params": mine[0]["params"]}
            | {"samples_per_s": summarise([r["samples_per_s"] for r in mine])}
        )
    plot(rows, png_path, f"Training throughput, batch {sizes.batch_size}, 5 tasks, 1 thread")
    settings = dataclasses.asdict(sizes) | {"seeds": seeds, "workers": args.workers}
    settings |= {
        "quick": args.quick,
        "model": "ModelConfig defaults: embed 16, bottom/experts [128, 64], 4 experts, "
        "tower [32], PLE 2 levels x (2 specific + 2 shared) experts",
        "tasks": "ctr, cvr, cart, collect (binary) + stay (regression), static weighting",
    }
    write_result(
        json_path, NAME, argv, started, {"settings": settings, "summary": rows, "runs": runs}
    )
    table = [
        [
            r["variant"],
            f"{r['params']:,}",
            f"{r['samples_per_s']['mean']:,.0f}",
            f"{r['samples_per_s']['min']:,.0f}",
            f"{r['samples_per_s']['max']:,.0f}",
        ]
        for r in rows
    ]
    print(format_table(["model", "parameters", "samples/s mean", "min", "max"], table))
    print(f"wrote {json_path} and {png_path} in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
