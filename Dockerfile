# syntax=docker/dockerfile:1
# creditd image: build with the Rust toolchain, run on a minimal non-root base.
#
#   docker build -t creditd:0.1.0 .
#   docker run --rm -p 50051:50051 -e DATABASE_URL=… -e REDIS_URL=… creditd:0.1.0 serve
#
# protoc comes vendored (build.rs), migrations are embedded in the binary. The
# image includes OTLP span export (feature otlp; log.otlp_endpoint turns it on).

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --features otlp --bin creditd \
    && install -D -m 0755 target/release/creditd /out/creditd

# glibc and libgcc, CA certificates, no shell; runs as nonroot (65532:65532).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/creditd /usr/local/bin/creditd
USER 65532:65532
# In a container the service must listen beyond loopback; the Helm chart sets
# CREDITD_SERVER__LISTEN itself (127.0.0.1 for a sidecar).
ENV CREDITD_SERVER__LISTEN=0.0.0.0:50051
EXPOSE 50051
ENTRYPOINT ["/usr/local/bin/creditd"]
CMD ["serve"]
