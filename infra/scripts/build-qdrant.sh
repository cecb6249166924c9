#!/usr/bin/env bash
# Build the Qdrant server from source at a pinned tag, once, and cache the binary by version; prints its path.
#
# For machines without a Docker engine (the official image is what docker-compose and Kubernetes use). v1.16.3 is
# the newest tag whose git dependencies can all be had from local copies, and its toolchain (Rust 1.89) fits.
#
# Needs: cargo (Rust >= 1.89), git, protobuf-compiler and clang (installed from Debian when run as root), ~10 GB of
# disk for the build, and about 45 minutes on 2 cores (Qdrant's own `perf` profile: opt-level 3, no LTO).
# Sources: QDRANT_GIT_MIRRORS=<dir> with local copies of qdrant/qdrant, qdrant/wal, qdrant/rust-stemmers,
# qdrant/tar-rs and stusmall/murmur3 as <dir>/<owner>+<name>[/repo] (bare or not); without it, github.com.
# Cache: RAGTIDE_QDRANT_CACHE (default ~/.cache/ragtide/qdrant)/<version>/qdrant.
set -euo pipefail
VERSION=${QDRANT_VERSION:-v1.16.3}
CACHE=${RAGTIDE_QDRANT_CACHE:-$HOME/.cache/ragtide/qdrant}/$VERSION
BIN=$CACHE/qdrant
if [ -x "$BIN" ]; then
  echo "$BIN"
  exit 0
fi

missing=()
command -v protoc >/dev/null || missing+=(protobuf-compiler)
command -v clang >/dev/null || missing+=(clang)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "please install: ${missing[*]}" >&2
    exit 1
  fi
fi
command -v cargo >/dev/null || { echo "cargo (Rust >= 1.89) is needed: https://rustup.rs" >&2; exit 1; }

source_of() { # owner+name -> a git URL
  local local_copy=${QDRANT_GIT_MIRRORS:-}/$1
  if [ -n "${QDRANT_GIT_MIRRORS:-}" ] && [ -d "$local_copy/repo" ]; then
    echo "file://$local_copy/repo"
  elif [ -n "${QDRANT_GIT_MIRRORS:-}" ] && [ -d "$local_copy" ]; then
    echo "file://$local_copy"
  else
    echo "https://github.com/${1/+//}.git"
  fi
}

mkdir -p "$CACHE"
SRC=$CACHE/src
if [ ! -f "$SRC/Cargo.lock" ]; then
  rm -rf "$SRC" && mkdir -p "$SRC"
  qdrant=$(source_of qdrant+qdrant)
  if [[ $qdrant == file://* ]]; then # the tag's tree only (a local copy may lack objects of other commits)
    git --git-dir="${qdrant#file://}" archive "$VERSION" | tar -x -C "$SRC"
  else
    git clone -q --depth 1 --branch "$VERSION" "$qdrant" "$SRC"
  fi
fi

# Qdrant's Cargo.lock names its git dependencies by GitHub URL: point git at the chosen copies, for this build only.
GITCONFIG=$CACHE/gitconfig
{
  for dep in qdrant+wal qdrant+rust-stemmers qdrant+tar-rs stusmall+murmur3; do
    url=$(source_of "$dep")
    for form in "https://github.com/${dep/+//}.git" "https://github.com/${dep/+//}"; do
      printf '[url "%s"]\n\tinsteadOf = %s\n' "$url" "$form"
    done
  done
  printf '[safe]\n\tdirectory = *\n'
} >"$GITCONFIG"

cd "$SRC"
export GIT_CONFIG_GLOBAL=$GITCONFIG CARGO_NET_GIT_FETCH_WITH_CLI=true CARGO_TARGET_DIR=$CACHE/target
cargo fetch --locked
cargo build --locked --profile perf --bin qdrant
install -m 0755 "$CARGO_TARGET_DIR/perf/qdrant" "$BIN"
echo "$BIN"
