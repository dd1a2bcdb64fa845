"""ONNX Runtime sessions for the registry's models, checked against their spec, hot-swappable.

:class:`ModelRuntime` is one ``model.onnx`` with its ``spec.json`` and ``metadata.json``. Loading
refuses a graph that does not take the spec's inputs (``sparse (batch, S) int64``, ``dense
(batch, D) float32``) or lacks one of its outputs, so an incompatible export fails at start-up or
reload, never on a request; it then runs a few warm-up batches so the first request does not pay
for lazy initialisation.

Execution providers are chosen and checked by :mod:`service.providers`.

:class:`ModelManager` serves one or several registry models as one immutable
:class:`ModelBundle` (several models: their outputs merged by name). A request takes the bundle
once, so a reload mid-request cannot mix versions; a reload builds the new bundle beside the old
one and swaps a single reference, and a failed reload leaves the old bundle serving.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort

from mtrank.registry import ModelVersion, Registry, RegistryError, sha256_file
from mtrank.snapshot import default_item_record, default_user_record
from mtrank.spec import FeatureSpec
from service.features.assemble import Assembler
from service.providers import ProviderError, check_started, is_auto, resolve_providers

log = logging.getLogger(__name__)

WARMUP_SIZES = (1, 100, 1000)
_ORT_TYPES = {"tensor(int64)": "int64", "tensor(float)": "float32", "tensor(double)": "float64"}


class ModelLoadError(RuntimeError):
    """A model that cannot be served: missing or corrupt files, or a graph that breaks its spec."""


class ModelNotLoaded(ModelLoadError):
    """No model bundle has been loaded yet (the service is not ready)."""


class InferenceError(RuntimeError):
    """ONNX Runtime failed on a request's inputs."""


def graph_problems(session: ort.InferenceSession, spec: FeatureSpec) -> list[str]:
    """Every way the session's graph disagrees with ``spec`` (empty: compatible)."""
    problems: list[str] = []
    expected = {
        spec.sparse_input: ("int64", len(spec.sparse)),
        spec.dense_input: ("float32", len(spec.dense)),
    }
    inputs = {i.name: i for i in session.get_inputs()}
    for extra in sorted(set(inputs) - set(expected)):
        problems.append(f"unexpected input {extra!r} (the spec feeds only {sorted(expected)})")
    for name, (dtype, width) in expected.items():
        node = inputs.get(name)
        if node is None:
            problems.append(f"input {name!r} is missing (graph inputs: {sorted(inputs)})")
            continue
        if _ORT_TYPES.get(node.type) != dtype:
            problems.append(f"input {name!r} has type {node.type}, the spec needs {dtype}")
        shape = list(node.shape)
        if len(shape) != 2 or isinstance(shape[0], int) or shape[1] != width:
            problems.append(f"input {name!r} has shape {shape}, the spec needs [batch, {width}]")
    outputs = {o.name: o for o in session.get_outputs()}
    for name in spec.task_names:
        out = outputs.get(name)
        if out is None:
            problems.append(f"output {name!r} is missing (graph outputs: {sorted(outputs)})")
        elif _ORT_TYPES.get(out.type) not in ("float32", "float64"):
            problems.append(f"output {name!r} has type {out.type}, expected a float tensor")
    return problems


