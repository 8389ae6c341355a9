#!/usr/bin/env bash
# Rotation without a restart: the app prints its secret every second and
# says "reloaded" when keyhole sends SIGHUP after a rotation.
set -euo pipefail
printf '%s' 'first-value' | keyhole secret put demo/secret --stdin
keyhole workload add demo --selector docker:label:com.example.app=demo
keyhole grant demo/secret --to demo --notify HUP
docker run -d --name keyhole-demo --label com.example.app=demo --read-only --cap-drop ALL \
    -v /run/keyhole/workloads/demo:/run/secrets:ro,rslave busybox:1.36.1 \
    sh -c "trap 'echo reloaded' HUP; trap 'exit 0' TERM; while true; do cat /run/secrets/secret; echo; sleep 1; done"
sleep 3
keyhole secret rotate demo/secret --generate 24
sleep 2
docker logs keyhole-demo | tail -4      # first-value, reloaded, then the new value
docker rm -f keyhole-demo >/dev/null
