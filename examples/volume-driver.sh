#!/usr/bin/env bash
# The volume driver: `keyhole serve` on the host answers dockerd on
# /run/docker/plugins/keyhole.sock. Each container that mounts the volume
# gets its own FUSE mount; files belong to the container's user.
set -euo pipefail
printf '%s' 'example-api-token' | keyhole secret put api/token --stdin
keyhole workload add api --selector docker:label:com.example.app=api
keyhole grant api/token --to api
docker volume create -d keyhole -o workload=api api-secrets
docker run --rm --label com.example.app=api --user 1000 --read-only --cap-drop ALL \
    -v api-secrets:/run/secrets busybox:1.36.1 cat /run/secrets/token
# Options: workload= (required), uid=, gid=, mode= (e.g. -o mode=0440).
