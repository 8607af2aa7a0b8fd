# One image per orderflow stage:
#
#   docker build --build-arg STAGE=receiver -t orderflow-receiver .   # or stock, invoice, notifier
#
# docker-compose.yml builds all four. Stages, in this order so that `--target prebuilt` never builds
# the Rust toolchain stage with the classic builder:
#   runtime-base  the layout every stage image shares: non-root user, data volume, entrypoint,
#                 health check (the binary's own `health` subcommand asks its grpc.health.v1)
#   prebuilt      runtime-base + a binary built elsewhere: the build context holds
#                 bin/orderflow-<STAGE> (the container test uses it with host-built binaries)
#   builder       compiles the four stage binaries on the official Rust image
#   runtime       runtime-base + the builder's binary (the default target)

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUNTIME_IMAGE} AS runtime-base
RUN groupadd --system --gid 10001 orderflow \
 && useradd --system --uid 10001 --gid orderflow --home-dir /var/lib/orderflow \
      --no-create-home --shell /usr/sbin/nologin orderflow \
 && mkdir -p /var/lib/orderflow \
 && chown orderflow:orderflow /var/lib/orderflow
# Each stage's listen and metrics ports default to its own (50051-50054, 9451-9454) on 0.0.0.0.
ENV ORDERFLOW_DATA_DIR=/var/lib/orderflow \
    RUST_LOG=info
VOLUME ["/var/lib/orderflow"]
WORKDIR /var/lib/orderflow
USER orderflow:orderflow
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=5s --timeout=5s --start-period=20s --retries=3 \
  CMD ["orderflow-stage", "health", "--timeout", "3s"]
ENTRYPOINT ["orderflow-stage"]

FROM runtime-base AS prebuilt
ARG STAGE
COPY bin/orderflow-${STAGE} /usr/local/bin/orderflow-stage

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
      -p orderflow-receiver -p orderflow-stock -p orderflow-invoice -p orderflow-notifier \
 && mkdir -p /out \
 && cp target/release/orderflow-receiver target/release/orderflow-stock \
       target/release/orderflow-invoice target/release/orderflow-notifier /out/

FROM runtime-base AS runtime
ARG STAGE=receiver
LABEL org.opencontainers.image.title="orderflow-${STAGE}" \
      org.opencontainers.image.description="orderflow ${STAGE} stage" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/orderflow-${STAGE} /usr/local/bin/orderflow-stage
