# The agent and operator image the Kubernetes manifests run
# (deploy/kubernetes; docs/kubernetes.md). Docker does not run on the
# project's CI machines, so this file is not built in CI.
FROM rust:1.88-bookworm AS build
RUN apt-get update -qq && apt-get install -y -qq libssl-dev pkg-config >/dev/null
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin meridian

# glibc, libssl and a nonroot user (65532, as the StatefulSet runs it)
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/meridian /usr/local/bin/meridian
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/meridian"]
