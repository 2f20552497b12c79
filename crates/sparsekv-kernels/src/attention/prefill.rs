//! Causal self-attention of whole prompts on matrix units (CUDA, f16/bf16): the attention of
//! an exact prefill, flash-style (the `n x n` scores never exist) and GQA-aware (each KV head's
//! keys and values are staged once for every query head of its group, never repeated).
//!
//! One cube takes a block of query tokens for up to [`PLANES`] query heads of one KV group;
//! each plane owns [`ROWS`] query rows (one head, 32 consecutive tokens: two 16-row products
//! that share every key and value fragment, FlashAttention-2's layout). The cube walks the
//! keys its queries may see in tiles of [`KEYS`], each tile in named steps:
//!
//! 1. **Stage**: the tile's K and V rows, 16-byte asynchronous copies (`cp.async`) issued by
//!    the whole cube into one of two shared buffers while it computes on the other, and
//!    waited for on that buffer's barrier; rows padded by one chunk so that the eight rows of
//!    an `ldmatrix` start in different banks; rows past the prompt are zeros (empty copies).
//! 2. **Scores**: per plane, `S = Q K^T` (32 rows x `keys`) with 2 x `head_dim / 16` x
//!    `keys / 8` 16x8x16 products; the plane's queries (staged once) by `ldmatrix`, the keys by
//!    `ldmatrix.x4` as the `B` operand of two products.
//! 3. **Softmax state**: the causal mask where the tile reaches past the plane's first query,
//!    the tile's maximum per row (reduced over the row's four lanes by plane shuffles), the
//!    rescale of what was accumulated, lazily (only when some row's maximum grew by more than
//!    [`RESCALE_SLACK`]: FlashAttention-4's conditional rescaling), the probabilities (the fast
//!    `exp`: the kernel is compiled with reduced-precision, finite-only float math), a
//!    lane-partial running sum (reduced once at the end).
//! 4. **Values**: `O += P V`; the probabilities go from the scores' accumulator registers
//!    straight into the `A` operand (the two layouts agree lane by lane), the values by
//!    `ldmatrix.x4.trans` as the `B` operand of two products.
//!
//! Planes whose queries all precede a tile skip its steps 2-4. Query blocks are launched
//! heaviest (latest) first, so the last wave is made of short blocks.
//!
//! Register layouts are those of PTX `mma.m16n8k16` (lane `l`: `g = l / 4`, `c = l % 4`): `A`
//! holds rows `g`, `g + 8` at columns `2c, 2c + 1, 2c + 8, 2c + 9`; `B` rows `2c, 2c + 1,
//! 2c + 8, 2c + 9` of column `g`; `C` rows `g`, `g + 8` at columns `2c, 2c + 1`.

use cubecl::prelude::barrier::{Barrier, copy_async_checked};
use cubecl::prelude::cmma::{MatrixIdent, MmaDefinition};
use cubecl::prelude::*;

use crate::compress::check_len;
use crate::error::{KernelError, Result};
use crate::{FloatElement, MmaApi, check_type_supported, has_mma};
use sparsekv_format::PromptShape;

/// Query rows per plane: [`M_TILES`] products of 16 rows each, which share every key and
/// value fragment (FlashAttention-2's 32 rows per warp: half the shared-memory reads per
/// product of 16 rows).
const ROWS: usize = 16 * M_TILES;
/// 16-row products per plane.
const M_TILES: usize = 2;
/// Planes per cube.
const PLANES: usize = 4;
/// Units per cube.
const UNITS: usize = 32 * PLANES;
/// Keys per tile (the plan's `keys`): `keys / 8` products wide in the scores, `keys / 16`
/// deep in the values. 32 keeps the scores of two 16-row products in registers beside their
/// outputs; `SPARSEKV_PREFILL_KEYS=64` (a tuning knob for benchmarks) takes larger tiles.
const KEYS: usize = 32;
/// 16-bit elements per 16-byte chunk.
const CHUNK: usize = 8;
/// Padding of a staged row, in elements.
const ROW_PAD: usize = CHUNK;
/// How far (in units of the exponent) a tile's maximum score may pass a row's running maximum
/// before the row's accumulators are rescaled: ln 256, so probabilities stay at most 256.
const RESCALE_SLACK: f32 = 5.545;
/// The largest head_dim: a lane keeps `M_TILES * head_dim / 4` output accumulators and
/// `M_TILES * keys / 2` scores in registers.
const MAX_HEAD_DIM: usize = 128;

