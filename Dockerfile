# WhatSignal: single-file, standard-library-only bridge (WAHA <-> signal-cli).
# Runs unprivileged and works under:
#   docker run --read-only --tmpfs /tmp --security-opt no-new-privileges:true ...
# Writable paths: /app/data (database), /app/cache (media), /tmp.
# The base is pinned by digest (python:3.12-slim); to move to a newer one:
#   docker pull python:3.12-slim && docker inspect --format '{{index .RepoDigests 0}}' python:3.12-slim
FROM python:3.12-slim@sha256:78387bc3881b8273120a12ebe6c1ab22b018ccc2c9adf565ae1ac9b536e184ea

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    WHATSIGNAL_CONFIG=/app/config.json \
    WHATSIGNAL_HOST=0.0.0.0 \
    DB_PATH=/app/data/whatsignal.db \
    MEDIA_DIR=/app/cache

RUN groupadd --system --gid 10001 whatsignal \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /app --shell /usr/sbin/nologin whatsignal \
    && mkdir -p /app/data /app/cache \
    && chown whatsignal:whatsignal /app/data /app/cache \
    && chmod 0750 /app/data /app/cache

WORKDIR /app

# Code and the example config stay root-owned (read-only for the app user).
# Mount your real config at /app/config.json.
COPY whatsignal.py config.example.json /app/

VOLUME ["/app/data", "/app/cache"]

EXPOSE 8082

HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8082/healthz', timeout=4).status == 200 else 1)"]

# Numeric uid:gid of the whatsignal user (lets Kubernetes runAsNonRoot verify it).
USER 10001:10001

ENTRYPOINT ["python", "/app/whatsignal.py"]
CMD ["serve"]
