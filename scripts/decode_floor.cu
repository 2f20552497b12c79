// What decoding the compressed format costs on a GPU when the decode is written by hand in
// CUDA C++: a measurement peer for the attention issue's sparse bars, not part of the library
// (whose kernels are CubeCL). Built and run on the GPU machine:
//
//   nvcc -O3 -arch=sm_90 -o decode_floor scripts/decode_floor.cu && ./decode_floor [rows] [keep]
//
// Rows are docs/FORMAT.md's compressed rows at head_dim 128 (four bitmap words, `keep` f16
// values each, rows one after the other); the default 4,194,304 rows are the key and value
// rows of B = 8, H_kv = 8, T = 32K, and keep 38 is s = 0.7. Every kernel reads all of them
// once and folds what it decoded into a per-thread checksum that the host checks exactly:
//
//   read_only    the compressed bytes read with 16-byte loads and XORed: the bandwidth floor
//   dense_read   the same over dense rows (256 bytes each): what a dense kernel must read
//   decode_walk  every lane owns 4 channels of a row; per channel: test its bit, load the next
//                packed value if set (else 0), advance (our kernels' decode, hand-written)
//   decode_prmt  the same lanes, but a lane loads the 4 packed values its channels can need
//                as two funnel-shifted words and places them with two byte permutes
//                (PTX prmt) whose selectors come from a 16-entry table indexed by its 4 bits:
//                no per-channel work at all
//   decode_shift the same placement from shifts, masks and selects only: what a decode can be
//                built from in CubeCL 0.10, which has no byte permute and no funnel shift
//
// The decodes produce each lane's 4 channels as two half2 words (zero where pruned), the form
// an mma fragment or a shared-memory tile takes, and XOR them into the checksum: the least
// any attention kernel must do with a decoded row. A tile of 8 rows per warp: the tile's 32
// bitmap words are read with one coalesced load, counted and scanned across each row's 4
// lanes with shuffles, and each row's word and prefix handed to the lanes that need them.
//
// Prints the median time of 30 launches (CUDA events) and the bytes read per second. The
// kernels also compile alone through NVRTC (the host code is left out under
// __CUDACC_RTC__), which is how their SASS was read on a machine without nvcc.
#ifdef __CUDACC_RTC__
typedef unsigned int uint32_t;
typedef unsigned short uint16_t;
typedef unsigned long long size_t_rtc;
#define size_t size_t_rtc
#else
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#endif

#define CHECK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { \
  fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); exit(1); } } while (0)

constexpr unsigned FULL = 0xffffffffu;
constexpr int WORDS = 4;  // bitmap words per row at head_dim 128

