# syntax=docker/dockerfile:1
#
# One image with both programs:
#   vm-webapp   — the runtime the operator deploys (`vm-webapp serve|worker|migrate`);
#   vm-operator — the operator the Helm chart runs (`vm-operator run`).
# Both sit on PATH (/usr/local/bin), because the operator's pods and the chart
# set `command: [vm-webapp]` / `command: [vm-operator]` and pass the subcommand
# as args. The default entrypoint serves the API.
#
# Runtime: distroless cc (glibc, libgcc, CA certificates, tzdata; no shell, no
# package manager), user 10001:10001 as the operator's pod security context
# expects, workspace /var/data/vm. Expected size: about 55 MB (see
# docs/operations.md).
#
#   docker build -t ghcr.io/vmwebapp/vm-webapp:0.1.0 .

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
# Strip symbols from the release binaries (a third of their size); backtraces
# keep function names through the unwind tables.
ENV CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_TERM_COLOR=never
COPY Cargo.toml Cargo.lock ./
COPY app ./app
COPY operator ./operator
COPY examples ./examples
COPY crds ./crds
# Cache mounts keep the registry and build output between builds; the binaries
# are copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --workspace --bins \
 && mkdir -p /out/bin /out/var/data/vm \
 && cp target/release/vm-webapp target/release/vm-operator /out/bin/

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/bin/vm-webapp /out/bin/vm-operator /usr/local/bin/
COPY --from=builder --chown=10001:10001 /out/var/data/vm /var/data/vm
ENV VM_WORKSPACE_ROOT=/var/data/vm
WORKDIR /var/data/vm
USER 10001:10001
EXPOSE 8000 9091 8080
ENTRYPOINT ["vm-webapp"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
