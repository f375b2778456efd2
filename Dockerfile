# syntax=docker/dockerfile:1
#
# The session-server image: the release binary on a distroless base that has
# glibc, libgcc and CA certificates, and no shell or package manager.
#
#   docker build -t session-server:0.1.0 .
#   docker run --rm -p 50051:50051 -p 9090:9090 \
#     -e REDIS_URL=redis://host.docker.internal:6379 session-server:0.1.0
#
# Needs BuildKit (the default builder since Docker 23) for the cache mounts.

# No HEALTHCHECK: the image has no shell or probe binary, and Kubernetes uses
# its own gRPC probes (k8s/base/deployment.yaml), not Docker's.
# checkov:skip=CKV_DOCKER_2:Kubernetes probes the gRPC health service natively; distroless has no probe binary

# Builder and runtime are both Debian 12 (bookworm), so the binary links against
# the same glibc the runtime image ships. Both are pinned by tag; a release
# pipeline that refreshes them may add digests (`image:tag@sha256:...`).
FROM rust:1.95-bookworm AS builder
WORKDIR /src

# No incremental state in a one-shot release build; plain log lines in CI.
ENV CARGO_INCREMENTAL=0 \
    CARGO_TERM_COLOR=never

# protoc comes from the protoc-bin-vendored crate (see build.rs), so no system
# package is installed here.
#
# Dependency caching: the cargo registry, git checkouts and target/ live in
# BuildKit cache mounts, so a rebuild after a source change recompiles only the
# workspace crates, never the ~200 dependencies. This needs no copy of the crate
# layout in the Dockerfile (a stub-`main.rs` layer breaks as soon as a workspace
# member is added). A CI builder without a persistent BuildKit cache rebuilds
# everything; if that matters, switch to cargo-chef's prepare/cook layers.
#
# The target/ mount is not part of the image, so the binary is copied out of it
# in the same step.
COPY . .
RUN --mount=type=cache,id=sessionstore-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=sessionstore-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=sessionstore-target,target=/src/target,sharing=locked \
    cargo build --release --locked -p session-server \
    && install -D -m 0755 target/release/session-server /out/session-server

FROM gcr.io/distroless/cc-debian12:nonroot

LABEL org.opencontainers.image.title="session-server" \
      org.opencontainers.image.description="SessionStore gRPC session service over Redis" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=builder /out/session-server /usr/local/bin/session-server

# The :nonroot tag already runs as 65532; saying it numerically lets Kubernetes
# check runAsNonRoot without a /etc/passwd lookup.
USER 65532:65532

# 50051: gRPC (SessionStore, grpc.health.v1, reflection). 9090: Prometheus /metrics.
EXPOSE 50051 9090

# The binary is PID 1 and handles SIGTERM itself: it turns health NOT_SERVING and
# drains in-flight calls for up to 20 s. Exec form, so no shell sits in between.
# Settings are environment variables; see session-server/src/config.rs.
ENTRYPOINT ["/usr/local/bin/session-server"]
