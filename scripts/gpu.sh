#!/usr/bin/env bash
# Builds the CUDA test (and, once they exist, bench) binaries on a machine without a GPU and
# stages them with a runner in .gpu/, so the suite runs on a GPU machine that has no Rust
# toolchain: copy .gpu/ there and run `bash .gpu/run.sh [test|bench] [filter...]`.
#
#   scripts/gpu.sh            build + stage (release, --features cuda, stripped)
#   scripts/gpu.sh --vulkan   also stage the same binaries built for wgpu (Vulkan on the GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
stage=.gpu
rm -rf "$stage" && mkdir -p "$stage/cuda" "$stage/wgpu"

# Prints the executables of `cargo <subcommand> --no-run` for the given features.
build() {
  local out=$1 prefix=$2; shift 2
  local release=--release
  [ "$1" = bench ] && release=  # cargo bench always builds optimised
  CARGO_TARGET_DIR=target/gpu-$out cargo "$@" $release --no-run --message-format=json \
    | python3 -c 'import json,sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    kinds = m.get("target", {}).get("kind", [])
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"] \
            and (sys.argv[1] != "bench" or "bench" in kinds):
        print(m["executable"])' "$1" \
    | while read -r exe; do
        name=$prefix$(basename "$exe" | sed 's/-[0-9a-f]*$//')
        cp "$exe" "$stage/$out/$name" && strip "$stage/$out/$name"
        echo "staged $stage/$out/$name"
      done
}

build cuda "" test --no-default-features --features cuda --test kernels --test cache --test model
if [ -d benches ] && ls benches/*.rs >/dev/null 2>&1; then
  build cuda bench_ bench --no-default-features --features cuda
fi
# The chat example, for end-to-end tokens/s.
CARGO_TARGET_DIR=target/gpu-cuda cargo build --release --no-default-features --features cuda --example chat
cp target/gpu-cuda/release/examples/chat "$stage/cuda/chat" && strip "$stage/cuda/chat"
if [ "${1:-}" = "--vulkan" ]; then
  build wgpu "" test --test kernels --test cache --test model
  build wgpu bench_ bench
fi

cat > "$stage/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs the staged binaries. Usage: bash .gpu/run.sh [cuda|wgpu] [test|bench] [args...]
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
backend=${1:-cuda}; kind=${2:-test}; shift $(( $# > 2 ? 2 : $# ))
status=0
for bin in "$here/$backend"/*; do
  [ -x "$bin" ] || continue
  case "$kind" in
    test) [[ $(basename "$bin") == bench_* || $(basename "$bin") == chat ]] && continue; echo "== $(basename "$bin")"; "$bin" "$@" || status=1 ;;
    bench) [[ $(basename "$bin") == bench_* ]] || continue; echo "== $(basename "$bin")"; "$bin" --bench "$@" || status=1 ;;
  esac
done
exit $status
RUN
chmod +x "$stage/run.sh"
du -sh "$stage"
