# The online ranking service: FastAPI + uvicorn + ONNX Runtime, no torch.
#
#   docker build -f docker/service.Dockerfile -t mtrank-service .
#   docker run --rm -p 8000:8000 -v "$PWD/models:/app/models:ro" \
#       -e MTRANK_REDIS_URL=redis://redis:6379/0 mtrank-service
#
# Two stages: the first builds the mtrank wheel and installs it with the `serve` extra into a
# virtual environment; the second copies only that environment onto a clean slim image, so no
# compiler, pip cache or source tree ships. Only `serve` is installed: the image must never pull
# torch, by far the largest wheel of the training stack, which serving never imports.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
# Sources last, so a code change does not invalidate the venv layer above.
COPY pyproject.toml README.md ./
COPY mtrank ./mtrank
COPY service ./service
COPY training ./training
# A wheel, not an editable install: the runtime stage has no /src. The wheel carries
# service/config/*.yaml as package data.
# The last line fails the build if anything dragged torch in.
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
    && whl="$(ls /wheels/mtrank-*.whl)" \
    && /opt/venv/bin/pip install "${whl}[serve]" \
    && /opt/venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"

FROM ${PYTHON_IMAGE} AS runtime
# A fixed numeric uid so volume permissions (models/, the metrics dir) can be set from outside.
ARG APP_UID=10001
RUN groupadd --system --gid "${APP_UID}" mtrank \
    && useradd --system --uid "${APP_UID}" --gid mtrank --home-dir /app --shell /usr/sbin/nologin mtrank
COPY --from=build /opt/venv /opt/venv
COPY docker/entrypoints/serve.sh /usr/local/bin/mtrank-serve
# MTRANK_WORKERS uvicorn processes, each with its own ONNX Runtime session using
# MTRANK_ORT_INTRA_THREADS threads: keep WORKERS x INTRA_THREADS <= the CPUs the container gets,
# or the sessions fight over cores and tail latency grows.
# PROMETHEUS_MULTIPROC_DIR: with several workers prometheus_client writes one file per process
# there and /metrics sums them; mount a tmpfs on it (compose does) so the files die with the
# container. The entrypoint also empties it before start.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MTRANK_HOST=0.0.0.0 \
    MTRANK_PORT=8000 \
    MTRANK_WORKERS=2 \
    MTRANK_ORT_INTRA_THREADS=1 \
    MTRANK_ORT_PROVIDERS=auto \
    MTRANK_MODEL_DIR=/app/models \
    PROMETHEUS_MULTIPROC_DIR=/run/mtrank/metrics
WORKDIR /app
RUN mkdir -p /app/models "${PROMETHEUS_MULTIPROC_DIR}" \
    && chown -R mtrank:mtrank /app /run/mtrank
USER 10001:10001
EXPOSE 8000
# Liveness only (/healthz): readiness (/readyz) is for load balancers. python, not curl: the slim
# image has no curl and adding it for one probe is not worth the surface.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('MTRANK_PORT', '8000'); r = urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2); sys.exit(0 if r.status == 200 else 1)"]
ENTRYPOINT ["mtrank-serve"]
