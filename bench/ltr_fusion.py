"""Learned fusion against the formula on the generator's ground truth (issue 13, point 2).

Each seed is a new world: ``mtrank synth ecommerce`` with that seed, an ESMM ranker
(training/configs/ecommerce_esmm.yaml, all five tasks) trained on it and exported to a registry,
then every fusion is fitted on the TRAIN split's logged events and judged on requests built from
the TEST split with the generator's truth (training/ltr/truth.py):

- **requests**: one user and context (hour, device) from a logged test impression, 100
  candidates whose item side comes from other logged test impressions, features recombined per
  field, the ranker run on them;
- **NDCG@20**: gain = the expected grade E[grade] under the objective hierarchy (purchase 3,
  cart 2, click 1, impression 0), computed from the true P(click), P(buy | click) and the
  generator's cart rule;
- **GMV@20**: the expected GMV of the request's top 20, sum of P(click) x P(buy | click) x price.

Rankers: CTR only; the default formula; the formula tuned by tune-fusion's search (in-process, on
the train split's user groups, 200 random trials) once for NDCG@20 of the logged grade (the LTR
objective) and once for NDCG@20 of the logged GMV (tune-fusion's default kind of objective);
LambdaMART over the task scores (training/configs/ltr_lambdamart.yaml); BPR
(ltr_bpr.yaml); the single-model LTR on the encoded features (ltr_single_model.yaml). Every LTR
model goes through the real pipeline (parity-gated export, registry version) and the fusion ones
are scored by the service's ``LtrRuntime``. The truth's own orderings are the ceilings.

After the quality runs, seed 0's LambdaMART is timed at N = 500 candidates: ``LtrRuntime.score``
(one thread) against the default formula's ``evaluate`` on the same env, in one process.

    python -m bench.ltr_fusion [--seeds 5] [--quick] [--impressions 1000000] [--workers 2]
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    CONFIGS,
    DATA,
    argv_of,
    base_parser,
    format_table,
    make_config,
    output_paths,
    plt_agg,
    run_jobs,
    summarise,
    write_result,
)

NAME = "ltr_fusion"
K = 20
RUNS = DATA / "ltr_fusion_runs"  # git-ignored; seed 0's registry is kept for the latency step
RANKERS = (
    "CTR only",
    "default formula",
    "tuned formula (grade)",
    "tuned formula (GMV)",
    "formula ctr*cvr*price",
    "LambdaMART (grades)",
    "LambdaMART (value)",
    "BPR (grades)",
    "BPR (value)",
    "single-model LTR",
)
LTR_CONFIGS = {  # row -> training/configs/NAME.yaml
    "LambdaMART (grades)": "ltr_lambdamart",
    "LambdaMART (value)": "ltr_lambdamart_value",
    "BPR (grades)": "ltr_bpr",
    "BPR (value)": "ltr_bpr_value",
    "single-model LTR": "ltr_single_model",
}
SWEEP = (1.0, 3.0, 10.0, 30.0)  # value.scale of LambdaMART (value): the trade-off curve
CEILINGS = ("truth: E[grade]", "truth: E[GMV]")


@dataclass(frozen=True)
class Sizes:
    impressions: int
    epochs: int
    requests: int
    candidates: int
    trials: int
    max_steps: int | None = None


FULL = Sizes(1_000_000, 2, 2000, 100, 200)
QUICK = Sizes(40_000, 1, 200, 100, 20, max_steps=60)


@dataclass(frozen=True)
class Job:
    seed: int
    sizes: Sizes
    resume: bool = False

    def __str__(self) -> str:
        return f"seed={self.seed}"


def world_dir(job: Job) -> Path:
    return DATA / f"ecommerce_n{job.sizes.impressions}_seed{job.seed}"


def train_ranker(job: Job, out: Path) -> tuple[Any, Path]:
    """Generate the world (once), train and export its ESMM ranker; (dataset spec, its YAML)."""
    import yaml

    from training.config import load_dataset_spec
    from training.data import prepare
    from training.export import export
    from training.synthetic import generate_ecommerce
    from training.train import train

    world = world_dir(job)
    if not (world / "meta.json").is_file():
        generate_ecommerce(world, job.sizes.impressions, job.seed)
    ds = load_dataset_spec(CONFIGS / "ecommerce.dataset.yaml")
    ds = ds.model_copy(update={k: str(world / f"{k}.parquet") for k in ("train", "valid", "test")})
    overrides: dict[str, Any] = {"epochs": job.sizes.epochs, "seed": job.seed, "device": "cpu"}
    if job.sizes.max_steps is not None:
        overrides["max_steps"] = job.sizes.max_steps
    cfg = make_config(CONFIGS / "ecommerce_esmm.yaml", ds, overrides)
    data = prepare(ds, DATA / ".cache")
    result = train(cfg, out / "run", data)
    export(result.best_checkpoint, "ranker", out / "models", promote=True)
    shutil.rmtree(out / "run", ignore_errors=True)
    path = out / "dataset.yaml"
    path.write_text(yaml.safe_dump(ds.model_dump(mode="json"), sort_keys=False))
    return ds, path


def ltr_config(name: str, out: Path, seed: int, quick: bool) -> Any:
    """The committed config ``training/configs/NAME.yaml`` pointed at this run's registry."""
    from training.ltr.config import load_ltr_config

    cfg = load_ltr_config(CONFIGS / f"{name}.yaml")
    update: dict[str, Any] = {
        "name": name, "root": str(out / "models"), "dataset": "dataset.yaml",
        "cache_dir": str(DATA / ".cache"), "seed": seed, "promote": True,
    }  # fmt: skip
    if cfg.ranker is not None:
        update["ranker"] = "ranker"
    if quick:
        update["bpr"] = cfg.bpr.model_copy(update={"epochs": 1})
    return cfg.model_copy(update=update)