/// Static launch parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PrefillPlan {
    /// Elements per head (a multiple of 16, at most [`MAX_HEAD_DIM`]).
    head_dim: usize,
    /// Query heads per cube (4, 2 or 1, dividing the group): the planes are `heads` heads by
    /// `PLANES / heads` blocks of [`ROWS`] tokens.
    heads: usize,
    /// Keys per tile (32 or 64; [`KEYS`]).
    keys: usize,
}

impl PrefillPlan {
    fn new(shape: PromptShape) -> Self {
        let heads = [4, 2, 1]
            .into_iter()
            .find(|h| shape.group().is_multiple_of(*h))
            .unwrap_or(1);
        let keys = match std::env::var("SPARSEKV_PREFILL_KEYS").as_deref() {
            Ok("64") => 64,
            _ => KEYS,
        };
        PrefillPlan {
            head_dim: shape.head_dim().get(),
            heads,
            keys,
        }
    }

    /// 16-byte chunks of one tile of keys (or values).
    fn tile_chunks(&self) -> usize {
        self.keys * self.head_dim / CHUNK
    }

    /// Shared-memory stride of a staged row, in elements.
    fn row(&self) -> usize {
        self.head_dim + ROW_PAD
    }

    /// Query tokens per cube.
    fn tokens(&self) -> usize {
        ROWS * PLANES / self.heads
    }

    /// Shared memory of one cube, in bytes (queries of every plane, two buffers of a K and a V
    /// tile).
    fn shared_bytes(&self) -> usize {
        (PLANES * ROWS + 4 * self.keys) * self.row() * 2
    }
}

/// Step 1: issues this unit's asynchronous copies of the keys and values `k0..k0 + keys` of
/// the stream starting at row `stream0` into the shared buffer at chunk `buf0` of `kv_s` (K
/// tile, then V tile); rows past the stream's `n` tokens get empty copies, which write zeros.
/// The caller commits them to the buffer's barrier.
#[cube]
#[allow(clippy::too_many_arguments)]
fn issue_tile<F: Float, N: Size>(
    k: &Array<Vector<F, N>>,
    v: &Array<Vector<F, N>>,
    kv_s: &mut SharedMemory<Vector<F, N>>,
    buf0: usize,
    stream0: usize,
    k0: usize,
    n: usize,
    #[comptime] plan: PrefillPlan,
) {
    let row_chunks = comptime!(plan.head_dim / CHUNK);
    let row = comptime!(plan.row() / CHUNK);
    let v_tile = comptime!(plan.keys * plan.row() / CHUNK);
    #[unroll]
    for u in 0..comptime!(plan.tile_chunks().div_ceil(UNITS)) {
        let i = UNIT_POS as usize + UNITS * u;
        if i < comptime!(plan.tile_chunks()) {
            let r = i / row_chunks;
            let at = buf0 + r * row + i % row_chunks;
            let len = select(k0 + r < n, 1usize, 0usize);
            // A valid address even for an empty copy.
            let src = (stream0 + min(k0 + r, n - 1)) * row_chunks + i % row_chunks;
            copy_async_checked(
                &k.slice(src, src + len),
                &mut kv_s.slice_mut(at, at + 1),
                CHUNK as u32,
            );
            copy_async_checked(
                &v.slice(src, src + len),
                &mut kv_s.slice_mut(at + v_tile, at + v_tile + 1),
                CHUNK as u32,
            );
        }
    }
}

