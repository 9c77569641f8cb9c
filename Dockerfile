# The pipeline's image for Prefect's Docker and Kubernetes work pools (prefect.yaml):
#   docker build -t tlpipe:latest .
# The project lives at /opt/tlpipe with its git history (DVC and the release manifest read
# the commit) and the locked environment, test tools left out; its Python is first on PATH,
# so the worker's `prefect flow-run execute` runs in it.
FROM python:3.11-slim

# git: DVC and the manifest's commit; util-linux: setpriv, which ties the embedded store
# to the run that started it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git util-linux \
    && rm -rf /var/lib/apt/lists/*
RUN pip install --no-cache-dir "uv>=0.5"

WORKDIR /opt/tlpipe
# The dependencies first, in a layer of their own that a code change does not rebuild.
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-dev --no-install-project
COPY . .
RUN uv sync --frozen --no-dev && git config --global --add safe.directory /opt/tlpipe

ENV PATH=/opt/tlpipe/.venv/bin:$PATH \
    PREFECT_SERVER_ANALYTICS_ENABLED=false
CMD ["tlpipe", "run"]