def tuned_formulas(train: Any, gains: list[float], trials: int, seed: int) -> dict[str, Any]:
    """tune-fusion's random search on the train split's user groups, for two objectives."""
    from mtrank.fusion import FusionConfig
    from mtrank.yamlio import load_yaml_model
    from training.config import ConfigError
    from training.tune_fusion import EvalData, TuneConfig, run_search

    base = load_yaml_model(CONFIGS / "tune_fusion.yaml", TuneConfig, ConfigError, "tune", "")
    labels = dict(train.labels) | {"grade": np.asarray(gains)[train.grades]}
    data = EvalData(env=train.env, labels=labels, groups=train.groups)
    out: dict[str, Any] = {}
    for label, objective in (("grade", f"ndcg@{K}:grade"), ("GMV", f"ndcg@{K}:gmv")):
        cfg = base.model_copy(
            update={"objective": objective, "report": [objective], "trials": trials, "seed": seed}
        )
        results = run_search(cfg, data)
        best = max(results, key=lambda r: r["objectives"][objective])
        out[label] = {
            "config": FusionConfig(formula=cfg.formula, params=best["params"]),
            "train_objective": best["objectives"][objective],
            "default_objective": results[0]["objectives"][objective],
        }
    return out


def run_seed(job: Job) -> dict[str, Any]:
    from mtrank.fusion import DEFAULT_FORMULA, DEFAULT_PARAMS, FusionConfig
    from service.fusion_model import LtrRuntime
    from training.ltr.data import encoded_features, load_split, namespace, open_source
    from training.ltr.export import export_ltr, onnx_scores
    from training.ltr.metrics import ndcg_at_k, top_k_value
    from training.ltr.relevance import Relevance
    from training.ltr.train import FITTERS
    from training.ltr.truth import (
        WorldTruth,
        check_replay,
        counterfactual_requests,
        expected_gain,
        read_raw,
    )

    t0 = time.perf_counter()
    out = RUNS / f"seed{job.seed}"
    saved = out / "result.json"
    if job.resume and saved.is_file():
        kept: dict[str, Any] = json.loads(saved.read_text())
        if kept.get("sizes") == vars(job.sizes):
            return kept
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    train_ranker(job, out)
    t_ranker = time.perf_counter()
    quick = job.sizes.max_steps is not None
    configs = {row: ltr_config(name, out, job.seed, quick) for row, name in LTR_CONFIGS.items()}
    fusion_cfg = configs["LambdaMART (grades)"]
    source = open_source(fusion_cfg, out)
    splits = {"fusion": (load_split(fusion_cfg, source, "train"),
                         load_split(fusion_cfg, source, "valid"))}  # fmt: skip
    single_cfg = configs["single-model LTR"]
    single_source = open_source(single_cfg, out)
    splits["features"] = (load_split(single_cfg, single_source, "train"),
                          load_split(single_cfg, single_source, "valid"))  # fmt: skip
    gains = fusion_cfg.gains()

    # requests on the test split, judged by the generator's truth
    world = world_dir(job)
    truth = WorldTruth.from_folder(world)
    raw = read_raw(world / "test.parquet")
    replay = check_replay(truth, raw)
    if replay > 1e-9:
        raise RuntimeError(f"the re-drawn world differs from the logs by {replay:g}")
    reqs = counterfactual_requests(source.spec, source.data.test, raw, truth,
                                   job.sizes.requests, job.sizes.candidates, job.seed)  # fmt: skip
    n = len(reqs.groups)
    env = namespace(source, reqs.sparse, reqs.dense, [])
    gain = expected_gain(reqs.true_ctr, reqs.true_cvr, fusion_cfg.grades, gains)
    gmv = reqs.gmv

    scores: dict[str, np.ndarray] = {"CTR only": env["ctr"]}
    default = FusionConfig(formula=DEFAULT_FORMULA, params=DEFAULT_PARAMS)
    scores["default formula"] = default.compile(env).evaluate(env, n)
    tuned = tuned_formulas(splits["fusion"][0], gains, job.sizes.trials, job.seed)
    for label, t in tuned.items():
        scores[f"tuned formula ({label})"] = t["config"].compile(env).evaluate(env, n)
    product = FusionConfig(formula="ctr * cvr * price")  # the model's own expected GMV
    scores["formula ctr*cvr*price"] = product.compile(env).evaluate(env, n)
    t_formulas = time.perf_counter()

    ltr_info: dict[str, Any] = {}
    for label, cfg in configs.items():
        train, valid = splits["features" if cfg.trainer == "single_model" else "fusion"]
        t = time.perf_counter()
        rel = Relevance.fit(cfg, train)
        trained = FITTERS[cfg.trainer](cfg, rel.apply(train), rel.apply(valid), rel)
        ranker = single_source.ranker if cfg.trainer == "single_model" else source.ranker
        mv = export_ltr(cfg, trained, valid.x, {}, ranker, relevance=rel)
        if trained.input_space == "fusion":
            scores[label] = LtrRuntime.load(mv).score(env, n)
        else:
            scores[label] = onnx_scores(trained.graph, encoded_features(reqs.sparse, reqs.dense))
        ltr_info[label] = {"version": mv.version, "seconds": time.perf_counter() - t,
                           "parity": mv.metadata()["parity"], "training": trained.info}  # fmt: skip
    scores["truth: E[grade]"] = gain
    scores["truth: E[GMV]"] = gmv
    value_cfg = configs["LambdaMART (value)"]
    if value_cfg.value is None:
        raise RuntimeError("training/configs/ltr_lambdamart_value.yaml has no value grades")
    x_req = np.stack([env[name] for name in splits["fusion"][0].inputs], axis=1)
    for scale in SWEEP:  # native scores: the curve, not a served model
        cfg = value_cfg.model_copy(update={"value": value_cfg.value.model_copy(
            update={"scale": scale})})  # fmt: skip
        train, valid = splits["fusion"]
        rel = Relevance.fit(cfg, train)
        trained = FITTERS[cfg.trainer](cfg, rel.apply(train), rel.apply(valid), rel)
        scores[f"sweep scale {scale:g}"] = trained.native(x_req.astype(np.float32))

    metrics = {
        label: {
            f"ndcg@{K}": ndcg_at_k(s, gain, reqs.groups, K),
            f"gmv@{K}": top_k_value(s, gmv, reqs.groups, K),
        }
        for label, s in scores.items()
    }
    result = {
        "seed": job.seed,
        "sizes": vars(job.sizes),
        "metrics": metrics,
        "tuned": {
            k: {
                "params": dict(v["config"].params),
                "train_objective": v["train_objective"],
                "default_objective": v["default_objective"],
            }
            for k, v in tuned.items()
        },  # fmt: skip
        "ltr": ltr_info,
        "inputs": list(splits["fusion"][0].inputs),
        "train_rows": len(splits["fusion"][0]),
        "train_groups": int(len(splits["fusion"][0].sizes)),
        "request_rows": n,
        "replay_max_abs_diff": replay,
        "seconds": {
            "ranker": t_ranker - t0,
            "formulas": t_formulas - t_ranker,
            "total": time.perf_counter() - t0,
        },
    }
    from training.reports import to_json

    saved.write_text(json.dumps(to_json(result)))  # a failed later seed does not lose this one
    return result


