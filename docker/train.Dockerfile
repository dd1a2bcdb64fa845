# The offline half: synthetic data, training (PyTorch, CPU), ONNX export, feature snapshots.
#
#   docker build -f docker/train.Dockerfile -t mtrank-train .
#   docker run --rm -v "$PWD/models:/app/models" mtrank-train            # the whole pipeline
#   docker run --rm mtrank-train mtrank train --config training/configs/ecommerce_mmoe.yaml
#
# torch comes from the PyTorch CPU index, installed before the project so that the `train`
# extra's pin is already satisfied and pip never resolves the default (CUDA) wheel from PyPI.
# For GPU training build FROM a CUDA base image with TORCH_INDEX_URL pointing at a CUDA index.

ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

# Must match the `train` extra's pin in pyproject.toml (a test checks it).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG APP_UID=10001

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv \
    && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

RUN groupadd --system --gid "${APP_UID}" mtrank \
    && useradd --system --uid "${APP_UID}" --gid mtrank --home-dir /app --shell /usr/sbin/nologin mtrank
WORKDIR /app
# The source tree stays in /app: the job reads training/configs/*.yaml by relative path.
COPY pyproject.toml README.md ./
COPY mtrank ./mtrank
COPY service ./service
COPY training ./training
RUN pip install ".[train]" \
    && python -c "import torch; assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__"
COPY docker/entrypoints/train-pipeline.sh /usr/local/bin/mtrank-train-pipeline
# models/ data/ runs/ are volumes in compose; created here so a fresh named volume inherits the
# non-root owner.
RUN mkdir -p /app/models /app/data /app/runs && chown -R mtrank:mtrank /app
USER 10001:10001
CMD ["mtrank-train-pipeline"]
