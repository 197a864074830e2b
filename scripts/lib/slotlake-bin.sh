# Sourced by the benchmark scripts: sets SLOTLAKE_BIN to the slotlake binary to run — as given,
# or else a release build of the repository ($repo_dir) in CARGO_TARGET_DIR (default
# <repo>/target).
if [ -z "${SLOTLAKE_BIN:-}" ]; then
  (cd "$repo_dir" && cargo build --release --locked --quiet --bin slotlake)
  SLOTLAKE_BIN="${CARGO_TARGET_DIR:-$repo_dir/target}/release/slotlake"
fi
