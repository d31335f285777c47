# The denokv-on-Fly image: supervisord (PID 1) runs the start-up/restore step with
# Litestream and denokv, the Deno proxy, and Supercronic for the nightly backup check.
# Every version is pinned. `deno task test:image` builds this file unchanged with buildah
# and boots it; its build arguments only swap download sources (see tests/image/).

ARG DENO_VERSION=2.9.6
ARG DENOKV_VERSION=0.14.0

# The official denokv binary, taken from its own image (tags are the release numbers;
# the tests run the same release built by `cargo install denokv --version 0.14.0 --locked`).
FROM ghcr.io/denoland/denokv:${DENOKV_VERSION} AS denokv

# The official Deno binary (/deno).
FROM denoland/deno:bin-${DENO_VERSION} AS deno

# npm work on the same Debian base as the final image (Debian's npm: one base image
# fewer than a node image), thrown away after the two copies below.
FROM debian:bookworm-slim AS npm
ARG LITESTREAM_VERSION=0.3.13
RUN apt-get update \
  && apt-get install -y --no-install-recommends npm \
  && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY package.json package-lock.json ./
# Litestream: the very binary the tests run, from npm @flydotio/litestream-linux-x64
# (ships Litestream 0.3.13), pinned and sha512-checked by package-lock.json. Then the
# production dependencies (Hono, the S3 client, nodemailer...) alone, from npm's cache.
RUN npm ci --ignore-scripts --no-audit --no-fund \
  && ./node_modules/@flydotio/litestream-linux-x64/litestream version | grep -qx "v${LITESTREAM_VERSION}" \
  && cp ./node_modules/@flydotio/litestream-linux-x64/litestream /usr/local/bin/litestream \
  && npm ci --omit=dev --ignore-scripts --no-audit --no-fund

FROM debian:bookworm-slim

RUN apt-get update \
  && apt-get install -y --no-install-recommends ca-certificates curl supervisor sqlite3 \
  && rm -rf /var/lib/apt/lists/*

# The official release and the SHA1 Supercronic publishes with it (supercronic-linux-amd64).
# Builders that cannot reach GitHub pass another source and its sum; the check stays.
# Declared after the apt step so that another URL or version keeps that layer cached.
ARG SUPERCRONIC_VERSION=v0.2.48
ARG SUPERCRONIC_URL=https://github.com/aptible/supercronic/releases/download/${SUPERCRONIC_VERSION}/supercronic-linux-amd64
ARG SUPERCRONIC_SHA1SUM=016b7c9aebfc8d9fd9526e8ba33b191fc524485f
RUN curl -fsSLo /usr/local/bin/supercronic "${SUPERCRONIC_URL}" \
  && echo "${SUPERCRONIC_SHA1SUM}  /usr/local/bin/supercronic" | sha1sum -c - \
  && chmod +x /usr/local/bin/supercronic

COPY --from=npm /usr/local/bin/litestream /usr/local/bin/litestream
COPY --from=denokv /usr/local/bin/denokv /usr/local/bin/denokv
COPY --from=deno /deno /usr/local/bin/deno

ENV APP_DIR=/app \
    DATA_DIR=/data \
    DB_PATH=/data/denokv.sqlite \
    DENO_DIR=/app/.deno \
    DENOKV_URL=http://127.0.0.1:4513 \
    PORT=4512 \
    REPLICA_PATH=denokv \
    DENO_NO_UPDATE_CHECK=1

WORKDIR /app
COPY --from=npm /app/node_modules ./node_modules
COPY deno.json package.json package-lock.json supervisord.conf crontab litestream.yml ./
COPY proxy/ ./proxy/
COPY lib/ ./lib/
COPY scripts/ ./scripts/

# Cache every Deno entry point at build time so a boot needs no network, nor do the
# nightly check and `deno task restore|rollback` (scripts/restore/, run with this `deno`).
RUN deno cache proxy/main.ts scripts/*/*.ts \
  && chmod +x scripts/boot/start_denokv.sh \
  && mkdir -p /data

EXPOSE 4512
ENTRYPOINT ["supervisord", "-n", "-c", "/app/supervisord.conf"]
