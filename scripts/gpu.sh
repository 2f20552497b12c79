#!/usr/bin/env bash
# Builds the CUDA test and bench binaries (and the examples) on a machine without a GPU and
# stages them, stripped and gzipped, with a runner in .gpu/, so they run on a GPU machine that
# has no Rust toolchain: copy .gpu/ there and run `bash .gpu/run.sh BACKEND KIND [args...]`.
#
#   scripts/gpu.sh [--vulkan] [--only NAME[,NAME...]] [tests] [benches] [examples]
#       what to stage (default: all three); --vulkan also stages the wgpu builds of the
#       selected tests and benches (for Vulkan on the GPU), both through WGSL (the default
#       features) and through CubeCL's SPIR-V compiler (feature `vulkan`, names ending in
#       `_spirv`); --only keeps just the named test
#       and bench targets (e.g. --only kernels,attention) to save build time and transfer.
#       --vulkan also builds scripts/vk_pipeline_stats.c into .gpu/vk (gcc, libvulkan-dev).
#       Each binary links the whole stack (about 30 MB stripped, 10 MB gzipped): stage only
#       what one run needs when the copy to the GPU machine is limited.
#
# On the GPU machine:
#   bash .gpu/run.sh cuda test [filter...]   every staged test binary
#   bash .gpu/run.sh cuda bench              every staged bench, then the PyTorch peers (SDPA,
#                                            the decode step) when python3 has torch
#   bash .gpu/run.sh wgpu bench              the wgpu benches (set VK_DRIVER_FILES first)
#   DEC=8x16384 TESTS=1 bash .gpu/session.sh  chosen parts in one call (scripts/gpu_session.sh)
# Bench environment: SPARSEKV_BENCH_ONLY=8x16384 (one attention shape),
# SPARSEKV_BENCH_LAYERS=N (model benches), SPARSEKV_BENCH_QUICK=1 (small shapes).
set -euo pipefail
cd "$(dirname "$0")/.."
stage=.gpu
vulkan=0
only=""
parts=()
while [ $# -gt 0 ]; do
  a=$1; shift
  case "$a" in
    --vulkan) vulkan=1 ;;
    --only) only=",$1,"; shift ;;
    tests|benches|examples) parts+=("$a") ;;
    *) echo "unknown argument $a" >&2; exit 2 ;;
  esac
