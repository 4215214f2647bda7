# syntax=docker/dockerfile:1
# creditd image: build with the Rust toolchain, run on a minimal non-root base.
#
#   docker build -t creditd:0.1.0 \
#     --build-arg VERSION=0.1.0 --build-arg REVISION=$(git rev-parse HEAD) \
#     --build-arg SOURCE=$(git remote get-url origin) .
#   docker run --rm -p 50051:50051 -e DATABASE_URL=… -e REDIS_URL=… creditd:0.1.0 serve
#
# protoc comes vendored (build.rs), migrations are embedded in the binary. The
# image includes OTLP span export (feature otlp; log.otlp_endpoint turns it on).
# The binary is built with the `dist` profile: no debug info, no symbols.
#
# Base images: pin them by digest in a release build with
#   --build-arg RUST_IMAGE=rust:1.95-bookworm@sha256:<digest>
#   --build-arg RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot@sha256:<digest>
# (`docker buildx imagetools inspect <image>` prints the digest).

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --profile dist --locked --features otlp --bin creditd \
    && install -D -m 0755 target/dist/creditd /out/creditd

# glibc and libgcc, CA certificates, no shell; runs as nonroot (65532:65532).
FROM ${RUNTIME_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
# Where the source lives (the repository URL of the release build).
ARG SOURCE=""
LABEL org.opencontainers.image.title="creditd" \
      org.opencontainers.image.description="Prepaid-credit gate for AI usage (gRPC)" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
COPY --from=build /out/creditd /usr/local/bin/creditd
USER 65532:65532
# In a container the service must listen beyond loopback; the Helm chart sets
# CREDITD_SERVER__LISTEN itself (127.0.0.1 for a sidecar).
ENV CREDITD_SERVER__LISTEN=0.0.0.0:50051
EXPOSE 50051
ENTRYPOINT ["/usr/local/bin/creditd"]
CMD ["serve"]
