#!/usr/bin/env bash
# System packages the native stack needs: Rust (cargo), Java 17+, Maven, PostgreSQL 15 server, npm, Chromium, wrk. Installs what is missing
# when run as root on Debian; otherwise says what to install.
set -euo pipefail
missing=()
command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || missing+=(maven)
[ -x /usr/lib/postgresql/15/bin/postgres ] || missing+=(postgresql-15)
command -v runuser >/dev/null || missing+=(util-linux)
# The external-Kafka test makes its own CA and broker certificate.
command -v openssl >/dev/null || missing+=(openssl)
command -v npm >/dev/null || missing+=(npm)
# Headless browser for the dashboard test (Debian's Chromium; nothing is downloaded by a test tool).
command -v chromium >/dev/null || missing+=(chromium)
# The HTTP load generator of `ragtide bench serve` (Debian's wrk; its Lua scripts give every request its own query).
command -v wrk >/dev/null || missing+=(wrk)
# Our binding of the embedded Qdrant engine (native/ragtide-edge) is built from crates.io: Rust 1.95 or newer
# (the engine's crate uses a library path that older releases lack).
rust_minor=$(rustc --version 2>/dev/null | sed -n 's/^rustc 1\.\([0-9]*\).*/\1/p')
if ! command -v cargo >/dev/null || [ -z "$rust_minor" ] || [ "$rust_minor" -lt 95 ]; then
  echo "please install Rust 1.95 or newer with cargo (https://rustup.rs; found: $(rustc --version 2>/dev/null || echo none)): it builds native/ragtide-edge" >&2
  exit 1
fi
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing system packages: ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
  echo "please install: ${missing[*]}" >&2
  exit 1
fi
