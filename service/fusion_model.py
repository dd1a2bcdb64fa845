"""A learned fusion (LTR version) as the service runs it: verified once, then scored per request.

The formula fusion (mtrank.fusion) turns the fusion env (task outputs, item attributes, request
context) into one score by a configured expression; a learned fusion does the same with a
trained graph. :meth:`LtrRuntime.load` refuses a version that is not whole before anything uses
it: metadata.json that is not an LTR version's (mtrank.ltr_artefact), a graph that does not
match its sha256, an offline single-model baseline (its inputs are encoded features, not the
fusion env), a graph whose input or output is not the float32 ``[N, F]`` -> ``[N]``/``[N, 1]``
the metadata promises, or one that fails its warm-up. Every refusal is an
:class:`LtrLoadError` naming the version and the file or key.

Scoring runs on one onnxruntime thread by default (``intra_op_threads``): a tree ensemble over a
few hundred candidates is far below the cost of a thread hand-off, and the service's request
concurrency already uses the cores. Scores follow the formula's final-score policy
(:func:`mtrank.fusion.sanitize_scores`): a non-finite score ranks last.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from mtrank.fusion import sanitize_scores
from mtrank.ltr_artefact import LTR_MODEL_FILE, METADATA_FILE, LtrMetadata, problems
from mtrank.registry import ModelVersion

FloatArray = NDArray[np.float64]
Float32Array = NDArray[np.float32]
_FLOAT = "tensor(float)"


class LtrLoadError(ValueError):
    """An LTR version that cannot be served; the message names the version and the file/key."""


class LtrRuntime:
    """One loaded LTR version; immutable after :meth:`load`, safe to share between threads.

    Args:
        model: the registry version it was loaded from.
        metadata: its checked metadata.json.
        session: the onnxruntime session over ltr.onnx.
    """

    def __init__(
        self, model: ModelVersion, metadata: LtrMetadata, session: ort.InferenceSession
    ) -> None:
        self.model = model
        self.metadata = metadata
        self.session = session
        self.inputs: tuple[str, ...] = tuple(metadata.inputs)
        self._input_name = metadata.input_name
        self._output_name = metadata.output_name

    @property
    def version(self) -> str:
        return self.model.version

    @classmethod
    def load(cls, model_version: ModelVersion, intra_op_threads: int = 1) -> LtrRuntime:
        """Verify and open ``model_version`` (module docstring); raises :class:`LtrLoadError`."""
        mv = model_version
        where = f"LTR model {mv.name}/{mv.version} ({mv.path})"
        try:
            raw = mv.metadata()
        except (OSError, ValueError) as e:
            raise LtrLoadError(f"{where}: cannot read {METADATA_FILE}: {e}") from e
        found = problems(mv.path, raw, servable=True)
        if found:
            raise LtrLoadError(f"{where}: " + "; ".join(found))
        metadata = LtrMetadata.parse(raw)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            session = ort.InferenceSession(
                str(Path(mv.path) / LTR_MODEL_FILE), sess_options=options,
                providers=["CPUExecutionProvider"],
            )  # fmt: skip
        except Exception as e:  # ORT's pybind errors share no public base class
            raise LtrLoadError(f"{where}: onnxruntime cannot load {LTR_MODEL_FILE}: {e}") from e
        _check_signature(session, metadata, where)
        runtime = cls(mv, metadata, session)
        runtime.warm_up()
        return runtime

    def features(self, env: Mapping[str, Any], n: int) -> Float32Array:
        """(n, F) float32: column f is ``env[inputs[f]]``, a scalar broadcast or an (n,) array.

        A name missing from ``env`` is a KeyError naming every missing input; a value of
        another shape is a ValueError naming the input.
        """
        missing = [name for name in self.inputs if name not in env]
        if missing:
            raise KeyError(f"LTR inputs missing from the fusion env: {missing}")
        out = np.empty((n, len(self.inputs)), dtype=np.float32)
        for j, name in enumerate(self.inputs):
            value = np.asarray(env[name], dtype=np.float32)
            if value.ndim != 0 and value.shape != (n,):
                raise ValueError(f"LTR input {name!r} has shape {value.shape}, expected ({n},)")
            out[:, j] = value  # a scalar broadcasts down the column
        return out

    def score_features(self, features: Float32Array) -> FloatArray:
        """(n,) float64 scores of an (n, F) float32 matrix; non-finite scores become -inf."""
        n = len(features)
        if n == 0:
            return np.empty(0, dtype=np.float64)
        (out,) = self.session.run([self._output_name], {self._input_name: features})
        raw: FloatArray = np.asarray(out, dtype=np.float64).reshape(n)
        return sanitize_scores(raw)

    def score(self, env: Mapping[str, Any], n: int) -> FloatArray:
        """(n,) float64 learned fusion scores of the candidates described by ``env``."""
        return self.score_features(self.features(env, n))

    def explain_inputs(self, features: Float32Array, i: int) -> dict[str, float]:
        """Candidate ``i``'s inputs by name, as the model saw them (float32 rounding included)."""
        return {name: float(features[i, j]) for j, name in enumerate(self.inputs)}

    def warm_up(self) -> None:
        """Score two all-zero rows once: a graph that cannot run fails at load, not on traffic."""
        where = f"LTR model {self.model.name}/{self.model.version}"
        try:
            (out,) = self.session.run(
                [self._output_name],
                {self._input_name: np.zeros((2, len(self.inputs)), dtype=np.float32)},
            )
        except Exception as e:  # a graph whose computation fails on valid input
            raise LtrLoadError(f"{where}: {LTR_MODEL_FILE}: warm-up failed: {e}") from e
        if np.asarray(out).size != 2:
            raise LtrLoadError(
                f"{where}: {LTR_MODEL_FILE}: warm-up gave shape {np.asarray(out).shape} for 2 rows"
            )


def _check_signature(session: ort.InferenceSession, meta: LtrMetadata, where: str) -> None:
    """The graph takes float32 [N, len(inputs)] named input_name and gives [N] or [N, 1]."""
    f = len(meta.inputs)
    ins, outs = session.get_inputs(), session.get_outputs()
    if [i.name for i in ins] != [meta.input_name]:
        raise LtrLoadError(
            f"{where}: {LTR_MODEL_FILE} inputs are {[i.name for i in ins]}, but {METADATA_FILE} "
            f"input_name is {meta.input_name!r}"
        )
    shape = list(ins[0].shape)
    if ins[0].type != _FLOAT or len(shape) != 2 or shape[1] != f:
        raise LtrLoadError(
            f"{where}: {LTR_MODEL_FILE} input {meta.input_name!r} is {ins[0].type} {shape}, but "
            f"{METADATA_FILE} inputs name {f} columns (float32 [N, {f}])"
        )
    names = [o.name for o in outs]
    if meta.output_name not in names:
        raise LtrLoadError(
            f"{where}: {LTR_MODEL_FILE} outputs are {names}, but {METADATA_FILE} output_name is "
            f"{meta.output_name!r}"
        )
    out = outs[names.index(meta.output_name)]
    dims = list(out.shape)
    if out.type != _FLOAT or not (len(dims) == 1 or (len(dims) == 2 and dims[1] == 1)):
        raise LtrLoadError(
            f"{where}: {LTR_MODEL_FILE} output {meta.output_name!r} is {out.type} {dims}, "
            "expected float32 [N] or [N, 1]"
        )
