# The gateway in a container: the same command as the README, as a non-root user.
FROM python:3.11-slim

RUN useradd --create-home --uid 10001 gateway
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install --no-cache-dir . && mkdir -p /data && chown gateway /data
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