done
[ ${#parts[@]} -eq 0 ] && parts=(tests benches examples)
want() { [[ " ${parts[*]} " == *" $1 "* ]]; }
# The --test / --bench flags for the given target names, filtered by --only.
targets() {
  local flag=$1; shift
  for t in "$@"; do
    if [ -z "$only" ] || [[ $only == *",$t,"* ]]; then echo "$flag $t"; fi
  done
}
rm -rf "$stage/cuda" "$stage/wgpu" && mkdir -p "$stage/cuda" "$stage/wgpu"

# Stages one executable as $stage/$out/$name.gz (stripped); SUFFIX is appended to the name.
stage_exe() {
  local exe=$1 out=$2 name=$3${SUFFIX:-}
  cp "$exe" "$stage/$out/$name" && strip "$stage/$out/$name" && gzip -f "$stage/$out/$name"
  echo "staged $stage/$out/$name.gz"
}

# Builds with `cargo <subcommand> --no-run` and stages the test or bench executables
# (BUILD_DIR: another target directory, for other features).
build() {
  local out=$1 prefix=$2; shift 2
  local release=--release dir=target/gpu-$out
  [ "$1" = bench ] && release=  # cargo bench always builds optimised
  [ "$out" = wgpu ] && dir=target  # the default features are wgpu's: share the usual builds
  dir=${BUILD_DIR:-$dir}
  CARGO_TARGET_DIR=$dir cargo "$@" $release --no-run --message-format=json \
    | python3 -c 'import json,sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    kinds = m.get("target", {}).get("kind", [])
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"] \
            and (sys.argv[1] != "bench" or "bench" in kinds):
        print(m["executable"])' "$1" \
    | while read -r exe; do
        stage_exe "$exe" "$out" "$prefix$(basename "$exe" | sed 's/-[0-9a-f]*$//')"
      done
}

cuda=(--no-default-features --features cuda)
tests=$(targets --test kernels cache model)
benches=$(targets --bench attention compress decode skinny)
want tests && [ -n "$tests" ] && build cuda "" test "${cuda[@]}" $tests
want benches && [ -n "$benches" ] && build cuda bench_ bench "${cuda[@]}" $benches
if want examples; then
  for ex in chat eval; do
    CARGO_TARGET_DIR=target/gpu-cuda cargo build --release "${cuda[@]}" --example $ex
    stage_exe target/gpu-cuda/release/examples/$ex cuda $ex
  done
fi
if [ $vulkan = 1 ]; then
  want tests && [ -n "$tests" ] && build wgpu "" test $tests
  want benches && [ -n "$benches" ] && build wgpu bench_ bench $benches
  spirv=(--features vulkan)
  want tests && [ -n "$tests" ] && BUILD_DIR=target/vulkan SUFFIX=_spirv build wgpu "" test "${spirv[@]}" $tests
  want benches && [ -n "$benches" ] && BUILD_DIR=target/vulkan SUFFIX=_spirv build wgpu bench_ bench "${spirv[@]}" $benches
  # The Vulkan layer that prints the driver's statistics of each compute pipeline (registers
  # and the like; the session script's VULKAN part runs the SPIR-V build with it); needs gcc
  # and libvulkan-dev's headers.
  mkdir -p "$stage/vk"
  gcc -O2 -Wall -shared -fPIC -fvisibility=hidden -o "$stage/vk/libsparsekv_pipeline_stats.so" scripts/vk_pipeline_stats.c
  cat > "$stage/vk/VK_LAYER_SPARSEKV_pipeline_stats.json" <<'JSON'
{
  "file_format_version": "1.1.2",
  "layer": {
    "name": "VK_LAYER_SPARSEKV_pipeline_stats",
    "type": "GLOBAL",
    "library_path": "./libsparsekv_pipeline_stats.so",
    "api_version": "1.3.239",
    "implementation_version": "1",
    "description": "sparsekv diagnostics: the driver's statistics of each compute pipeline"
  }
}
JSON
fi
mkdir -p "$stage/scripts" && cp scripts/sdpa_baseline.py scripts/decode_baseline.py scripts/decode_floor.cu "$stage/scripts/"
cp scripts/gpu_session.sh "$stage/session.sh"

cat > "$stage/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs the staged binaries. Usage: bash .gpu/run.sh [cuda|wgpu] [test|bench] [args...]
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
backend=${1:-cuda}; kind=${2:-test}; shift $(( $# > 2 ? 2 : $# ))
bin_dir=${TMPDIR:-/tmp}/sparsekv-gpu/$backend
mkdir -p "$bin_dir"
for gz in "$here/$backend"/*.gz; do
  [ -e "$gz" ] || continue
  exe=$bin_dir/$(basename "$gz" .gz)
  [ -x "$exe" ] || { gunzip -c "$gz" > "$exe" && chmod +x "$exe"; }
done
status=0
for bin in "$bin_dir"/*; do
  name=$(basename "$bin")
  case "$kind" in
    test) [[ $name == bench_* || $name == chat || $name == eval ]] && continue
          echo "== $name"; "$bin" "$@" || status=1 ;;
    bench) [[ $name == bench_* ]] || continue
           echo "== $name"; "$bin" --bench "$@" || status=1 ;;
  esac
done
# The PyTorch peers, in the same invocation: SDPA at the attention bench's B = 8 shapes and at
# B = 1, T = 4K and 32K; the decode step at the decode bench's shapes. PEERS=0 skips them.
if [ "$kind" = bench ] && [ "$backend" = cuda ] && [ "${PEERS:-1}" = 1 ] \
    && python3 -c 'import torch' 2>/dev/null; then
  for bt in 8x16384 8x32768 8x131072 1x4096 1x32768; do
    echo "== PyTorch SDPA B=${bt%x*} T=${bt#*x}"
    python3 "$here/scripts/sdpa_baseline.py" --batch ${bt%x*} --tokens ${bt#*x} || status=1
  done
  echo "== PyTorch decode step"
  python3 "$here/scripts/decode_baseline.py" --batch 8 --tokens 4096 16384 32768 || status=1
  python3 "$here/scripts/decode_baseline.py" --batch 1 --tokens 4096 || status=1
fi
exit $status
RUN
chmod +x "$stage/run.sh"
du -sh "$stage"
