# The denokv-on-Fly image: supervisord (PID 1) runs the start-up/restore step with
# Litestream and denokv, the Deno proxy, and Supercronic for the nightly backup check.
# Every version is pinned; no Docker engine runs in CI, so tests/config_files_test.ts
# checks that everything copied here exists and every configured path resolves.

ARG DENO_VERSION=2.9.6
ARG DENOKV_VERSION=0.14.0
ARG NODE_VERSION=20.19.5

# The official denokv binary, taken from its own image (tags are the release numbers;
# the newest release, built from crates.io by the tests; binary at /usr/local/bin/denokv).
FROM ghcr.io/denoland/denokv:${DENOKV_VERSION} AS denokv

# The official Deno binary.
FROM denoland/deno:bin-${DENO_VERSION} AS deno

# npm dependencies (Hono, the S3 client, nodemailer...) resolved from package-lock.json.
FROM node:${NODE_VERSION}-bookworm-slim AS deps
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --ignore-scripts

# Litestream: the very binary the tests run, from npm @flydotio/litestream-linux-x64
# (ships Litestream 0.3.13), pinned and sha512-checked by package-lock.json.
FROM node:${NODE_VERSION}-bookworm-slim AS litestream
ARG LITESTREAM_VERSION=0.3.13
WORKDIR /build
COPY package.json package-lock.json ./
RUN npm ci --ignore-scripts --no-audit --no-fund \
  && ./node_modules/@flydotio/litestream-linux-x64/litestream version | grep -qx "v${LITESTREAM_VERSION}"

FROM debian:bookworm-slim
ARG SUPERCRONIC_VERSION=v0.2.48
# Supercronic publishes SHA1 sums with each release (supercronic-linux-amd64).
ARG SUPERCRONIC_SHA1SUM=71b0d58cc53f6bd72cf2f293e09e294b79c666d8

RUN apt-get update \
  && apt-get install -y --no-install-recommends ca-certificates curl supervisor sqlite3 \
  && rm -rf /var/lib/apt/lists/*

RUN curl -fsSLo /usr/local/bin/supercronic \
    "https://github.com/aptible/supercronic/releases/download/${SUPERCRONIC_VERSION}/supercronic-linux-amd64" \
  && echo "${SUPERCRONIC_SHA1SUM}  /usr/local/bin/supercronic" | sha1sum -c - \
  && chmod +x /usr/local/bin/supercronic

COPY --from=litestream /build/node_modules/@flydotio/litestream-linux-x64/litestream /usr/local/bin/litestream
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
COPY --from=deps /app/node_modules ./node_modules
COPY deno.json package.json package-lock.json supervisord.conf crontab litestream.yml ./
COPY proxy/ ./proxy/
COPY lib/ ./lib/
COPY scripts/ ./scripts/

# Cache every Deno entry point at build time so a boot needs no network.
RUN deno cache proxy/main.ts scripts/*.ts \
  && chmod +x scripts/start_denokv.sh \
  && mkdir -p /data

EXPOSE 4512
ENTRYPOINT ["supervisord", "-n", "-c", "/app/supervisord.conf"]