/// The prompt attention kernel (module docs). `q` `[batch, tokens, q_heads, head_dim]`, `k`
/// and `v` `[batch, kv_heads, past + tokens, head_dim]`, all read as 16-byte chunks (`N` =
/// 8); `out` `[batch, tokens, q_heads, head_dim]`; query `t` is token `past + t` of its
/// sequence. Grid: (query blocks, KV heads x cubes per group, batch).
#[cube(
    launch_unchecked,
    fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf
)]
#[allow(clippy::too_many_arguments)]
fn prefill_attention_kernel<F: Float, N: Size>(
    q: &Array<Vector<F, N>>,
    k: &Array<Vector<F, N>>,
    v: &Array<Vector<F, N>>,
    out: &mut Array<F>,
    tokens: u32,
    past: u32,
    q_heads: u32,
    group: u32,
    blocks: u32,
    scale: f32,
    #[comptime] plan: PrefillPlan,
) {
    let (d, heads) = comptime!((plan.head_dim, plan.heads));
    let row = comptime!(plan.row());
    let block_tokens = comptime!(plan.tokens());
    // 16-channel steps of the scores, 8-channel tiles of the output, 8-key tiles of the
    // scores, 16-key steps of the values, 16-byte chunks per row.
    let steps = comptime!(plan.head_dim / 16);
    let d_tiles = comptime!(plan.head_dim / 8);
    let keys = comptime!(plan.keys);
    let key_tiles = comptime!(plan.keys / 8);
    let key_steps = comptime!(plan.keys / 16);
    let row_chunks = comptime!(plan.head_dim / CHUNK);
    let size!(P) = 2usize;

    let mut q_s = SharedMemory::<F>::new_aligned(comptime!(PLANES * ROWS * plan.row()), 16usize);
    // Two buffers, each a K tile then a V tile, in 16-byte chunks (the copies' unit; the
    // `ldmatrix` addresses are whole chunks too).
    let buffer = comptime!(2 * plan.keys * plan.row() / CHUNK);
    let mut kv_s = SharedMemory::<Vector<F, N>>::new_aligned(comptime!(2 * buffer), 16usize);
    let bar0 = Barrier::shared(UNITS as u32, UNIT_POS == 0);
    let bar1 = Barrier::shared(UNITS as u32, UNIT_POS == 0);

    let n = tokens as usize;
    let past = past as usize;
    let context = past + n;
    let b = CUBE_POS_Z as usize;
    // The latest query blocks see the most keys: they go first (`blocks` is the grid's width).
    let block = (blocks - 1 - CUBE_POS_X) as usize;
    let cubes_per_group = group as usize / heads;
    let kv_head = CUBE_POS_Y as usize / cubes_per_group;
    let kv_heads = CUBE_COUNT_Y as usize / cubes_per_group;
    let plane = UNIT_POS as usize / 32;
    let lane = UNIT_POS as usize % 32;
    let g = lane / 4;
    let c = lane % 4;
    let head =
        kv_head * group as usize + (CUBE_POS_Y as usize % cubes_per_group) * heads + plane % heads;
    let block0 = block * block_tokens;
    // This plane's first query token; the cube's queries end at `q_end`.
    let t_plane = block0 + (plane / heads) * ROWS;
    let q_end = min(block0 + block_tokens, n);

    // The plane's queries: ROWS rows from token `t_plane`, zeros past the prompt.
    {
        let q0 = plane * ROWS * row;
        let mut view = q_s
            .slice_mut(q0, q0 + ROWS * row)
            .into_vectorized()
            .with_vector_size::<N>();
        #[unroll]
        for u in 0..comptime!((ROWS * plan.head_dim / CHUNK).div_ceil(32)) {
            let i = lane + 32 * u;
            let r = i / row_chunks;
            let t = t_plane + r;
            let mut x = Vector::<F, N>::zeroed();
            if t < n {
                x = q[((b * n + t) * q_heads as usize + head) * row_chunks + i % row_chunks];
            }
            view[r * (row / CHUNK) + i % row_chunks] = x;
        }
    }

    let def = MmaDefinition::<F, F, f32>::new(16usize, 8usize, 16usize);
    // Output accumulators: per 16-row product `mt` and 8-channel tile `dt`, rows
    // 16 mt + g and 16 mt + g + 8 at channels 2c, 2c + 1: `o[(mt d_tiles + dt) 2 + r]`.
    let mut o = Array::<Vector<f32, P>>::new(comptime!(2 * M_TILES * d_tiles));
    #[unroll]
    for i in 0..comptime!(2 * M_TILES * d_tiles) {
        o[i] = Vector::<f32, P>::zeroed();
    }
    // Softmax state of row 16 mt + g + 8 r at `2 mt + r`.
    let mut m_run = Array::<f32>::new(comptime!(2 * M_TILES));
    let mut l_run = Array::<f32>::new(comptime!(2 * M_TILES));
    #[unroll]
    for r in 0..comptime!(2 * M_TILES) {
        m_run[r] = f32::new(-3.0e38);
        l_run[r] = 0.0;
    }

    let stream0 = (b * kv_heads + kv_head) * context;
    // The key position of the plane's last query (keys are numbered from the context's start).
    let plane_last = past + t_plane + ROWS - 1;
    let v_tile = comptime!(plan.keys * plan.row() / CHUNK);
    let tiles = (past + q_end).div_ceil(keys);
    // Step 1 for the first tile; the barriers exist for every unit once the cube has synced.
    sync_cube();
    issue_tile::<F, N>(k, v, &mut kv_s, 0usize, stream0, 0usize, context, plan);
    bar0.commit_copy_async();
    for kt in 0..tiles {
        let k0 = kt * keys;
        let cur = kt % 2;
        // The other buffer was read by the previous tile: once every plane is done with it,
        // the next tile's copies go there while this one is computed.
        sync_cube();
        if kt + 1 < tiles {
            issue_tile::<F, N>(
                k,
                v,
                &mut kv_s,
                (1 - cur) * buffer,
                stream0,
                k0 + keys,
                context,
                plan,
            );
            if cur == 0 {
                bar1.commit_copy_async();
            } else {
                bar0.commit_copy_async();
            }
        }
        if cur == 0 {
            bar0.arrive_and_wait();
        } else {
            bar1.arrive_and_wait();
        }
        let kb = cur * buffer;

        if k0 <= plane_last {
            // Step 2: scores, per product `mt` and 8-key tile `nt` rows 16 mt + g and
            // 16 mt + g + 8 at keys 2c, 2c + 1: `s[(mt key_tiles + nt) 2 + r]`.
            let mut s = Array::<Vector<f32, P>>::new(comptime!(2 * M_TILES * key_tiles));
            #[unroll]
            for i in 0..comptime!(2 * M_TILES * key_tiles) {
                s[i] = Vector::<f32, P>::zeroed();
            }
            #[unroll]
            for ks in 0..steps {
                // Per product: lane l gives query row 16 mt + l % 16, channels
                // 16 ks + 8 (l / 16).
                let mut qf = Array::<Vector<F, P>>::new(comptime!(4 * M_TILES));
                #[unroll]
                for mt in 0..M_TILES {
                    let qa = plane * ROWS * row
                        + (mt * 16 + lane % 16) * row
                        + ks * 16
                        + (lane / 16) * 8;
                    let a = def.load_matrix::<F, P>(
                        &q_s.slice(qa, qa + CHUNK),
                        MatrixIdent::A,
                        4usize,
                        false,
                    );
                    #[unroll]
                    for i in 0..4usize {
                        qf[4 * mt + i] = a[i];
                    }
                }
                #[unroll]
                for np in 0..comptime!(key_tiles / 2) {
                    // Two 8-key tiles per load: lanes 8m..8m + 8 give matrix m, key
                    // 16 np + 8 (m / 2) + l % 8 at channels 16 ks + 8 (m % 2).
                    let ka = kb
                        + ((np * 16 + (lane / 16) * 8 + lane % 8) * row + ks * 16) / CHUNK
                        + (lane / 8) % 2;
                    let bk = def.load_matrix::<Vector<F, N>, P>(
                        &kv_s.slice(ka, ka + 1),
                        MatrixIdent::B,
                        4usize,
                        false,
                    );
                    #[unroll]
                    for half in 0..2usize {
                        let nt = 2 * np + half;
                        let mut bn = Array::<Vector<F, P>>::new(2usize);
                        bn[0] = bk[2 * half];
                        bn[1] = bk[2 * half + 1];
                        #[unroll]
                        for mt in 0..M_TILES {
                            let mut a = Array::<Vector<F, P>>::new(4usize);
                            #[unroll]
                            for i in 0..4usize {
                                a[i] = qf[4 * mt + i];
                            }
                            let at = (mt * key_tiles + nt) * 2;
                            let mut acc = Array::<Vector<f32, P>>::new(2usize);
                            acc[0] = s[at];
                            acc[1] = s[at + 1];
                            def.execute_inplace(&a, &bn, &mut acc);
                            s[at] = acc[0];
                            s[at + 1] = acc[1];
                        }
                    }
                }
            }

            // Step 3: softmax state of rows 16 mt + g (r = 0) and 16 mt + g + 8 (r = 1): the
            // masked scores and each row's maximum over the tile (reduced over its four lanes).
            let masked = k0 + keys > past + t_plane;
            let mut tile_max = Array::<f32>::new(comptime!(2 * M_TILES));
            let mut grows = false;
            #[unroll]
            for mr in 0..comptime!(2 * M_TILES) {
                let (mt, r) = (mr / 2, mr % 2);
                // The row's key position.
                let t = past + t_plane + mt * 16 + g + 8 * r;
                let mut mx = f32::new(-3.0e38);
                #[unroll]
                for nt in 0..key_tiles {
                    let at = (mt * key_tiles + nt) * 2 + r;
                    let mut x = s[at];
                    if masked {
                        let j = k0 + nt * 8 + 2 * c;
                        x[0] = select(j <= t, x[0], f32::new(-3.0e38));
                        x[1] = select(j < t, x[1], f32::new(-3.0e38));
                        s[at] = x;
                    }
                    mx = max(mx, max(x[0], x[1]));
                }
                mx = max(mx, plane_shuffle_xor(mx, 1u32));
                mx = max(mx, plane_shuffle_xor(mx, 2u32));
                tile_max[mr] = mx;
                grows = grows || (mx - m_run[mr]) * scale > RESCALE_SLACK;
            }
            // Lazy rescale: a row keeps its running maximum while the tile's stays within
            // RESCALE_SLACK of it (its probabilities are then at most e^RESCALE_SLACK = 256:
            // exact enough in 16 bits, the sums in f32), so the accumulators are rescaled
            // (most of this step's instructions) only when some row of the plane needs it.
            if plane_any(grows) {
                #[unroll]
                for mr in 0..comptime!(2 * M_TILES) {
                    let mt = mr / 2;
                    let m_new = max(m_run[mr], tile_max[mr]);
                    let alpha = Exp::exp((m_run[mr] - m_new) * scale);
                    m_run[mr] = m_new;
                    l_run[mr] *= alpha;
                    #[unroll]
                    for dt in 0..d_tiles {
                        let at = (mt * d_tiles + dt) * 2 + mr % 2;
                        let mut x = o[at];
                        x[0] *= alpha;
                        x[1] *= alpha;
                        o[at] = x;
                    }
                }
            }
            // The probabilities and a lane-partial running sum (reduced once at the end).
            #[unroll]
            for mr in 0..comptime!(2 * M_TILES) {
                let (mt, r) = (mr / 2, mr % 2);
                // exp((x - m) scale) as one fused multiply-add and the exponential.
                let m_scaled = m_run[mr] * scale;
                let mut sum = 0.0f32;
                #[unroll]
                for nt in 0..key_tiles {
                    let at = (mt * key_tiles + nt) * 2 + r;
                    let x = s[at];
                    let mut p = Vector::<f32, P>::empty();
                    p[0] = Exp::exp(x[0] * scale - m_scaled);
                    p[1] = Exp::exp(x[1] * scale - m_scaled);
                    sum += p[0] + p[1];
                    s[at] = p;
                }
                l_run[mr] += sum;
            }

            // Step 4: O += P V, 16 keys per product. A of product mt, key step kk: rows
            // 16 mt + g, + 8 at keys 16 kk + 2c.. (score tile 2 kk) and 16 kk + 8 + 2c..
            // (score tile 2 kk + 1): `pa[(mt key_steps + kk) 4 + i] = s[..same..]`.
            let mut pa = Array::<Vector<F, P>>::new(comptime!(4 * M_TILES * key_steps));
            #[unroll]
            for i in 0..comptime!(4 * M_TILES * key_steps) {
                let x = s[i];
                let mut y = Vector::<F, P>::empty();
                y[0] = F::cast_from(x[0]);
                y[1] = F::cast_from(x[1]);
                pa[i] = y;
            }
            #[unroll]
            for dt in 0..d_tiles {
                #[unroll]
                for kp in 0..comptime!(key_steps / 2) {
                    // ldmatrix.x4.trans: lane l gives key row 32 kp + l at channels 8 dt..;
                    // matrices 0, 1 are key step 2 kp, matrices 2, 3 key step 2 kp + 1.
                    let va = kb + v_tile + ((kp * 32 + lane) * row) / CHUNK + dt;
                    let bv = def.load_matrix::<Vector<F, N>, P>(
                        &kv_s.slice(va, va + 1),
                        MatrixIdent::B,
                        4usize,
                        true,
                    );
                    #[unroll]
                    for half in 0..2usize {
                        let kk = 2 * kp + half;
                        let mut bn = Array::<Vector<F, P>>::new(2usize);
                        bn[0] = bv[2 * half];
                        bn[1] = bv[2 * half + 1];
                        #[unroll]
                        for mt in 0..M_TILES {
                            let mut ap = Array::<Vector<F, P>>::new(4usize);
                            #[unroll]
                            for i in 0..4usize {
                                ap[i] = pa[(mt * key_steps + kk) * 4 + i];
                            }
                            let at = (mt * d_tiles + dt) * 2;
                            let mut acc = Array::<Vector<f32, P>>::new(2usize);
                            acc[0] = o[at];
                            acc[1] = o[at + 1];
                            def.execute_inplace(&ap, &bn, &mut acc);
                            o[at] = acc[0];
                            o[at + 1] = acc[1];
                        }
                    }
                }
            }
        }
    }

    // Normalise by the row sums (reduced over the row's four lanes) and write the real rows.
    #[unroll]
    for mr in 0..comptime!(2 * M_TILES) {
        let (mt, r) = (mr / 2, mr % 2);
        let mut l = l_run[mr];
        l += plane_shuffle_xor(l, 1u32);
        l += plane_shuffle_xor(l, 2u32);
        let t = t_plane + mt * 16 + g + 8 * r;
        if t < n {
            let inv = 1.0 / l;
            let base = ((b * n + t) * q_heads as usize + head) * d;
            #[unroll]
            for dt in 0..d_tiles {
                let x = o[(mt * d_tiles + dt) * 2 + r];
                out[base + dt * 8 + 2 * c] = F::cast_from(x[0] * inv);
                out[base + dt * 8 + 2 * c + 1] = F::cast_from(x[1] * inv);
            }
        }
    }
}

