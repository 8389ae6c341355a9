# The keyhole broker image: a static binary on an empty base.
#   docker build -t keyhole:0.1.0 .
# (Where no registry is reachable, scripts/image.sh builds the same image
# FROM scratch from a locally built static binary.)
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked --target x86_64-unknown-linux-gnu \
 && install -D -m 0755 target/x86_64-unknown-linux-gnu/release/keyhole /out/keyhole

FROM scratch
COPY --from=build /out/keyhole /keyhole
ENTRYPOINT ["/keyhole"]
CMD ["serve"]