def latency(seed: int, n: int = 500, repeats: int = 2000) -> dict[str, Any]:
    """p50/p90 of LtrRuntime.score (seed's LambdaMART, one thread) and of the default formula's
    evaluate on the same env of ``n`` candidates, interleaved in one process."""
    from mtrank.fusion import DEFAULT_FORMULA, DEFAULT_PARAMS, RULE_WEIGHT, FusionConfig
    from mtrank.ltr_artefact import resolve
    from mtrank.registry import Registry
    from service.fusion_model import LtrRuntime

    runtime = LtrRuntime.load(resolve(Registry(RUNS / f"seed{seed}" / "models"), "ltr_lambdamart"))
    rng = np.random.default_rng(seed)
    env: dict[str, Any] = {name: rng.random(n) for name in runtime.inputs}
    env["price"] = rng.lognormal(3.5, 0.8, n)
    env[RULE_WEIGHT] = 1.0
    formula = FusionConfig(formula=DEFAULT_FORMULA, params=DEFAULT_PARAMS).compile(env)
    times: dict[str, list[float]] = {"ltr": [], "formula": []}
    for i in range(repeats + 100):
        t = time.perf_counter()
        runtime.score(env, n)
        t1 = time.perf_counter()
        formula.evaluate(env, n)
        t2 = time.perf_counter()
        if i >= 100:  # warm-up
            times["ltr"].append(t1 - t)
            times["formula"].append(t2 - t1)
    meta = runtime.metadata.model_dump()
    return {
        "n": n,
        "repeats": repeats,
        "trees": meta["training"]["trees"] if "training" in meta else None,
        **{
            f"{k}_ms": {q: float(np.percentile(v, p) * 1e3) for q, p in (("p50", 50), ("p90", 90))}
            for k, v in times.items()
        },
    }