/// Why [`prefill_attention`] cannot run prompts of `shape` on `client` (the caller computes
/// the attention another way), or `None` when it can: it needs CUDA with 16x8x16 matrix units
/// for `F` (f16 or bf16), a head_dim that is a multiple of 16 and at most 128, and the shared
/// memory of its tiles.
pub fn prefill_attention_unsupported<R: Runtime, F: FloatElement>(
    client: &ComputeClient<R>,
    shape: PromptShape,
) -> Option<String> {
    let d = shape.head_dim().get();
    if R::name(client) != "cuda" || !has_mma::<R, F>(client, MmaApi::Registers, (16, 8, 16)) {
        return Some(format!(
            "the prompt attention kernel needs CUDA with 16x8x16 {} matrix units (got {})",
            F::name(),
            R::name(client)
        ));
    }
    if !d.is_multiple_of(16) || d > MAX_HEAD_DIM {
        return Some(format!(
            "the prompt attention kernel needs a head_dim that is a multiple of 16, at most {MAX_HEAD_DIM} (got {d})"
        ));
    }
    let hw = &client.properties().hardware;
    let shared = PrefillPlan {
        head_dim: d,
        heads: 1,
        keys: 64,
    }
    .shared_bytes();
    if shared > hw.max_shared_memory_size || (hw.max_units_per_cube as usize) < UNITS {
        return Some(format!(
            "the prompt attention kernel needs {shared} bytes of shared memory and {UNITS} units per cube; the device allows {} and {}",
            hw.max_shared_memory_size, hw.max_units_per_cube
        ));
    }
    None
}

