#!/usr/bin/env bash
# Build the broker image without a registry: a static keyhole binary in an
# image FROM scratch, tagged keyhole:<version> (what docker-compose.yml runs).
#   scripts/image.sh            release build
#   scripts/image.sh --debug    debug build (faster to compile; the tests use it)
set -euo pipefail
cd "$(dirname "$0")/.."
profile=release
[ "${1:-}" = "--debug" ] && profile=debug
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
target=x86_64-unknown-linux-gnu
flags=(--locked --target "$target")
[ "$profile" = release ] && flags+=(--release)
RUSTFLAGS="-C target-feature=+crt-static" cargo build "${flags[@]}"
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
install -m 0755 "target/$target/$profile/keyhole" "$ctx/keyhole"
cat > "$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY keyhole /keyhole
ENTRYPOINT ["/keyhole"]
CMD ["serve"]
DOCKERFILE
docker build -q -t "keyhole:$version" "$ctx" >/dev/null
echo "built keyhole:$version ($profile)"
