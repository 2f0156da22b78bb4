# The hl7engine image: one image for every role, chosen by the command.
#
#   docker build -t hl7engine .
#   docker run --rm hl7engine --help
#   docker run --rm -p 2575:2575 -p 8080:8080 -v hl7data:/var/lib/hl7engine hl7engine   # all in one, embedded SQLite
#
# docker-compose.yml runs the same image as `db upgrade`, `listen`, `work` and `api` against
# PostgreSQL and RabbitMQ; see docs/deploy.md.

# --- build: install the project and its dependencies into a virtualenv --------------------------
# The compiled build (engine/accel.py): the workers' hot modules compiled with mypyc, about 30% less
# CPU per message in a worker. `docker build --build-arg HL7ENGINE_COMPILE=0 .` gives pure Python.
FROM python:3.11-slim AS build

ARG HL7ENGINE_COMPILE=1
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN if [ "$HL7ENGINE_COMPILE" = 1 ]; then \
        apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi
RUN python -m venv /opt/hl7engine \
    && /opt/hl7engine/bin/pip install "setuptools>=68" wheel
WORKDIR /src
# only what `pip install .` reads, so that editing channels/ or docs/ does not rebuild this layer
COPY pyproject.toml setup.py README.md ./
COPY engine/ ./engine/
# first pure Python with the dependencies (mypyc type-checks against them, as mypy does in CI),
# then the compiled build over it; mypy (and mypyc) only build, the compiled modules do not import
# them, so they leave the image
RUN /opt/hl7engine/bin/pip install --no-build-isolation . \
    && if [ "$HL7ENGINE_COMPILE" = 1 ]; then \
        /opt/hl7engine/bin/pip install "mypy>=1.8" \
        && HL7ENGINE_COMPILE=1 /opt/hl7engine/bin/pip install --no-build-isolation --no-deps --force-reinstall . \
        && /opt/hl7engine/bin/pip uninstall -y mypy ; \
    fi \
    && cd / && /opt/hl7engine/bin/python -m engine.accel status \
    && /opt/hl7engine/bin/hl7engine --help > /dev/null

# --- runtime -------------------------------------------------------------------------------------
FROM python:3.11-slim

ENV PATH=/opt/hl7engine/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HL7ENGINE_DATA_DIR=/var/lib/hl7engine \
    HL7ENGINE_LOG_FORMAT=json

# a fixed UID/GID so that files mounted from the host (TLS keys) can be made readable to it
RUN groupadd --system --gid 10001 hl7engine \
    && useradd --system --uid 10001 --gid hl7engine --no-create-home \
       --home-dir /var/lib/hl7engine --shell /usr/sbin/nologin hl7engine \
    && install -d -o hl7engine -g hl7engine -m 0750 /var/lib/hl7engine

COPY --from=build /opt/hl7engine /opt/hl7engine

# The example configuration. Compose mounts the host's copy over these (read-only), so hospital IT
# edits YAML on the host; without a mount the image runs with these.
COPY channels/ /etc/hl7engine/channels/
COPY mappings/ /etc/hl7engine/mappings/
COPY routes.yaml /etc/hl7engine/routes.yaml

# Embedded mode (no HL7ENGINE_DATABASE_URL / HL7ENGINE_BROKER_URL) keeps its SQLite store and queue
# in HL7ENGINE_DATA_DIR: mount a volume there (`-v hl7data:/var/lib/hl7engine`). Unused by compose.
WORKDIR /etc/hl7engine
USER hl7engine

# 2575: MLLP (channels/lab.yaml); 8080: HTTP (HL7ENGINE_HTTP_PORT: /fhir, /metrics, /healthz)
EXPOSE 2575 8080

# No HEALTHCHECK here: the image runs as `listen`, `work`, `api` and the one-shot `db upgrade`,
# and only some of them serve HTTP. docker-compose.yml gives each role the check that fits it.

ENTRYPOINT ["hl7engine"]
CMD ["run", "--config", "/etc/hl7engine"]