/// Causal self-attention of prompts (module docs): `q` `[batch, tokens, q_heads, head_dim]`,
/// `k` and `v` `[batch, kv_heads, context, head_dim]` (`context = past + tokens`, the
/// [`PromptShape`]'s), all contiguous `F` and 16-byte aligned; writes `out` `[batch, tokens,
/// q_heads, head_dim]`. Query token `t` sees keys `0..=past + t`, scores scaled by
/// `1 / sqrt(head_dim)`, accumulated in f32.
/// [`KernelError::Unsupported`] where [`prefill_attention_unsupported`] says why.
pub fn prefill_attention<R: Runtime, F: FloatElement>(
    client: &ComputeClient<R>,
    shape: PromptShape,
    q: &cubecl::server::Handle,
    k: &cubecl::server::Handle,
    v: &cubecl::server::Handle,
    out: &cubecl::server::Handle,
) -> Result<()> {
    check_type_supported::<R, F>(client)?;
    if let Some(why) = prefill_attention_unsupported::<R, F>(client, shape) {
        return Err(KernelError::Unsupported(why));
    }
    let (batch, tokens, q_heads, kv_heads) = (
        shape.batch(),
        shape.tokens(),
        shape.q_heads(),
        shape.kv_heads(),
    );
    let d = shape.head_dim().get();
    let es = F::size_bytes();
    let q_bytes = batch * tokens * q_heads * d * es;
    let kv_bytes = batch * shape.context() * kv_heads * d * es;
    // The kernel indexes elements with 32-bit integers.
    if [q_bytes, kv_bytes]
        .iter()
        .any(|&b| b / es > u32::MAX as usize)
    {
        return Err(KernelError::InvalidArguments(format!(
            "{} query and {} key elements: the prompt attention kernel indexes at most 2^32 of each",
            q_bytes / es,
            kv_bytes / es
        )));
    }
    check_len("queries", q, q_bytes)?;
    check_len("keys", k, kv_bytes)?;
    check_len("values", v, kv_bytes)?;
    check_len("output", out, q_bytes)?;
    if [q, k, v]
        .iter()
        .any(|h| !h.offset_start.unwrap_or(0).is_multiple_of(16))
    {
        return Err(KernelError::InvalidArguments(
            "queries, keys and values must start on 16-byte boundaries".to_string(),
        ));
    }
    let plan = PrefillPlan::new(shape);
    let group = shape.group();
    let blocks = tokens.div_ceil(plan.tokens()) as u32;
    let count = CubeCount::Static(blocks, (kv_heads * group / plan.heads) as u32, batch as u32);
    let arr = |h: &cubecl::server::Handle, bytes: usize| unsafe {
        ArrayArg::from_raw_parts(h.clone(), h.size_in_used() as usize / bytes)
    };
    // SAFETY: the kernel reads query rows below `tokens` of heads below `q_heads` and key and
    // value rows below `context` of its KV head, and writes output rows below `tokens`: all
    // inside the buffers whose sizes were checked above, read as whole 16-byte chunks since
    // head_dim is a multiple of 16 and the buffers start on 16 bytes.
    unsafe {
        prefill_attention_kernel::launch_unchecked::<F, R>(
            client,
            count,
            CubeDim::new_1d(UNITS as u32),
            CHUNK,
            arr(q, 16),
            arr(k, 16),
            arr(v, 16),
            arr(out, es),
            tokens as u32,
            shape.past() as u32,
            q_heads as u32,
            group as u32,
            blocks,
            1.0 / (d as f32).sqrt(),
            plan,
        );
    }
    Ok(())
}
