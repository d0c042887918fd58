# Two images from one build: `gatekeeper` and `worker` (docker-compose.yml picks the target).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin gatekeeper --bin worker

FROM debian:bookworm-slim AS base
RUN useradd --system --home /app gatehouse && mkdir -p /app/config /data && chown gatehouse /data
WORKDIR /app
COPY config /app/config
USER gatehouse

FROM base AS gatekeeper
COPY --from=build /src/target/release/gatekeeper /usr/local/bin/gatekeeper
EXPOSE 8443
ENTRYPOINT ["gatekeeper", "config/gatekeeper.toml"]

FROM base AS worker
# bubblewrap: the sandbox of executable kinds (user namespaces; no setuid bit, no capability).
USER root
RUN apt-get update && apt-get install -y --no-install-recommends bubblewrap \
    && rm -rf /var/lib/apt/lists/*
USER gatehouse
COPY --from=build /src/target/release/worker /usr/local/bin/worker
ENTRYPOINT ["worker", "config/worker.toml"]
