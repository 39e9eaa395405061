# forge-worker image: the locked dependencies installed with uv into /opt/venv, run as a
# non-root user. Build: docker build -t forge-worker:local .   (docker-compose.yml does this)

# ---- build stage: resolve nothing, install exactly uv.lock --------------------------------
FROM python:3.11-slim AS build
# the uv that wrote uv.lock (lock revision 5 needs a recent one)
RUN pip install --no-cache-dir --disable-pip-version-check uv==0.13.9
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON_PREFERENCE=only-system \
    UV_PROJECT_ENVIRONMENT=/opt/venv
WORKDIR /src
# dependencies first, so a code change does not reinstall them
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --locked --no-dev --no-install-project
COPY worker ./worker
COPY schemas ./schemas
RUN uv sync --locked --no-dev --no-editable

# ---- runtime stage ------------------------------------------------------------------------
FROM python:3.11-slim
# /data: where `plc serve` (the compose dev profile) keeps its operations; a named volume
# mounted there starts with this directory's owner, so the non-root user can write it
RUN groupadd --system --gid 10001 forge \
 && useradd --system --uid 10001 --gid forge --home-dir /home/forge --create-home forge \
 && mkdir -p /data && chown forge:forge /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FORGE_WORKER_LOG_FORMAT=json
USER forge
WORKDIR /home/forge
# /readyz answers 200 once the worker consumes; it listens on 127.0.0.1 inside the container,
# so the check runs here, with Python (the image has no curl).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('FORGE_WORKER_HTTP_PORT', '9464'), timeout=4)"
CMD ["forge-worker", "run"]
