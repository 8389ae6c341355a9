#!/usr/bin/env bash
# Host-bind: a container binds its workload's directory; keyhole checks
# every open against the container's labels. Run on a host where
# `keyhole serve` runs (as root).
set -euo pipefail
printf '%s' 'example-db-password' | keyhole secret put db/password --stdin
keyhole workload add web --selector docker:label:com.example.app=web
keyhole grant db/password --to web --uid 1000
# rslave: later mounts (and re-mounts after a broker restart) reach it.
docker run --rm --label com.example.app=web --user 1000 --read-only --cap-drop ALL \
    -v /run/keyhole/workloads/web:/run/secrets:ro,rslave \
    busybox:1.36.1 cat /run/secrets/password
# Another container, same directory, no label: Permission denied.
docker run --rm --read-only --cap-drop ALL \
    -v /run/keyhole/workloads/web:/run/secrets:ro,rslave \
    busybox:1.36.1 cat /run/secrets/password || echo "denied, as it should be"
