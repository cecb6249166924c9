# The ragtide image: embedder, retriever and the CLI (torch + the bundled all-MiniLM-L6-v2; no model hub).
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    RAGTIDE_SOURCES_FILE=/app/config/sources.yaml RAGTIDE_DATA_DIR=/var/lib/ragtide
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
COPY config ./config
COPY infra/config ./infra/config
RUN pip install -c constraints.txt . && useradd --system --uid 10001 ragtide \
    && mkdir -p /var/lib/ragtide && chown ragtide /var/lib/ragtide
USER ragtide
EXPOSE 8000
CMD ["ragtide", "retriever"]
