# One image per orderflow stage, and a tools image with the `orderflow` command:
#
#   docker build --build-arg STAGE=receiver -t orderflow-receiver .   # or stock, invoice, notifier
#   docker build --target tools -t orderflow-tools .
#
# docker-compose.yml builds all five. Stages, in this order so that `--target prebuilt` and
# `--target tools-prebuilt` never build the Rust toolchain stage with the classic builder (which runs
# every stage before its target; so the prebuilt stages must also pass in a plain checkout, whose
# context has no bin/: they copy `Dockerfil[e] bi[n]`, patterns that may match nothing):
#   user-base      the non-root user every image runs as
#   runtime-base   the layout every stage image shares: data volume, entrypoint, health check (the
#                  binary's own `health` subcommand asks its grpc.health.v1)
#   tools-prebuilt user-base + the build context's bin/ (the container test puts a host-built
#                  `orderflow` there), entrypoint `orderflow`
#   prebuilt       runtime-base + a stage binary built elsewhere: the build context holds
#                  bin/orderflow-stage (the container test uses it with host-built binaries)
#   builder        compiles the four stage binaries and the CLI on the official Rust image
#   tools          user-base + the builder's `orderflow` (CLI: load, place, get, stock, dlq, …)
#   runtime        runtime-base + the builder's stage binary (the default target)

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUNTIME_IMAGE} AS user-base
RUN groupadd --system --gid 10001 orderflow \
 && useradd --system --uid 10001 --gid orderflow --home-dir /var/lib/orderflow \
      --no-create-home --shell /usr/sbin/nologin orderflow \
 && mkdir -p /var/lib/orderflow \
 && chown orderflow:orderflow /var/lib/orderflow

FROM user-base AS runtime-base
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

FROM user-base AS tools-prebuilt
# The classic builder also runs this stage for `--target prebuilt` and leaves it as an untagged
# image; the label lets the container test remove exactly those.
LABEL org.orderflow.stage=tools-prebuilt
COPY Dockerfil[e] bi[n] /usr/local/bin/
WORKDIR /var/lib/orderflow
USER orderflow:orderflow
ENTRYPOINT ["orderflow"]
CMD ["--help"]

FROM runtime-base AS prebuilt
COPY Dockerfil[e] bi[n] /usr/local/bin/

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
      -p orderflow-receiver -p orderflow-stock -p orderflow-invoice -p orderflow-notifier \
      -p orderflow-cli \
 && mkdir -p /out \
 && cp target/release/orderflow-receiver target/release/orderflow-stock \
       target/release/orderflow-invoice target/release/orderflow-notifier \
       target/release/orderflow /out/

FROM user-base AS tools
LABEL org.opencontainers.image.title="orderflow-tools" \
      org.opencontainers.image.description="the orderflow command (load, place, get, stock, dlq, faults)" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/orderflow /usr/local/bin/orderflow
WORKDIR /var/lib/orderflow
USER orderflow:orderflow
ENTRYPOINT ["orderflow"]
CMD ["--help"]

FROM runtime-base AS runtime
ARG STAGE=receiver
LABEL org.opencontainers.image.title="orderflow-${STAGE}" \
      org.opencontainers.image.description="orderflow ${STAGE} stage" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/orderflow-${STAGE} /usr/local/bin/orderflow-stage
