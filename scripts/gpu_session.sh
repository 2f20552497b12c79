#!/usr/bin/env bash
# One device-tool call's worth of GPU work on the staged CUDA binaries (scripts/gpu.sh copies
# this into .gpu/). Run there as `VAR=... bash .gpu/session.sh`; each part runs when its
# variable is set, in this order, and everything it prints is also kept under $OUT:
#   DEC=BxT[,..]     the decode bench on both backends (BACKENDS=bare|fused for one), then
#                    the PyTorch decode-step peer at the same shapes
#   ATT=BxT[,..]     the attention bench at those shapes (CALLS=n back-to-back calls per
#                    timed batch, default 200: short calls in steady state), then cuDNN SDPA
#                    at each
#   PREFILL=BxT[,..] the exact-prefill rows of the decode bench with nvidia-smi sampling the
#                    memory, then the PyTorch prefill peer
#   STREAM=BxT[,..]  the long-context showcase of the decode bench (CHUNK=n prompt tokens per
#                    streaming chunk, LAYERS=n for fewer than 32) with nvidia-smi sampling
#   MATMUL=T         the decode bench's sweep of cubek's matmul strategies over a prefill's
#                    projection shapes at T tokens (its cuBLAS peer is part of PREFILL's)
#   LAUNCH=1         the skinny bench's launch-path probe (empty launches in batches of several
#                    sizes, a blocking flush per launch, the small projections in batches of
#                    20 and 200)
#   SKINNY=a,b       the skinny bench on those matrices (qkv, out, gate+up, down, head) with
#                    the tuning sweep at M = 8 (CALLS=n calls per timed batch, default 200:
#                    the kernels in steady state)
#   NCUSKINNY=a:M,.. ncu (SpeedOfLight, occupancy, memory) of the skinny kernels on those
#                    matrices at M rows: the CUDA-core kernel, then the launcher's own choice
#                    (the fragment kernel from 8 rows on), then the cmma kernel, five launches
#                    each (NSKIP/NCOUNT pick them: default 2 and 8)
#   NCUSTEP=BxT      ncu's duration of every launch of four decode steps (bench_decode's
#                    SPARSEKV_BENCH_PROFILE) through dense caches, then sparse ones, as CSV
#   COMPRESS=1       the compression bench (a chunk over all layers, layer groups against
#                    independent caches, and the decode step it is a fraction of)
#   CHAT=1           the chat example on both shared models, warm, greedy, 256 tokens, with
#                    Burn's fusion on (the example's default) and off
#   CHATAB=1         the chat example (bare backend) on both shared models, three rounds
#                    alternating a chat_before binary staged beside chat (an A/B on one host)
#   TESTS=1          the CUDA tests (TESTLIST=a,b,.. picks binaries and filters, default
#                    cache, kernels attention, kernels compress, model, the other kernels)
#   VULKAN=BxT[,..]  the wgpu attention benches (staged by `scripts/gpu.sh --vulkan`: WGSL and
#                    SPIR-V) on the NVIDIA Vulkan driver at those shapes, each with the layer
#                    scripts/vk_pipeline_stats.c (staged in .gpu/vk) printing the driver's
#                    statistics of every compute pipeline (registers, shared memory); then
#                    the SPIR-V bench with the CUDA-core kernel (`Auto` picks the sliced
#                    one there), then the CUDA-core and the sliced kernels on CUDA (VKNCU=1:
#                    and ncu's launch statistics and occupancy of the former's dense split
#                    launch); with VKTESTS=1 first the wgpu attention tests (both builds) on
#                    that driver. Needs the Vulkan loader and glvnd, carried as .gl/*.deb (the
#                    device README's recipe: libvulkan1 libegl1 libglvnd0 libopengl0 libgl1
#                    libglx0 libgles2; the NVIDIA ICD's library is libGLX_nvidia.so.0, which
#                    needs glvnd: with libvulkan1 alone wgpu finds no adapter)
#   NCUATT=BxT[,..]  ncu's duration, grid and DRAM throughput of the dense row's split and
#                    merge launches of the attention bench at those shapes (CSV)
#   FLOOR=1          scripts/decode_floor.cu (a hand-written CUDA C++ decode of the compressed
#                    format, the measurement peer of the sparse bars) built with nvcc and run
#                    at B = 8, T = 32K (K and V rows) for s = 0.7 and 0.5, then ncu's
#                    instruction counts of its three decodes at s = 0.7
#   NCU=1            ncu of one tensor-core split launch of the attention bench at B = 8,
#                    T = 32K (SKIP launches skipped first: 320 lands in the s = 0.7 row),
#                    with source counters, exported as prof.ncu-rep and sass.csv
# Tests read the shared models from .shared-gpu/ beside .gpu/ (a copy of ../shared's models/
# and data/, carried with the call, never committed).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=/tmp/skv; mkdir -p $bin
for gz in "$here"/cuda/*.gz; do n=$(basename "$gz" .gz); [ -x $bin/$n ] || { gunzip -c "$gz" > $bin/$n && chmod +x $bin/$n; }; done
export SPARSEKV_SHARED=$here/../.shared-gpu
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
if [ -n "${DEC:-}" ]; then
  echo "== bench_decode $DEC (${BACKENDS:-bare,fused})"
  SPARSEKV_BENCH_ONLY=$DEC SPARSEKV_BENCH_BACKENDS=${BACKENDS:-bare,fused} $bin/bench_decode --bench 2>&1 | tee -a $OUT/decode.log | grep -E "^\||^Decode|ceiling"
  for bt in ${DEC//,/ }; do python3 "$here/scripts/decode_baseline.py" --batch ${bt%x*} --tokens ${bt#*x} 2>&1 | tee -a $OUT/decode.log; done
fi
if [ -n "${ATT:-}" ]; then
  echo "== bench_attention $ATT"
  SPARSEKV_BENCH_CALLS=${CALLS:-200} SPARSEKV_BENCH_ONLY=$ATT $bin/bench_attention --bench 2>&1 | tee -a $OUT/attention.log | grep -E "^\||ceiling"
  for bt in ${ATT//,/ }; do python3 "$here/scripts/sdpa_baseline.py" --batch ${bt%x*} --tokens ${bt#*x} 2>&1 | tee -a $OUT/attention.log | tail -3; done
fi
if [ -n "${PREFILL:-}" ]; then
  echo "== prefill $PREFILL"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > $OUT/smi_mem.txt &
  smi=$!
  SPARSEKV_BENCH_PREFILL=$PREFILL $bin/bench_decode --bench 2>&1 | tee -a $OUT/prefill.log | grep -E "^\||^Exact|panicked|error"
  kill $smi; echo "nvidia-smi peak MiB used during our prefill: $(sort -n $OUT/smi_mem.txt | tail -1)"
  for bt in ${PREFILL//,/ }; do python3 "$here/scripts/decode_baseline.py" --prefill --batch ${bt%x*} --tokens ${bt#*x} 2>&1 | tee -a $OUT/prefill.log; done
fi
if [ -n "${STREAM:-}" ]; then
  echo "== stream $STREAM"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > $OUT/smi_stream.txt &
  smi=$!
  SPARSEKV_BENCH_STREAM=$STREAM SPARSEKV_BENCH_STREAM_CHUNK=${CHUNK:-4096} SPARSEKV_BENCH_LAYERS=${LAYERS:-32} \
    $bin/bench_decode --bench 2>&1 | tee -a $OUT/stream.log | grep -E "^\||^Long|^- |panicked|error"
  kill $smi; echo "nvidia-smi peak MiB used during the showcase: $(sort -n $OUT/smi_stream.txt | tail -1)"
fi
if [ -n "${MATMUL:-}" ]; then
  echo "== matmul sweep $MATMUL"
  SPARSEKV_BENCH_MATMUL=$MATMUL $bin/bench_decode --bench 2>&1 | tee -a $OUT/matmul.log | grep -E "^\||^Prefill|panicked"
fi
if [ "${LAUNCH:-0}" = 1 ]; then
  echo "== launch path"
  SPARSEKV_BENCH_LAUNCH=1 $bin/bench_skinny --bench 2>&1 | tee -a $OUT/launch.log | grep -E "^\||^Launch|panicked|error"
fi
if [ -n "${SKINNY:-}" ]; then
  echo "== skinny $SKINNY (sweep, ${CALLS:-200} calls per batch)"
  SPARSEKV_BENCH_ONLY=$SKINNY SPARSEKV_BENCH_SWEEP=1 SPARSEKV_BENCH_CALLS=${CALLS:-200} $bin/bench_skinny --bench 2>&1 \
    | tee -a $OUT/skinny.log | grep -E "^\||ceiling|panicked|error"
fi
if [ -n "${NCUSKINNY:-}" ]; then
  for target in ${NCUSKINNY//,/ }; do
    echo "== ncu skinny $target"
    SPARSEKV_BENCH_PROFILE=$target ncu --clock-control none --kernel-name regex:skinny --launch-skip ${NSKIP:-2} --launch-count ${NCOUNT:-8} \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
      --section WarpStateStats --section SourceCounters --import-source no \
      $bin/bench_skinny --bench > $OUT/ncu_skinny_${target//[:+]/_}.txt 2>&1
    grep -E "skinny|Duration|DRAM Throughput|Memory Throughput|Grid Size|Block Size|Registers Per|Achieved Occ|Theoretical Occ|Shared Memory Config|Waves Per SM|Warp Cycles Per Issued|Stall" \
      $OUT/ncu_skinny_${target//[:+]/_}.txt | head -80
  done
fi
if [ -n "${NCUSTEP:-}" ]; then
  for cache in dense sparse; do
    echo "== ncu decode step $NCUSTEP $cache"
    SPARSEKV_BENCH_ONLY=$NCUSTEP SPARSEKV_BENCH_BACKENDS=bare SPARSEKV_BENCH_PROFILE=$cache \
      ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
      $bin/bench_decode --bench > $OUT/ncu_step_$cache.csv 2> $OUT/ncu_step_$cache.err
    tail -2 $OUT/ncu_step_$cache.err; wc -l $OUT/ncu_step_$cache.csv
  done
fi
if [ "${COMPRESS:-0}" = 1 ]; then
  echo "== bench_compress"
  $bin/bench_compress --bench 2>&1 | tee -a $OUT/compress.log | grep -E "^\||^Compression|round|panicked|error"
fi
if [ "${CHAT:-0}" = 1 ]; then
  models=$SPARSEKV_SHARED/models
  for m in "stories260K/stories260K.bin --tokenizer $models/stories260K/tok512.bin" tinystories-656K; do
    for fusion in on off; do
      echo "== chat $m --fusion $fusion"
      printf 'Once upon a time\nOnce upon a time\n' | $bin/chat --model $models/$m --chat-template none --max-tokens 256 --fusion $fusion 2>&1 \
        | tee -a $OUT/chat.log | grep -iE "tokens/s|error|panicked" | tail -3
    done
  done
fi
if [ "${CHATAB:-0}" = 1 ]; then
  models=$SPARSEKV_SHARED/models
  for round in 1 2 3; do
    for exe in chat_before chat; do
      [ -x $bin/$exe ] || continue
      for m in "stories260K/stories260K.bin --tokenizer $models/stories260K/tok512.bin" tinystories-656K; do
        printf '%s round %s %s: ' "$exe" "$round" "${m%% *}"
        printf 'Once upon a time\nOnce upon a time\n' | $bin/$exe --model $models/$m --chat-template none --max-tokens 256 --fusion off 2>&1 \
          | tee -a $OUT/chatab.log | grep -iE "tokens/s|error|panicked" | tail -1
      done
    done
  done
fi
if [ "${TESTS:-0}" = 1 ]; then
  IFS=, read -ra list <<< "${TESTLIST:-cache,kernels attention,kernels compress,model,kernels}"
  for t in "${list[@]}"; do
    [ "$t" = kernels ] && set -- --skip attention --skip compress || set --
    echo "== $t $*"
    $bin/$t "$@" 2>&1 | tee -a $OUT/tests.log | grep -E "^test result|FAILED|panicked|failed" | head -20
  done
fi
if [ -n "${VULKAN:-}" ]; then
  echo "== vulkan attention $VULKAN"
  for f in "$here"/../.gl/*.deb; do dpkg -x "$f" /; done; ldconfig
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  if [ "${VKTESTS:-0}" = 1 ]; then
    for t in kernels kernels_spirv; do
      [ -e "$here/wgpu/$t.gz" ] || continue
      gunzip -c "$here/wgpu/$t.gz" > $bin/wgpu_$t && chmod +x $bin/wgpu_$t
      echo "-- $t attention (Vulkan)"
      $bin/wgpu_$t attention 2>&1 | tee -a $OUT/vulkan_tests.log | grep -E "^test result|FAILED|panicked|failed" | head -20
    done
  fi
  # Through WGSL, then through CubeCL's SPIR-V compiler, each with the statistics layer (the
  # A/Bs against the CUDA-core kernel and the runs on CUDA follow), all at the same shapes.
  stats=(VK_LAYER_PATH="$here/vk" VK_INSTANCE_LAYERS=VK_LAYER_SPARSEKV_pipeline_stats)
  [ -e "$here/vk/libsparsekv_pipeline_stats.so" ] || stats=()
  for b in bench_attention bench_attention_spirv; do
    [ -e "$here/wgpu/$b.gz" ] || continue
    gunzip -c "$here/wgpu/$b.gz" > $bin/wgpu_$b && chmod +x $bin/wgpu_$b
    echo "-- $b"
    env "${stats[@]}" SPARSEKV_BENCH_ONLY=$VULKAN $bin/wgpu_$b --bench 2>&1 | tee -a $OUT/vulkan.log \
      | grep -E "^\||ceiling|panicked|rror|LAYER.*(decode|capturing|has no|missing)" | cut -c1-600
  done
  # The CUDA-core kernel through SPIR-V (where `Auto` picks the sliced kernel): an A/B in
  # the same call.
  if [ -e $bin/wgpu_bench_attention_spirv ]; then
    echo "-- bench_attention_spirv, CUDA-core kernel"
    SPARSEKV_BENCH_KERNEL=simt SPARSEKV_BENCH_ONLY=$VULKAN $bin/wgpu_bench_attention_spirv --bench 2>&1 \
      | tee -a $OUT/vulkan.log | grep -E "^\| (dense|sparse)|panicked"
  fi
  for k in simt sliced; do
    echo "-- the $k kernel on CUDA"
    SPARSEKV_BENCH_KERNEL=$k SPARSEKV_BENCH_ONLY=$VULKAN $bin/bench_attention --bench 2>&1 \
      | tee -a $OUT/vulkan.log | grep -E "^\| (dense|sparse)|panicked"
  done
  if [ "${VKNCU:-0}" = 1 ]; then
    echo "-- ncu of the CUDA-core kernel's dense split launch"
    SPARSEKV_BENCH_KERNEL=simt SPARSEKV_BENCH_ONLY=${VULKAN%%,*} SPARSEKV_BENCH_CALLS=4 ncu --clock-control none \
      --kernel-name regex:decode_split_kernel --launch-skip 10 --launch-count 1 --section LaunchStats --section Occupancy \
      $bin/bench_attention --bench > $OUT/ncu_simt.txt 2>&1
    grep -E "decode_split|Registers|Shared Memory|Block Limit|Occupancy|Waves" $OUT/ncu_simt.txt | head -20
  fi
fi
if [ -n "${NCUATT:-}" ]; then
  # Durations of the split and merge launches of the dense row (the first row of each shape:
  # 10 warm-up calls skipped, then 4 calls = 8 launches), one shape at a time.
  for bt in ${NCUATT//,/ }; do
    echo "== ncu attention launches $bt (dense row)"
    SPARSEKV_BENCH_ONLY=$bt SPARSEKV_BENCH_CALLS=4 ncu --clock-control none --kernel-name regex:"decode_(split|merge)" \
      --launch-skip 20 --launch-count 8 --metrics gpu__time_duration.sum,launch__grid_size,sm__warps_active.avg.pct_of_peak_sustained_active,dram__throughput.avg.pct_of_peak_sustained_elapsed \
      --csv --print-units base $bin/bench_attention --bench > $OUT/ncu_att_$bt.csv 2> $OUT/ncu_att_$bt.err
    tail -1 $OUT/ncu_att_$bt.err; grep -E "gpu__time_duration|launch__grid_size|dram__throughput" $OUT/ncu_att_$bt.csv | awk -F'","' '{print $5, $(NF-2), $NF}' | cut -c1-150
  done
fi
if [ "${FLOOR:-0}" = 1 ]; then
  echo "== decode floor (CUDA C++)"
  if nvcc -O3 -arch=sm_90 -o /tmp/decode_floor "$here/scripts/decode_floor.cu" > $OUT/floor_build.log 2>&1; then
    for keep in 38 64; do /tmp/decode_floor 4194304 $keep 2>&1 | tee -a $OUT/floor.log; done
    # Launches per decode: 4 grids x (5 warm-up + 30 timed + 1 checked); 72, 216 and 360 are
    # the first launches of the walk, the permute and the shift decode at 16 cubes per SM.
    for skip in 72 216 360; do
      ncu --clock-control none --kernel-name regex:decode --launch-skip $skip --launch-count 1 \
        --metrics gpu__time_duration.sum,smsp__inst_executed.sum,sm__inst_executed.avg.per_cycle_active,smsp__issue_active.avg.pct_of_peak_sustained_active,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread \
        /tmp/decode_floor 4194304 38 > $OUT/floor_ncu_$skip.txt 2>&1
      grep -E "decode<|duration|inst_executed|issue_active|dram__|warps_active|registers" $OUT/floor_ncu_$skip.txt
    done
  else
    tail -20 $OUT/floor_build.log
  fi
fi
if [ "${NCU:-0}" = 1 ]; then
  echo "== ncu"
  SPARSEKV_BENCH_ONLY=8x32768 ncu --clock-control none --kernel-name regex:decode_split_tc --launch-skip ${SKIP:-320} --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SourceCounters \
    --section MemoryWorkloadAnalysis_Tables --import-source no -o $OUT/prof -f $bin/bench_attention --bench > $OUT/ncu_run.log 2>&1
  tail -3 $OUT/ncu_run.log
  ncu --import $OUT/prof.ncu-rep --page details > $OUT/ncu_details.txt 2>&1
  grep -E "Kernel Name|Duration|Registers|Theoretical Occ|Achieved Occ|Executed Ipc|Issue Slots|Shared|L1/TEX Hit|Memory Throughput|DRAM Throughput|Warp Cycles Per Issued|bank|Bank" $OUT/ncu_details.txt | head -40
  ncu --import $OUT/prof.ncu-rep --page source --csv --print-source sass > $OUT/sass.csv 2>&1; wc -l $OUT/sass.csv
fi