@dataclass(frozen=True, eq=False)
class ModelRuntime:
    """One loaded model version: ORT session, feature spec and metadata."""

    model: ModelVersion
    spec: FeatureSpec
    metadata: dict[str, Any]
    session: ort.InferenceSession
    providers: tuple[str, ...]  # session.get_providers(): in use, in priority order

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(self.spec.task_names)

    @property
    def provider(self) -> str:
        """The execution provider that runs the graph (the others only take what it cannot)."""
        return self.providers[0]

    @classmethod
    def load(
        cls,
        model_version: ModelVersion,
        providers: str | Sequence[str] = "auto",
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
        warmup_sizes: Sequence[int] = WARMUP_SIZES,
        variant: str = "fp32",
    ) -> ModelRuntime:
        """Open, validate and warm one model version; ModelLoadError says what is wrong.

        ``variant`` picks the graph: ``fp32`` (model.onnx) or one the exporter recorded under
        ``metadata.json`` ``variants`` (``int8``), with its own checksum and stated accuracy.
        """
        where = f"model {model_version.name}/{model_version.version} ({model_version.path})"
        spec, metadata = _read_contract(model_version, where)
        graph = _variant_file(model_version, metadata, variant, where)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        try:
            chosen = resolve_providers(providers)
        except ProviderError as e:
            raise ModelLoadError(f"{where}: {e}") from e
        try:
            session = ort.InferenceSession(str(graph), sess_options=options, providers=chosen)
        except Exception as e:  # ORT raises its own pybind classes (InvalidProtobuf, Fail, ...)
            raise ModelLoadError(f"{where}: onnxruntime cannot load {graph.name}: {e}") from e
        problems = graph_problems(session, spec)
        if problems:
            raise ModelLoadError(f"{where} does not match its spec.json: " + "; ".join(problems))
        used = tuple(session.get_providers())
        try:
            check_started(chosen, used, auto=is_auto(providers), where=where)
        except ProviderError as e:
            raise ModelLoadError(str(e)) from e
        runtime = cls(model_version, spec, metadata, session, used)
        runtime.warm_up(warmup_sizes)
        return runtime

    def default_inputs(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """n rows of cold-start features: (sparse (n, S) int64, dense (n, D) float32)."""
        items = np.repeat(default_item_record(self.spec).reshape(1), n)  # (n,) records
        return Assembler(self.spec).assemble(default_user_record(self.spec), items, None)

    def warm_up(self, sizes: Sequence[int] = WARMUP_SIZES) -> None:
        """Run default rows through the graph; the outputs must be (n,) and finite."""
        where = f"model {self.model.name}/{self.model.version}"
        for n in sizes:
            try:
                out = self.run(*self.default_inputs(n))
            except InferenceError as e:
                raise ModelLoadError(f"{where}: warm-up batch of {n} rows failed: {e}") from e
            for name, values in out.items():
                if values.shape != (n,) or not np.all(np.isfinite(values)):
                    raise ModelLoadError(
                        f"{where}: warm-up output {name!r} has shape {values.shape} (expected "
                        f"({n},)) or non-finite values"
                    )

    def run(self, sparse: np.ndarray, dense: np.ndarray) -> dict[str, np.ndarray]:
        """Scores per output: {name: (N,)} for sparse (N, S) int64 and dense (N, D) float32."""
        n = len(sparse)
        if n == 0:
            return {name: np.zeros(0, dtype=np.float32) for name in self.output_names}
        feeds = {self.spec.sparse_input: sparse, self.spec.dense_input: dense}
        try:
            outs = self.session.run(list(self.output_names), feeds)
        except Exception as e:  # ORT's pybind errors share no public base class
            raise InferenceError(f"model {self.model.name}/{self.model.version}: {e}") from e
        return {
            name: np.asarray(o).reshape(n)  # (N,) from (N,) or (N, 1)
            for name, o in zip(self.output_names, outs, strict=True)
        }


def _variant_file(mv: ModelVersion, metadata: dict[str, Any], variant: str, where: str) -> Path:
    """The graph file of ``variant``; a variant's checksum is verified like model.onnx's."""
    if variant == "fp32":
        return mv.model_path
    info = (metadata.get("variants") or {}).get(variant)
    if not isinstance(info, dict) or "file" not in info:
        raise ModelLoadError(
            f"{where}: no {variant!r} variant was exported (mtrank export --quantize int8)"
        )
    path = mv.path / Path(str(info["file"])).name
    if not path.is_file() or sha256_file(path) != info.get("sha256"):
        raise ModelLoadError(f"{where}: {path.name} is missing or does not match its sha256")
    return path


def _read_contract(mv: ModelVersion, where: str) -> tuple[FeatureSpec, dict[str, Any]]:
    """spec.json and metadata.json of a version; checksums in the metadata are verified."""
    try:
        spec = FeatureSpec.load(mv.path)
    except Exception as e:  # missing file, bad JSON, failed validation
        raise ModelLoadError(f"{where}: cannot read spec.json: {e}") from e
    try:
        metadata = mv.metadata()
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{where}: cannot read metadata.json: {e}") from e
    if not mv.model_path.is_file():
        raise ModelLoadError(f"{where}: model.onnx is missing")
    # Checksums the exporter records: a copied or half-written file is caught here.
    onnx_sha = metadata.get("onnx_sha256")
    if onnx_sha and sha256_file(mv.model_path) != onnx_sha:
        raise ModelLoadError(f"{where}: model.onnx does not match onnx_sha256 in metadata.json")
    spec_sha = metadata.get("spec_sha256")
    if spec_sha and spec.sha256() != spec_sha:
        raise ModelLoadError(f"{where}: spec.json does not match spec_sha256 in metadata.json")
    return spec, metadata


@dataclass(frozen=True, eq=False)
class ModelBundle:
    """The models a request is scored with; immutable, grab once per request."""

    runtimes: tuple[ModelRuntime, ...]

    def __post_init__(self) -> None:
        if not self.runtimes:
            raise ModelLoadError("a model bundle needs at least one model")
        first = self.runtimes[0]
        seen: dict[str, str] = {}
        for rt in self.runtimes:
            if inputs_of(rt.spec) != inputs_of(first.spec):
                raise ModelLoadError(
                    f"models {first.model.name!r} and {rt.model.name!r} take different features; "
                    "models served together must share one input spec (one snapshot feeds all)"
                )
            for out in rt.output_names:
                if out in seen:
                    raise ModelLoadError(
                        f"output {out!r} is produced by both {seen[out]!r} and "
                        f"{rt.model.name!r}: output names must be unique across served models"
                    )
                seen[out] = rt.model.name

    @property
    def spec(self) -> FeatureSpec:
        """The feature spec of the first model: what the store and assembler work with."""
        return self.runtimes[0].spec

    @property
    def versions(self) -> dict[str, str]:
        return {rt.model.name: rt.model.version for rt in self.runtimes}

    @property
    def providers(self) -> dict[str, str]:
        """The execution provider each model runs on: name -> ``CPUExecutionProvider``, ..."""
        return {rt.model.name: rt.provider for rt in self.runtimes}

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o for rt in self.runtimes for o in rt.output_names)

    def run(self, sparse: np.ndarray, dense: np.ndarray) -> dict[str, np.ndarray]:
        """Every model's outputs merged by name: {output: (N,)}."""
        merged: dict[str, np.ndarray] = {}
        for rt in self.runtimes:
            merged.update(rt.run(sparse, dense))
        return merged