__global__ void read_only(const uint4* __restrict__ a, size_t n, uint32_t* out) {
  uint32_t acc = 0;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    uint4 v = a[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

// One tile's bitmap words, counted and scanned per row (lane = 4 * row + word).
__device__ __forceinline__ void tile_words(const uint32_t* bits, size_t tile, int lane,
                                           uint32_t& word, uint32_t& before) {
  word = bits[tile * 32 + lane];
  uint32_t c = __popc(word), s = c;
  uint32_t o = __shfl_up_sync(FULL, s, 1);
  if ((lane & 3) >= 1) s += o;
  o = __shfl_up_sync(FULL, s, 2);
  if ((lane & 3) >= 2) s += o;
  before = s - c;
}

template <int MODE>
__global__ void __launch_bounds__(256) decode(const uint32_t* __restrict__ bits,
                                              const uint16_t* __restrict__ vals,
                                              size_t tiles, int keep, uint32_t* out) {
  // Per lane nibble n: the two byte-permute selectors and the mask that clears the fourth
  // loaded half where n != 15 (then at most 3 values are used and half 3 serves as the zero).
  __shared__ uint4 lut[16];
  if (MODE == 1 && threadIdx.x < 16) {
    // Output half i takes source half popc(n & ((1 << i) - 1)) if bit i is set, else half 3.
    uint32_t n = threadIdx.x, sel = 0;
    for (int i = 0; i < 4; i++) {
      uint32_t j = ((n >> i) & 1) ? __popc(n & ((1u << i) - 1)) : 3;
      sel |= (2 * j | (2 * j + 1) << 4) << (8 * i);
    }
    lut[n] = make_uint4(sel & 0xffff, sel >> 16, n == 15 ? 0xffffffffu : 0xffffu, 0);
  }
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int my_word = lane >> 3, shift = (lane & 7) * 4;
  const uint32_t low = (1u << shift) - 1;
  const uint32_t* v32 = reinterpret_cast<const uint32_t*>(vals);
  uint32_t acc = 0;
  size_t warp = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5;
  size_t warps = ((size_t)gridDim.x * blockDim.x) >> 5;
  for (size_t tile = warp; tile < tiles; tile += warps) {
    uint32_t word, before;
    tile_words(bits, tile, lane, word, before);
#pragma unroll
    for (int r = 0; r < 8; r++) {
      int src = 4 * r + my_word;
      uint32_t w = __shfl_sync(FULL, word, src);
      uint32_t b = __shfl_sync(FULL, before, src);
      uint32_t nib = (w >> shift) & 15;
      uint32_t pos = (uint32_t)((tile * 8 + r) * keep) + b + __popc(w & low);
      uint32_t o01, o23;
      if (MODE == 0) {
        uint32_t h[4];
#pragma unroll
        for (int e = 0; e < 4; e++) {
          uint32_t bit = (nib >> e) & 1;
          h[e] = bit ? vals[pos] : 0;
          pos += bit;
        }
        o01 = h[0] | h[1] << 16;
        o23 = h[2] | h[3] << 16;
      } else if (MODE == 2) {
        // The same placement from shifts, masks and selects only (what CubeCL 0.10's IR
        // has: no byte permute, no funnel shift).
        uint32_t q = pos >> 1;
        uint32_t a0 = v32[q], a1 = v32[q + 1], a2 = v32[q + 2];
        bool odd = pos & 1;
        uint32_t x = odd ? (a0 >> 16) | (a1 << 16) : a0;
        uint32_t y = odd ? (a1 >> 16) | (a2 << 16) : a1;
        bool b0 = nib & 1, b1 = nib & 2, b2 = nib & 4, b3 = nib & 8;
        o01 = b0 ? (b1 ? x : (x & 0xffffu)) : (b1 ? (x << 16) : 0u);
        uint32_t first = (uint32_t)b0 + (uint32_t)b1;  // channel 2's value among the four
        uint32_t z = first == 0 ? x : (first == 1 ? (x >> 16) | (y << 16) : y);
        o23 = b2 ? (b3 ? z : (z & 0xffffu)) : (b3 ? (z << 16) : 0u);
      } else {
        uint32_t q = pos >> 1;
        uint32_t a0 = v32[q], a1 = v32[q + 1], a2 = v32[q + 2];
        uint32_t sh = (pos & 1) * 16;
        uint32_t x = __funnelshift_r(a0, a1, sh), y = __funnelshift_r(a1, a2, sh);
        uint4 e = lut[nib];
        y &= e.z;
        // PTX's prmt directly: __byte_perm masks each selector nibble to 3 bits first.
        asm("prmt.b32 %0, %1, %2, %3;" : "=r"(o01) : "r"(x), "r"(y), "r"(e.x));
        asm("prmt.b32 %0, %1, %2, %3;" : "=r"(o23) : "r"(x), "r"(y), "r"(e.y));
      }
      acc ^= o01 ^ (o23 * 0x9e3779b9u);
    }
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

#ifndef __CUDACC_RTC__
static uint64_t rng_state = 0x243f6a8885a308d3ull;
static uint64_t next_u64() {
  uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

template <typename K>
static float median_ms(K launch) {
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  for (int i = 0; i < 5; i++) launch();
  std::vector<float> t;
  for (int i = 0; i < 30; i++) {
    CHECK(cudaEventRecord(a));
    launch();
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float ms;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms);
  }
  CHECK(cudaGetLastError());
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

static uint32_t xor_all(const uint32_t* d, size_t n) {
  std::vector<uint32_t> h(n);
  CHECK(cudaMemcpy(h.data(), d, n * 4, cudaMemcpyDeviceToHost));
  uint32_t x = 0;
  for (uint32_t v : h) x ^= v;
  return x;
}

int main(int argc, char** argv) {
  size_t rows = argc > 1 ? strtoull(argv[1], nullptr, 10) : 4194304;
  int keep = argc > 2 ? atoi(argv[2]) : 38;
  rows = rows / 8 * 8;
  size_t tiles = rows / 8;
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  // Rows with exactly `keep` of 128 bits set, f16 values with random signs and exponents.
  std::vector<uint32_t> bits(rows * WORDS);
  std::vector<uint16_t> vals(rows * keep + 8, 0);  // padding: a lane's last words read past a row
  for (size_t r = 0; r < rows; r++) {
    uint32_t* w = &bits[r * WORDS];
    int set = 0;
    while (set < keep) {
      uint32_t c = next_u64() & 127;
      if (!(w[c >> 5] >> (c & 31) & 1)) { w[c >> 5] |= 1u << (c & 31); set++; }
    }
  }
  for (auto& v : vals) { uint64_t z = next_u64(); v = (uint16_t)((z & 0x83ff) | (((z >> 16) % 8 + 9) << 10)); }
  // The expected checksum: each row expanded, each lane's two half2 words.
  uint32_t expect = 0;
  for (size_t r = 0; r < rows; r++) {
    uint16_t d[128];
    size_t p = r * keep;
    for (int c = 0; c < 128; c++) d[c] = (bits[r * WORDS + c / 32] >> (c % 32) & 1) ? vals[p++] : 0;
    for (int l = 0; l < 32; l++) {
      uint32_t o01 = d[4 * l] | (uint32_t)d[4 * l + 1] << 16, o23 = d[4 * l + 2] | (uint32_t)d[4 * l + 3] << 16;
      expect ^= o01 ^ (o23 * 0x9e3779b9u);
    }
  }
  uint32_t *d_bits, *d_out;
  uint16_t* d_vals;
  uint4* d_dense;
  size_t dense_bytes = rows * 256;
  CHECK(cudaMalloc(&d_bits, bits.size() * 4));
  CHECK(cudaMalloc(&d_vals, vals.size() * 2));
  CHECK(cudaMalloc(&d_dense, dense_bytes));
  CHECK(cudaMemset(d_dense, 1, dense_bytes));
  CHECK(cudaMemcpy(d_bits, bits.data(), bits.size() * 4, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(d_vals, vals.data(), vals.size() * 2, cudaMemcpyHostToDevice));
  size_t comp_bytes = rows * (16 + 2 * (size_t)keep);
  printf("%s, %d SMs; %zu rows, keep %d of 128: compressed %.1f MB, dense %.1f MB\n", prop.name,
         prop.multiProcessorCount, rows, keep, comp_bytes / 1e6, dense_bytes / 1e6);

  const int threads = 256;
  size_t max_blocks = 65536;
  CHECK(cudaMalloc(&d_out, max_blocks * threads * 4));
  auto report = [&](const char* name, float ms, size_t bytes) {
    printf("| %-22s | %9.1f us | %7.0f GB/s |\n", name, ms * 1e3, bytes / (ms * 1e-3) / 1e9);
  };
  printf("| kernel | median | bytes read / time |\n|---|---|---|\n");
  {
    int blocks = prop.multiProcessorCount * 8;
    float best = 1e9;
    for (int g : {blocks, 2 * blocks, 4 * blocks}) {
      float ms = median_ms([&] { read_only<<<g, threads>>>(reinterpret_cast<const uint4*>(d_vals), rows * keep * 2 / 16, d_out); })
               + median_ms([&] { read_only<<<g, threads>>>(reinterpret_cast<const uint4*>(d_bits), rows * 16 / 16, d_out); });
      best = std::min(best, ms);
    }
    report("read_only (compressed)", best, comp_bytes);
    float dbest = 1e9;
    for (int g : {blocks, 2 * blocks, 4 * blocks})
      dbest = std::min(dbest, median_ms([&] { read_only<<<g, threads>>>(d_dense, dense_bytes / 16, d_out); }));
    report("dense_read", dbest, dense_bytes);
  }
  int ok = 1;
  for (int mode = 0; mode < 3; mode++) {
    const char* name = mode == 0 ? "decode_walk" : mode == 1 ? "decode_prmt" : "decode_shift";
    float best = 1e9;
    int best_blocks = 0;
    for (int per_sm : {4, 8, 16, 32}) {
      int blocks = prop.multiProcessorCount * per_sm;
      auto launch = [&] {
        if (mode == 0) decode<0><<<blocks, threads>>>(d_bits, d_vals, tiles, keep, d_out);
        else if (mode == 1) decode<1><<<blocks, threads>>>(d_bits, d_vals, tiles, keep, d_out);
        else decode<2><<<blocks, threads>>>(d_bits, d_vals, tiles, keep, d_out);
      };
      float ms = median_ms(launch);
      CHECK(cudaMemset(d_out, 0, max_blocks * threads * 4));
      launch();
      CHECK(cudaDeviceSynchronize());
      uint32_t got = xor_all(d_out, (size_t)blocks * threads);
      if (got != expect) { printf("%s with %d blocks: checksum %08x, expected %08x\n", name, blocks, got, expect); ok = 0; }
      if (ms < best) { best = ms; best_blocks = blocks; }
    }
    char label[64];
    snprintf(label, sizeof label, "%s (%d blocks)", name, best_blocks);
    report(label, best, comp_bytes);
  }
  printf(ok ? "checksums: ok\n" : "checksums: FAILED\n");
  return ok ? 0 : 1;
}
#endif
