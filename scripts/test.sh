#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine, as root:
#   scripts/test.sh
# Installs what the tests need, checks formatting and lints, runs the unit
# tests and the integration suite (real `keyhole serve` processes driven
# through the real CLI), and stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n==> %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/test.sh: run as root: the tests switch uids and read other processes' /proc" >&2
    exit 1
fi
if ! command -v cargo >/dev/null; then
    echo "scripts/test.sh: cargo is missing: install a Rust toolchain >= 1.85 (rustup)" >&2
    exit 1
fi

# Debian packages the tests use; installed only when missing.
packages=(ca-certificates coreutils procps)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    say "installing rustfmt and clippy"
    rustup component add rustfmt clippy
fi

# Anything a test leaves running is ours to stop, whatever happens.
cleanup() { pkill -KILL -f "target/debug/keyhole serve" 2>/dev/null || true; }
trap cleanup EXIT

say "format"
cargo fmt --check
say "lint"
cargo clippy --locked --all-targets -- -D warnings
say "unit and integration tests"
cargo test --locked --lib --test it
