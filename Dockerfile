# A container image of kube-aggregation-proxy (not built on these machines; see the README):
#   docker build -t <registry>/kube-aggregation-proxy:<tag> .
# Multi-stage: the release build in the Rust image, then only the binary on a slim base,
# running as a non-root user (the Deployment in manifests/deploy expects UID 65532).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin kube-aggregation-proxy

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/kube-aggregation-proxy /usr/local/bin/kube-aggregation-proxy
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kube-aggregation-proxy"]
CMD ["serve", "--config", "/etc/kube-aggregation-proxy/proxy.yaml"]
