#!/usr/bin/env bash
# System packages the local cells need: Debian's docker-registry (the OCI distribution registry).
# `make bench` also uses skopeo and rclone as peers. Installs only what is missing.
set -euo pipefail
want=(docker-registry)
[ "${1:-}" = "--bench" ] && want+=(skopeo rclone)
missing=()
for p in "${want[@]}"; do command -v "$p" >/dev/null 2>&1 || missing+=("$p"); done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing ${missing[*]} (apt)"
$sudo apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
