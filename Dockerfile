# syntax=docker/dockerfile:1
# switchyard's container image: built with the pinned Rust toolchain, run as a non-root user (65532, as the
# Kubernetes manifest expects) on Debian slim with CA certificates.
#
#   docker build -t switchyard:0.1.0 .              # or: podman build -t switchyard:0.1.0 .
#   docker run --rm switchyard:0.1.0 run            # the embedded demo: no Salesforce, no Redis
#   docker run -v $PWD/rules:/etc/switchyard/rules:ro -v $PWD/config.yaml:/etc/switchyard/config.yaml:ro \
#     -p 9464:9464 switchyard:0.1.0                 # a real config (http.listen 0.0.0.0:9464 for the probes)
#
# Where no registry is reachable, scripts/image builds this same file on base images it makes from Debian's
# packages and this machine's Rust toolchain (RUST_IMAGE and BASE_IMAGE below).
ARG RUST_IMAGE=docker.io/library/rust:1.95.0-slim-bookworm
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# What the binary is built from (the demo, the rules and the Avro schemas are embedded in it); .dockerignore keeps
# target/, node_modules and the fuzz corpus out of the context.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
COPY benches benches
COPY examples examples
COPY rules rules
COPY schemas schemas
# The registry and the target folder are build caches: a rebuild after a source change compiles switchyard only.
RUN --mount=type=cache,id=switchyard-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=switchyard-target,target=/src/target \
    cargo build --release --locked --bin switchyard \
    && cp target/release/switchyard /usr/local/bin/switchyard \
    && /usr/local/bin/switchyard --version

FROM ${BASE_IMAGE}
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /usr/local/bin/switchyard /usr/local/bin/switchyard
# The user has no shell and no home beyond the state folder (JSONL checkpoints, dead letters of file configs).
# The config and the rules are mounted read-only at /etc/switchyard.
RUN groupadd --system --gid 65532 switchyard \
    && useradd --system --uid 65532 --gid 65532 --home-dir /var/lib/switchyard --no-create-home \
       --shell /usr/sbin/nologin switchyard \
    && mkdir -p /etc/switchyard/rules /var/lib/switchyard \
    && chown 65532:65532 /var/lib/switchyard
USER 65532:65532
WORKDIR /var/lib/switchyard
ENV SWITCHYARD_LOG_FORMAT=json
EXPOSE 9464
# GET /healthz on the listener (http.listen); the binary is its own probe, the image has no curl.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 CMD ["switchyard", "health"]
ENTRYPOINT ["switchyard"]
CMD ["run", "--config", "/etc/switchyard/config.yaml"]
