# quota-ledger: one image for every process (migrate, worker, beat, api, CLI).
#   docker build -t quota-ledger .
#   docker compose up -d --scale worker=4
FROM python:3.11-slim AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md alembic.ini ./
COPY events ./events
COPY ledger ./ledger
COPY worker ./worker
COPY examples ./examples
RUN pip wheel --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels \
    && useradd --system --create-home --home-dir /app --uid 10001 ledger \
    && mkdir -p /app/beat && chown ledger /app/beat
# Not root: Celery warns against running a worker as root, and nothing here needs it.
USER ledger
WORKDIR /app
ENTRYPOINT ["quota-ledger"]
CMD ["--help"]