def inputs_of(spec: FeatureSpec) -> dict[str, Any]:
    """What a model reads (its spec without outputs): equal for models fed by one snapshot."""
    return spec.model_dump(mode="json", exclude={"outputs"})


@dataclass(frozen=True)
class ReloadResult:
    """What one reload did: ``result`` is success (swapped), failure (kept old) or unchanged."""

    result: Literal["success", "failure", "unchanged"]
    versions: dict[str, str]  # what is served after the reload
    requested: dict[str, str]  # what the registry's ``current`` files named
    error: str | None = None
    seconds: float = 0.0
    providers: dict[str, str] = field(default_factory=dict)  # of the served models, by name


class ModelManager:
    """Serves the ``current`` versions of the named registry models, reloading on change.

    Args:
        registry_root: the registry directory (``models/``).
        names: model names; several models are merged by output name.
        providers, intra_op_threads, inter_op_threads, warmup_sizes: see ModelRuntime.load.
        on_reload: called with every :class:`ReloadResult` (metrics hook:
            ``mtrank_model_reloads_total{result}``, ``mtrank_model_info{name,version,provider}``).
    """

    def __init__(
        self,
        registry_root: Path | str,
        names: Sequence[str],
        providers: str | Sequence[str] = "auto",
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
        warmup_sizes: Sequence[int] = WARMUP_SIZES,
        on_reload: Callable[[ReloadResult], None] | None = None,
        variant: str = "fp32",
    ) -> None:
        if not names:
            raise ModelLoadError("no model names to serve")
        self.registry = Registry(registry_root)
        self.names = list(names)
        self._load_args: dict[str, Any] = {
            "providers": providers,
            "intra_op_threads": intra_op_threads,
            "inter_op_threads": inter_op_threads,
            "warmup_sizes": tuple(warmup_sizes),
            "variant": variant,
        }
        self.on_reload = on_reload
        self._bundle: ModelBundle | None = None
        self._failed: dict[str, str] | None = None  # versions of the last failed reload
        self._lock = threading.Lock()  # one reload at a time (watcher vs admin endpoint)

    @property
    def loaded(self) -> bool:
        return self._bundle is not None

    def load_runtime(self, model_version: ModelVersion) -> ModelRuntime:
        """One more version, loaded as the served ones are (an experiment arm's, a shadow's)."""
        return ModelRuntime.load(model_version, **self._load_args)

    def current(self) -> ModelBundle:
        """The bundle to score one request with (take it once per request)."""
        bundle = self._bundle
        if bundle is None:
            raise ModelNotLoaded(f"no model loaded yet for {self.names}")
        return bundle

    def requested_versions(self) -> dict[str, str]:
        """What the registry's ``current`` files name now; RegistryError if one has none."""
        out: dict[str, str] = {}
        for name in self.names:
            version = self.registry.current(name)
            if version is None:
                raise RegistryError(
                    f"model {name!r} has no current version under {self.registry.root}"
                )
            out[name] = version
        return out

    def reload(self, *, force: bool = False, raise_on_error: bool = False) -> ReloadResult:
        """Load what ``current`` names beside the served bundle, warm it, then swap.

        Unchanged versions are kept (``force`` reloads them too). On failure the old bundle
        keeps serving and the result says why; ``raise_on_error`` raises ModelLoadError instead
        (start-up, where there is no old bundle to fall back on).
        """
        with self._lock:
            result = self._reload_locked(force)
        if result.result == "failure":
            log.error("model reload failed, still serving %s: %s", result.versions, result.error)
        elif result.result == "success":
            log.info(
                "models now served: %s on %s (%.2fs)",
                result.versions, result.providers, result.seconds,
            )  # fmt: skip
        if self.on_reload is not None:
            self.on_reload(result)
        if raise_on_error and result.result == "failure":
            raise ModelLoadError(result.error or "model reload failed")
        return result

    def _reload_locked(self, force: bool) -> ReloadResult:
        start = time.perf_counter()
        old = self._bundle
        serving = old.versions if old else {}
        providers = old.providers if old else {}
        requested: dict[str, str] = {}
        try:
            requested = self.requested_versions()
            if old is not None and requested == serving and not force:
                return ReloadResult("unchanged", serving, requested, providers=providers)
            reuse = {} if force or old is None else {rt.model.name: rt for rt in old.runtimes}
            runtimes = []
            for name in self.names:
                rt = reuse.get(name)
                if rt is None or rt.model.version != requested[name]:
                    mv = self.registry.resolve(name, requested[name])
                    rt = ModelRuntime.load(mv, **self._load_args)
                runtimes.append(rt)
            bundle = ModelBundle(tuple(runtimes))
        except Exception as e:  # any failure must leave the served bundle alone
            self._failed = requested
            error = f"{type(e).__name__}: {e}"
            seconds = time.perf_counter() - start
            return ReloadResult("failure", serving, requested, error, seconds, providers)
        self._bundle = bundle  # the swap: one reference assignment
        self._failed = None
        seconds = time.perf_counter() - start
        return ReloadResult("success", bundle.versions, requested, None, seconds, bundle.providers)

    async def watch(self, interval_s: float = 5.0) -> None:
        """Poll the registry's ``current`` files and reload on change (run as a task).

        A version set that failed to load is not retried until ``current`` changes again (or
        :meth:`reload` is called), so a broken export is reported once, not every interval.
        """
        while True:
            await asyncio.sleep(interval_s)
            try:
                requested = self.requested_versions()
            except (RegistryError, OSError) as e:
                log.warning("model watch: %s", e)
                continue
            serving = self._bundle.versions if self._bundle else None
            if requested != serving and requested != self._failed:
                await asyncio.to_thread(self.reload)
