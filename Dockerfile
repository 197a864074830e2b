# slotlake: one binary per source database. Multi-stage: build with the Rust toolchain, run on
# a minimal Debian of the same release as the build image (so glibc matches; the binary needs
# only libc, libm and libgcc_s) with CA certificates (TLS to Postgres and S3) and a non-root user.
#
#   docker build -t slotlake .
#   docker run --rm slotlake --help

FROM rust:1.95-slim-trixie AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin slotlake \
    && strip target/release/slotlake

FROM debian:trixie-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/slotlake --create-home slotlake
COPY --from=build /src/target/release/slotlake /usr/local/bin/slotlake
USER 10001:10001
WORKDIR /var/lib/slotlake
# Metrics and health on all interfaces inside the container; spill files in the home volume.
ENV SLOTLAKE_METRICS_ADDR=0.0.0.0:9187 \
    SLOTLAKE_SPILL_DIR=/var/lib/slotlake \
    SLOTLAKE_LOG_FORMAT=json
EXPOSE 9187
# `slotlake health` is not a command: the probe is the HTTP endpoint, checked with bash's
# /dev/tcp so the image needs no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD bash -c 'exec 3<>/dev/tcp/127.0.0.1/9187 && printf "GET /healthz HTTP/1.0\r\n\r\n" >&3 && grep -q "200 OK" <&3'
ENTRYPOINT ["slotlake"]
CMD ["run"]
