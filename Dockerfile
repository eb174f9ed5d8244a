# privacy-relay as a sidecar: other containers send mail to it on port 1025.
# Configure it with RELAY_* environment variables (see the README and docs/docker.md).

# Any image with Python 3.11 or newer (python, python -m venv, pip) will do: CI, which reaches no image
# registry, builds one from Debian's packages (.ci/docker-base) and passes it with --build-arg.
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS build
# Build into a virtual environment so the final stage copies one folder and no build tools.
RUN python -m venv /opt/venv
WORKDIR /src
# The dependencies first, in their own layer: a change to the relay's code rebuilds only the last step.
# With the PostgreSQL driver (the postgres extra), so the same image can be one of several relays
# sharing a spool (spool.url).
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print(*p['dependencies'], *p['optional-dependencies']['postgres'], sep='\n')" \
        >requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir -r requirements.txt
COPY README.md ./
COPY relay/ relay/
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps .

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="privacy-relay" \
      org.opencontainers.image.description="A local SMTP relay that stops mail from exposing recipients' addresses to each other" \
      org.opencontainers.image.licenses="Apache-2.0"

# The relay never runs as root: a system user owns only its working folder, the outbox and the spool.
RUN groupadd --gid 10001 relay \
    && useradd --uid 10001 --gid relay --no-log-init --home-dir /var/lib/privacy-relay --create-home \
       --shell /usr/sbin/nologin relay \
    && install --directory --owner relay --group relay /var/lib/privacy-relay/outbox \
    && install --directory --owner relay --group relay --mode 0700 /var/spool/privacy-relay

COPY --from=build /opt/venv /opt/venv

# Listening on every interface inside the container is safe only with RELAY_LISTEN_ALLOWED_NETWORKS:
# without it the relay refuses to start (it would be an open relay). Set it when you run the image.
ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RELAY_LISTEN_HOST=0.0.0.0 \
    RELAY_OUTBOX=/var/lib/privacy-relay/outbox \
    RELAY_SPOOL_PATH=/var/spool/privacy-relay

# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /var/lib/privacy-relay
# The spool holds accepted mail until the upstream takes it: keep it on a volume across restarts.
VOLUME ["/var/lib/privacy-relay/outbox", "/var/spool/privacy-relay"]
EXPOSE 1025

# Healthy when the console's /healthz says the relay accepts mail and its spool can be written (urlopen
# raises on its 503). The console listens on 127.0.0.1 inside the container, and /healthz needs no token.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('RELAY_CONSOLE_PORT', '8725'), timeout=4)"]

CMD ["privacy-relay", "serve"]
