# syntax=docker/dockerfile:1
# The gateway in a container. The build stage makes the wheels: the gateway's own with the request
# path compiled by mypyc (this image has gcc and the Python headers), and its dependencies'. The
# runtime stage is slim Python with those wheels installed and nothing else of the build: no
# compiler, no sources. Both stages are the same Python (the compiled modules are for its ABI).
#
#   docker build -t flespi-token-gateway .
#   docker run -p 8080:8080 -v gateway-data:/data -e GATEWAY_UPSTREAM=http://api:8000 flespi-token-gateway

FROM python:3.11.11-bookworm AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY gateway ./gateway
# What .ci/container-check runs outside Docker: `pip wheel . -w dist`, then a refusal if the
# gateway's wheel came out without its compiled modules (setup.py falls back to plain Python).
RUN pip wheel --no-cache-dir . -w /dist \
    && python -c "import glob, sys, zipfile; [wheel] = glob.glob('/dist/flespi_token_gateway-*.whl'); \
sys.exit(0 if any(name.endswith('.so') for name in zipfile.ZipFile(wheel).namelist()) else 'not compiled')"

FROM python:3.11.11-slim-bookworm
ENV PATH=/opt/gateway/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# The wheels are mounted from the build stage for this step only, so no layer keeps them.
RUN --mount=type=bind,from=build,source=/dist,target=/dist \
    python -m venv /opt/gateway \
    && /opt/gateway/bin/pip install --no-cache-dir --no-index --find-links=/dist /dist/flespi_token_gateway-*.whl \
    && groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home --shell /usr/sbin/nologin gateway \
    && mkdir /data && chown 10001:10001 /data && chmod 0700 /data
COPY config.yaml /etc/gateway/config.yaml

# The shipped config.yaml, adjusted for a container by the environment (README, "Configuration"):
# every interface, the embedded store on the volume. Set the port here, not in a mounted file:
# the health check reads it from this variable.
ENV GATEWAY_LISTEN__HOST=0.0.0.0 \
    GATEWAY_LISTEN__PORT=8080 \
    GATEWAY_REDIS__DATA_FILE=/data/gateway-data.json
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080
# Readiness (the store answers, invalidation is live), asked from inside, on the configured port.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; url = 'http://127.0.0.1:%s%sready' % (os.environ.get('GATEWAY_LISTEN__PORT', '8080'), os.environ.get('GATEWAY_INTERNAL_PREFIX', '/_gateway/')); sys.exit(0 if urllib.request.urlopen(url, timeout=2).status == 200 else 1)"]
CMD ["gateway", "--config", "/etc/gateway/config.yaml"]
