# The gateway in a container: the same command as the README, as a non-root user.
FROM python:3.11-slim

RUN useradd --create-home --uid 10001 gateway
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY setup.py ./
# gcc only for the build: setup.py compiles the fast path with mypyc (without it, plain Python).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install --no-cache-dir . \
    && apt-get purge -y gcc libc6-dev && apt-get autoremove -y && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data && chown gateway /data
COPY config.yaml ./

USER gateway
# Listen on every interface inside the container; keep the embedded store on a volume.
ENV GATEWAY_LISTEN__HOST=0.0.0.0 \
    GATEWAY_REDIS__DATA_FILE=/data/gateway-data.json
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/_gateway/health', timeout=2).status == 200 else 1)"
CMD ["gateway", "--config", "config.yaml"]
