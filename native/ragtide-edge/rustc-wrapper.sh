#!/bin/sh
# qdrant-edge 0.9.0 uses `std::debug_assert_matches`, stable only after Rust 1.95. For that one crate, let rustc
# accept the feature (RUSTC_BOOTSTRAP names the crate; -Zcrate-attr declares it); every other crate builds as usual.
rustc="$1"; shift
case " $* " in
  *" --crate-name qdrant_edge "*)
    RUSTC_BOOTSTRAP=qdrant_edge exec "$rustc" "$@" -Zcrate-attr='feature(assert_matches)' ;;
  *) exec "$rustc" "$@" ;;
esac