CAPS = (50, 100)  # tree counts timed by --latency besides the early-stopped models


def latency_caps(seed: int, n: int = 500, repeats: int = 3000) -> dict[str, Any]:
    """``LtrRuntime.score`` at ``n`` candidates, one thread, for seed's published fusions and for
    the default LambdaMART refitted without early stopping at each cap in :data:`CAPS`, against
    the default formula's evaluate; all interleaved in one process on validation rows."""
    from mtrank.fusion import DEFAULT_FORMULA, DEFAULT_PARAMS, RULE_WEIGHT, FusionConfig
    from mtrank.ltr_artefact import resolve
    from mtrank.registry import Registry
    from service.fusion_model import LtrRuntime
    from training.ltr.data import load_split, open_source
    from training.ltr.export import export_ltr
    from training.ltr.relevance import Relevance
    from training.ltr.train import FITTERS

    out = RUNS / f"seed{seed}"
    registry = Registry(out / "models")
    names = ("ltr_lambdamart", "ltr_lambdamart_value", "ltr_bpr", "ltr_bpr_value")
    runtimes = {name: LtrRuntime.load(resolve(registry, name)) for name in names}
    base = ltr_config("ltr_lambdamart", out, seed, quick=False)
    source = open_source(base, out)
    train, valid = load_split(base, source, "train"), load_split(base, source, "valid")
    for cap in CAPS:
        lm = base.lambdamart.model_copy(update={"num_trees": cap, "early_stopping_rounds": 0})
        cfg = base.model_copy(update={"name": f"ltr_lambdamart_{cap}", "lambdamart": lm})
        rel = Relevance.fit(cfg, train)
        trained = FITTERS["lambdamart"](cfg, rel.apply(train), rel.apply(valid), rel)
        mv = export_ltr(cfg, trained, valid.x, {}, source.ranker, relevance=rel)
        runtimes[cfg.name] = LtrRuntime.load(mv)
    rows = np.random.default_rng(seed).integers(0, len(valid), n)
    env: dict[str, Any] = {k: v[rows] for k, v in valid.env.items()} | {RULE_WEIGHT: 1.0}
    formula = FusionConfig(formula=DEFAULT_FORMULA, params=DEFAULT_PARAMS).compile(env)
    scorers: dict[str, Any] = {k: rt.score for k, rt in runtimes.items()}
    scorers["default formula"] = formula.evaluate
    times: dict[str, list[float]] = {k: [] for k in scorers}
    for i in range(repeats + 100):
        for k, score in scorers.items():
            t = time.perf_counter()
            score(env, n)
            if i >= 100:  # warm-up
                times[k].append(time.perf_counter() - t)
    out_rows = {}
    for k, v in times.items():
        ms = np.asarray(v) * 1e3
        meta = runtimes[k].metadata.model_dump() if k in runtimes else {}
        out_rows[k] = {
            "trees": meta.get("training", {}).get("trees"),
            **{f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 90, 99)},
        }
    return {"n": n, "repeats": repeats, "seed": seed, "scorers": out_rows}


def summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for label in (*RANKERS, *CEILINGS, *(f"sweep scale {s:g}" for s in SWEEP)):
        rows.append({
            "ranker": label,
            **{m: summarise([r["metrics"][label][m] for r in runs])
               for m in (f"ndcg@{K}", f"gmv@{K}")},
        })  # fmt: skip
    return rows


PAIRS = [(ltr, formula) for ltr in ("LambdaMART (grades)", "LambdaMART (value)")
         for formula in ("tuned formula (grade)", "tuned formula (GMV)")]  # fmt: skip


def paired(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-seed differences LTR - formula (same world, same requests) and how often LTR wins."""
    out = []
    for ltr, formula in PAIRS:
        row: dict[str, Any] = {"ltr": ltr, "formula": formula}
        for m in (f"ndcg@{K}", f"gmv@{K}"):
            d = [r["metrics"][ltr][m] - r["metrics"][formula][m] for r in runs]
            row[m] = summarise(d) | {"wins": sum(x >= 0 for x in d)}
        out.append(row)
    return out


def paired_table(rows: list[dict[str, Any]]) -> str:
    def cell(s: dict[str, Any], digits: int) -> str:
        return f"{s['mean']:+.{digits}f} ± {s['std']:.{digits}f} (>= in {s['wins']}/{s['n']})"

    return format_table(
        ["LTR", "against", f"NDCG@{K} difference", f"GMV@{K} difference"],
        [[r["ltr"], r["formula"], cell(r[f"ndcg@{K}"], 4), cell(r[f"gmv@{K}"], 3)] for r in rows],
    )


def table(rows: list[dict[str, Any]]) -> str:
    def cell(s: dict[str, float], digits: int) -> str:
        return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"

    return format_table(
        ["ranker", f"NDCG@{K} (E[grade] gain)", f"expected GMV@{K} per request"],
        [[r["ranker"], cell(r[f"ndcg@{K}"], 4), cell(r[f"gmv@{K}"], 3)] for r in rows],
    )


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Bars of both metrics per ranker, and the NDCG-GMV plane with the value-scale sweep."""
    plt = plt_agg()
    by = {r["ranker"]: r for r in rows}
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2), gridspec_kw={"width_ratios": [1, 1, 1.2]})
    colours = dict(zip(RANKERS, ["tab:gray", "tab:blue", "tab:cyan", "tab:purple", "navy",
                                 "tab:red", "darkred", "tab:orange", "saddlebrown",
                                 "tab:green"], strict=True))  # fmt: skip
    for ax, metric, name, ceiling in (
        (axes[0], f"ndcg@{K}", f"NDCG@{K}, gain E[grade]", CEILINGS[0]),
        (axes[1], f"gmv@{K}", f"expected GMV@{K} per request", CEILINGS[1]),
    ):
        means = [by[label][metric]["mean"] for label in RANKERS]
        stds = [by[label][metric]["std"] for label in RANKERS]
        ax.barh(range(len(RANKERS)), means, xerr=stds, capsize=3,
                color=[colours[label] for label in RANKERS])  # fmt: skip
        ax.set_yticks(range(len(RANKERS)), list(RANKERS) if metric.startswith("ndcg") else [])
        ax.invert_yaxis()
        ax.axvline(by[ceiling][metric]["mean"], color="k", ls="--", lw=1, label=ceiling)
        ax.set_title(name)
        ax.legend(loc="lower right", fontsize=8)
    ax = axes[2]
    for label in RANKERS:
        r = by[label]
        ax.errorbar(r[f"ndcg@{K}"]["mean"], r[f"gmv@{K}"]["mean"], xerr=r[f"ndcg@{K}"]["std"],
                    yerr=r[f"gmv@{K}"]["std"], fmt="o", color=colours[label], capsize=2,
                    label=label)  # fmt: skip
    sweep = [by[f"sweep scale {s:g}"] for s in SWEEP]
    xs = [r[f"ndcg@{K}"]["mean"] for r in sweep]
    ys = [r[f"gmv@{K}"]["mean"] for r in sweep]
    ax.plot(xs, ys, "--", color="darkred", lw=1, label="LambdaMART (value), scale " +
            ", ".join(f"{s:g}" for s in SWEEP))  # fmt: skip
    for s, x, y in zip(SWEEP, xs, ys, strict=True):
        ax.annotate(f"{s:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(f"NDCG@{K}, gain E[grade]")
    ax.set_ylabel(f"expected GMV@{K} per request")
    ax.set_title("the trade-off (up and right is better)")
    ax.legend(fontsize=6.5, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = argv_of(argv)
    p = base_parser(__doc__.split("\n")[0], seeds=5)
    p.add_argument("--impressions", type=int, default=None, help="default 1,000,000")
    p.add_argument("--resume", action="store_true", help=f"reuse seed results saved under {RUNS}")
    p.add_argument("--latency", action="store_true",
                   help="only time LtrRuntime.score at 500 candidates on seed 0 of a full run, "
                   "early-stopped and at 50 and 100 trees")  # fmt: skip
    args = p.parse_args(argv)
    started = time.perf_counter()
    sizes = QUICK if args.quick else FULL
    name = NAME
    if args.impressions is not None and args.impressions != sizes.impressions:
        sizes = replace(sizes, impressions=args.impressions)
        name += f"_n{args.impressions}"
    json_path, png_path = output_paths(name, args)
    if args.latency:
        lat_path = json_path.with_name(f"{name}_latency.json")
        lat = run_jobs(latency_caps, [0], 1, label=lambda s: f"latency seed={s}")[0]
        write_result(lat_path, NAME, argv, started, lat)
        print(format_table(["scorer", "trees", "p50 ms", "p90 ms", "p99 ms"],
                           [[k, v["trees"] or "", v["p50_ms"], v["p90_ms"], v["p99_ms"]]
                            for k, v in lat["scorers"].items()]))  # fmt: skip
        print(f"wrote {lat_path}")
        return 0
    jobs = [Job(s, sizes, args.resume) for s in range(args.seeds)]
    print(f"{NAME}: {len(jobs)} worlds of {sizes.impressions:,} impressions on "
          f"{args.workers} workers", flush=True)  # fmt: skip
    runs = run_jobs(run_seed, jobs, args.workers)
    lat = run_jobs(latency, [0], 1, label=lambda s: f"latency seed={s}")[0]
    rows = summary(runs)
    pairs = paired(runs)
    plot(rows, png_path, f"Learned fusion vs formula: {args.seeds} worlds of "
         f"{sizes.impressions:,} impressions, {sizes.requests} requests x {sizes.candidates} "
         "candidates each")  # fmt: skip
    settings = vars(sizes) | {"seeds": args.seeds, "workers": args.workers, "quick": args.quick}
    write_result(json_path, NAME, argv, started,
                 {"settings": settings, "summary": rows, "paired": pairs, "latency": lat,
                  "runs": runs})  # fmt: skip
    print(table(rows))
    print(paired_table(pairs))
    print(json.dumps(lat))
    print(f"wrote {json_path} and {png_path} in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
