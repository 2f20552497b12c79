//! The split kernel for runtimes whose shader compilers do not keep the loads of successive
//! loop trips in flight (every runtime but CUDA; measured on NVIDIA's Vulkan driver): keys are
//! read the way values are, so a tile needs no shared staging and no barrier between its
//! loads and their use. Sparse and dense from one source, like the CUDA-core kernel.
//!
//! Same split-K contract as the CUDA-core kernel of the parent module (one cube per sequence,
//! KV head and split; partial outputs merged by the same merge kernel, or the output written
//! directly when a row has one split). One cube is one plane of [`LANES`] units, and unit `i`
//! owns the channels `i * slice ..` (`slice = head_dim / LANES`) of every key row, value row,
//! query and output row. A tile of `tile` tokens is four named steps:
//!
//! 1. **Load** (`load_slices`): the unit's slices of the tile's key rows, then of its value
//!    rows, into registers, every load issued before any is used (consecutive units read
//!    consecutive bytes of a row: one coalesced access per row). Compressed rows
//!    (`load_tile_words`, `row_bits`, `decode_slice`): the tile's bitmap words are dealt across
//!    the plane with one coalesced load per unit, each row's words scanned for their bit
//!    counts; each unit then takes, by shuffle, the word holding its channels and the count of
//!    the row's earlier words, and reads its kept values straight from the packed row at the
//!    popcount of the bits below its channels, zero where a bit is clear.
//! 2. **Scores** (`partial_scores`, `butterfly_step`): the dot products of the unit's key
//!    slices with its slices of the group's queries (held in registers for the whole split),
//!    `tile * group` partial sums, are summed across the plane by a transposing butterfly: at
//!    each of the log2(LANES) steps a unit keeps half of its sums and adds the other half of
//!    its partner's (`plane_shuffle_xor`), so after the last step unit `i` holds the finished
//!    scores `i * held ..` (`held = tile * group / LANES`) of the head-major list, all of one
//!    head. That is `tile * group - held` exchanges a tile instead of a plane sum per score.
//! 3. **Softmax state** (`lanes_reduce`): the units of a head (`LANES / group` of them) agree
//!    on the tile's maximum and keep the running maximum and sum of that head; the tile's
//!    probabilities and each head's rescale factor go through a little shared memory.
//! 4. **Values** (in the kernel body): each unit accumulates `p * v` over the tile for its
//!    channels of every head of the group, from the value slices loaded in step 1.
//!
//! Without plane operations (lavapipe) the exchanges go through shared memory instead (the
//! same kernel, so its indexing is tested in CI; the plane path runs on GPUs).

use cubecl::prelude::*;

/// Units per cube: one plane of NVIDIA's width (the butterfly in the kernel body has its
/// log2, 5 steps). The launcher uses the plane path only where the device's planes are
/// exactly this wide.
pub(super) const LANES: usize = 32;
/// Partial sums a unit aims to hold before the butterfly: with 4 query heads a tile of 16
/// tokens (one 16-row load per unit, the tile measured best on Vulkan for the CUDA-core
/// kernel) and few enough registers to stay at the occupancy of that kernel.
const PARTIAL_SUMS: usize = 2 * LANES;
/// The same where compressed rows are read: half as many, since each compressed row's slice
/// is read as one load per channel (16-bit values in 32-bit registers) rather than one vector,
/// and at 16 tokens the kernel took 227 registers a unit on CUDA (12.5% occupancy, ncu).
const PARTIAL_SUMS_SPARSE: usize = LANES;
/// The fewest and most tokens per tile.
const MIN_TILE: usize = 8;
const MAX_TILE: usize = 32;
/// The most query heads per KV head: more would hold too many partial sums per unit.
const MAX_GROUP: usize = 8;

/// Static launch parameters of the sliced kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct SlicedPlan {
    /// Elements per head: a multiple of [`LANES`] and a power of two (as `HeadDim` holds it),
    /// so a row's bitmap words divide [`LANES`] and never straddle two of a unit's registers.
    pub head_dim: usize,
    /// Query heads per KV head (a power of two, at most [`MAX_GROUP`]).
    pub group: usize,
    /// Tokens per tile.
    pub tile: usize,
    /// Elements per vector load (divides the slice).
    pub vec: usize,
    /// Whether a compressed segment is read (the tokens before the dense window).
    pub sparse: bool,
    /// Kept values per compressed key row and per value row (0 without a segment).
    pub keep_k: usize,
    pub keep_v: usize,
    /// Whether the exchanges use plane operations (else shared memory).
    pub use_plane: bool,
    /// Whether the call has one split per row, so the kernel normalises its result and writes
    /// the output itself (no partials, no merge launch).
    pub direct: bool,
}

impl SlicedPlan {
    /// The plan for `head_dim` and `group` with loads of at most `vec` elements (a power of
    /// two that divides `head_dim` and the stream stride), compressed rows keeping `keep`
    /// values of K and V (`None`: a dense call), or why the kernel does not apply.
    pub(super) fn new(
        head_dim: usize,
        group: usize,
        vec: usize,
        keep: Option<(usize, usize)>,
        use_plane: bool,
    ) -> Result<Self, String> {
        if !head_dim.is_multiple_of(LANES) {
            return Err(format!(
                "it needs head_dim a multiple of {LANES} (got {head_dim})"
            ));
        }
        if !group.is_power_of_two() || group > MAX_GROUP {
            return Err(format!(
                "it needs a power of two of at most {MAX_GROUP} query heads per KV head (got {group})"
            ));
        }
        let slice = head_dim / LANES;
        let mut vec = vec.clamp(1, slice);
        while !slice.is_multiple_of(vec) {
            vec /= 2;
        }
        let sums = if keep.is_some() {
            PARTIAL_SUMS_SPARSE
        } else {
            PARTIAL_SUMS
        };
        // At least one finished score per unit after the butterfly.
        let tile = (sums / group)
            .clamp(MIN_TILE, MAX_TILE)
            .max(LANES.div_ceil(group));
        let (keep_k, keep_v) = keep.unwrap_or((0, 0));
        Ok(Self {
            head_dim,
            group,
            tile,
            vec,
            sparse: keep.is_some(),
            keep_k,
            keep_v,
            use_plane,
            direct: false,
        })
    }

    /// Channels a unit owns.
    fn slice(&self) -> usize {
        self.head_dim / LANES
    }

    /// Bitmap words per compressed row.
    fn words(&self) -> usize {
        self.head_dim / 32
    }

    /// Bitmap words of a tile of one matrix each unit loads (word `i` of the tile is held by
    /// unit `i % LANES`, in its register `i / LANES`).
    fn word_regs(&self) -> usize {
        (self.tile * self.words()).div_ceil(LANES)
    }

    /// Words of the shared buffer holding one matrix's bitmap words of a tile (K and V have
    /// one each): without plane operations the words are shared, not dealt, so the buffer
    /// holds the tile's words; otherwise it is unused (one word, the least an allocation takes).
    fn shared_words(&self) -> usize {
        if self.sparse && !self.use_plane {
            LANES * self.word_regs()
        } else {
            1
        }
    }

    /// Shared memory the kernel uses, in bytes (mirrors its allocations).
    pub(super) fn shared_bytes(&self) -> usize {
        let exchange = if self.use_plane {
            1
        } else {
            LANES * self.tile * self.group / 2
        };
        4 * (exchange + self.tile * self.group + self.group + 2 * self.shared_words())
    }
}

/// Step 1: the unit's slice (`nv` vectors from vector `first` of each row) of the `tile` rows
/// from vector `row0` of `src`, rows `vpr` vectors apart, into `dst` (row `u` at `u * nv`).
/// Rows past the `n` the tile has repeat its last row, so that no load needs a branch (their
/// probabilities are 0).
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_slices<F: Float, N: Size>(
    src: &Array<Vector<F, N>>,
    row0: usize,
    first: usize,
    n: usize,
    dst: &mut Array<Vector<F, N>>,
    #[comptime] tile: usize,
    #[comptime] nv: usize,
    #[comptime] vpr: usize,
) {
    #[unroll]
    for u in 0..tile {
        let row = row0 + min(u, n - 1) * vpr + first;
        #[unroll]
        for v in 0..nv {
            dst[u * nv + v] = src[row + v];
        }
    }
}

/// Step 1 for a compressed tile: its bitmap words of one matrix (K or V), `count` words from
/// word `w0` of `bits`, dealt across the plane (word `i` in register `i / LANES` of unit
/// `i % LANES`, 0 past `count`). With plane operations each unit also gets, in `before`, how
/// many bits the words before its own in the same row set (a scan over the row's units);
/// without them the words go to `shared` (`LANES` per register) for the rows to read.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_tile_words(
    bits: &Array<u32>,
    w0: usize,
    count: usize,
    held: &mut Array<u32>,
    before: &mut Array<u32>,
    shared: &mut SharedMemory<u32>,
    #[comptime] plan: SlicedPlan,
) {
    let (regs, words) = comptime!((plan.word_regs(), plan.words()));
    let lane = UNIT_POS as usize;
    #[unroll]
    for r in 0..regs {
        let i = r * LANES + lane;
        let mut w = 0u32;
        if i < count {
            w = bits[w0 + i];
        }
        held[r] = w;
    }
    if comptime!(plan.use_plane) {
        // An inclusive scan of the bit counts over each row's `words` units (rows start at
        // multiples of `words`, which divides LANES), then minus the unit's own count.
        #[unroll]
        for r in 0..regs {
            let own = held[r].count_ones();
            let mut scan = own;
            #[unroll]
            for s in 0..comptime!(words.trailing_zeros() as usize) {
                let delta = 1usize << s;
                let other = plane_shuffle_up(scan, delta as u32);
                scan += select(lane % words >= delta, other, 0u32);
            }
            before[r] = scan - own;
        }
    } else {
        #[unroll]
        for r in 0..regs {
            shared[r * LANES + lane] = held[r];
        }
        sync_cube();
    }
}

/// Step 1 for compressed row `u` of a tile: the bitmap word holding the unit's channels (word
/// `my_word` of the row) and the number of bits the row's earlier words set, from the words
/// [`load_tile_words`] dealt (plane shuffles) or shared.
#[cube]
fn row_bits(
    held: &Array<u32>,
    before: &Array<u32>,
    shared: &SharedMemory<u32>,
    u: usize,
    my_word: usize,
    #[comptime] plan: SlicedPlan,
) -> Vector<u32, Const<2>> {
    let words = comptime!(plan.words());
    let i = u * words + my_word;
    let mut out = Vector::<u32, Const<2>>::empty();
    if comptime!(plan.use_plane) {
        // The row's words sit in one register (a row never straddles two).
        let r = u * words / LANES;
        let src = (i % LANES) as u32;
        out[0] = plane_shuffle(held[r], src);
        out[1] = plane_shuffle(before[r], src);
    } else {
        out[0] = shared[i];
        let mut count = 0u32;
        #[unroll]
        for j in 0..words {
            count += select(j < my_word, shared[u * words + j].count_ones(), 0u32);
        }
        out[1] = count;
    }
    out
}

/// Step 1 for a compressed row: the unit's slice of it, decoded into `dst[u * nv ..]` (zero
/// where the bitmap clears a channel). `word` is the row's bitmap word holding the unit's
/// channels (from bit `shift` on), `before` the values the row keeps before that word,
/// `row_start` the row's first value in `vals`. The unit's first value is at the number of
/// kept channels below its own ("popcount of the bits below"); each channel reads the next
/// value (clamped to the array, so a cleared last channel reads in bounds) and keeps it if its
/// bit is set.
#[cube]
#[allow(clippy::too_many_arguments)]
fn decode_slice<F: Float, N: Size>(
    vals: &Array<F>,
    row_start: usize,
    word: u32,
    shift: u32,
    before: u32,
    dst: &mut Array<Vector<F, N>>,
    u: usize,
    #[comptime] plan: SlicedPlan,
) {
    let vec = comptime!(plan.vec);
    let nv = comptime!(plan.slice() / plan.vec);
    let below = word & ((1u32 << shift) - 1u32);
    let mine = word >> shift;
    let last = vals.len() - 1;
    let mut idx = row_start + (before + below.count_ones()) as usize;
    #[unroll]
    for v in 0..nv {
        let mut x = Vector::<F, N>::empty();
        #[unroll]
        for e in 0..vec {
            let kept = (mine >> ((v * vec + e) as u32)) & 1u32;
            x[e] = select(kept == 1u32, vals[min(idx, last)], F::new(0.0));
            idx += kept as usize;
        }
        dst[u * nv + v] = x;
    }
}

/// Step 2, first half: `part[g * tile + u]` = the unit's share of `q_g . k_u` for every head
/// `g` of the group and token `u` of the tile, from its slices of the keys and of the scaled
/// queries (`q[g * slice + c]`).
#[cube]
fn partial_scores<F: Float, N: Size>(
    keys: &Array<Vector<F, N>>,
    q: &Array<f32>,
    part: &mut Array<f32>,
    #[comptime] plan: SlicedPlan,
) {
    let (group, tile, vec) = comptime!((plan.group, plan.tile, plan.vec));
    let (slice, nv) = comptime!((plan.slice(), plan.slice() / plan.vec));
    #[unroll]
    for u in 0..tile {
        let mut s = Array::<f32>::new(group);
        #[unroll]
        for g in 0..group {
            s[g] = 0.0;
        }
        #[unroll]
        for v in 0..nv {
            let x = keys[u * nv + v];
            #[unroll]
            for e in 0..vec {
                let xe = f32::cast_from(x[e]);
                #[unroll]
                for g in 0..group {
                    s[g] += q[g * slice + v * vec + e] * xe;
                }
            }
        }
        #[unroll]
        for g in 0..group {
            part[g * tile + u] = s[g];
        }
    }
}

/// Step 2, one step of the transposing butterfly over the first `2 * half` partial sums of
/// `part`: the unit whose lane has bit `mask` set keeps the upper half, its partner the lower,
/// each adding the other's share of the half it keeps; the kept half moves to `part[..half]`.
/// Without plane operations the shares go through `exchange` (`half * LANES` floats).
#[cube]
fn butterfly_step(
    part: &mut Array<f32>,
    exchange: &mut SharedMemory<f32>,
    #[comptime] mask: usize,
    #[comptime] half: usize,
    #[comptime] use_plane: bool,
) {
    let lane = UNIT_POS as usize;
    let upper = (lane & mask) != 0;
    if comptime!(use_plane) {
        #[unroll]
        for i in 0..half {
            let (low, high) = (part[i], part[i + half]);
            let given = select(upper, low, high);
            let kept = select(upper, high, low);
            part[i] = kept + plane_shuffle_xor(given, comptime!(mask as u32));
        }
    } else {
        #[unroll]
        for i in 0..half {
            exchange[i * LANES + lane] = select(upper, part[i], part[i + half]);
        }
        sync_cube();
        #[unroll]
        for i in 0..half {
            let kept = select(upper, part[i + half], part[i]);
            part[i] = kept + exchange[i * LANES + (lane ^ mask)];
        }
        sync_cube();
    }
}

/// Step 3: the maximum (`is_max`) or sum of `x` over the `lanes` consecutive units of one head
/// (a power of two dividing [`LANES`]); every unit gets its head's result. Without plane
/// operations through `exchange` (at least [`LANES`] floats).
#[cube]
fn lanes_reduce(
    x: f32,
    exchange: &mut SharedMemory<f32>,
    #[comptime] lanes: usize,
    #[comptime] is_max: bool,
    #[comptime] use_plane: bool,
) -> f32 {
    let lane = UNIT_POS as usize;
    let mut r = x;
    #[unroll]
    for s in 0..comptime!(lanes.trailing_zeros() as usize) {
        let mask = 1usize << s;
        let other = if comptime!(use_plane) {
            plane_shuffle_xor(r, mask as u32)
        } else {
            exchange[lane] = r;
            sync_cube();
            let o = exchange[lane ^ mask];
            sync_cube();
            o
        };
        r = if comptime!(is_max) {
            max(r, other)
        } else {
            r + other
        };
    }
    r
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(super) fn decode_sliced_kernel<F: Float, N: Size>(
    q: &Array<Vector<F, N>>,
    k_bits: &Array<u32>,
    k_vals: &Array<F>,
    v_bits: &Array<u32>,
    v_vals: &Array<F>,
    k_rows: &Array<Vector<F, N>>,
    v_rows: &Array<Vector<F, N>>,
    lens: &Array<u32>,
    part_o: &mut Array<f32>,
    part_ml: &mut Array<f32>,
    out: &mut Array<F>,
    bits_stride: u32,
    k_vals_stride: u32,
    v_vals_stride: u32,
    stream_stride: u32,
    split_tokens: u32,
    q_heads: u32,
    scale: f32,
    #[comptime] plan: SlicedPlan,
) {
    let (d, group, tile, vec) = comptime!((plan.head_dim, plan.group, plan.tile, plan.vec));
    let (slice, nv, vpr) = comptime!((plan.slice(), plan.slice() / plan.vec, d / plan.vec));
    let sums = comptime!(plan.tile * plan.group);
    let held = comptime!(plan.tile * plan.group / LANES);
    // Units per head once the butterfly is done, and the tokens each holds.
    let head_lanes = comptime!(LANES / plan.group);
    let use_plane = comptime!(plan.use_plane);

    let mut exchange =
        SharedMemory::<f32>::new(comptime!(if plan.use_plane { 1 } else { LANES * sums / 2 }));
    // p_s[g * tile + u]: the tile's probabilities; then each head's rescale factor.
    let mut p_s = SharedMemory::<f32>::new(comptime!(sums + group));

    let b = CUBE_POS_Z as usize;
    let h = CUBE_POS_Y as usize;
    let split = CUBE_POS_X as usize;
    let kv_heads = CUBE_COUNT_Y as usize;
    let splits = CUBE_COUNT_X as usize;
    let rows = CUBE_COUNT_Z as usize;
    // lens: the compressed lengths of the rows (0 in a dense call), their dense lengths, their
    // sequences. Tokens before `tc` are compressed, the rest come from the dense rows.
    let stream = lens[2 * rows + b] as usize * kv_heads + h;
    let tc = lens[b] as usize;
    let total = tc + lens[rows + b] as usize;
    let s0 = split * split_tokens as usize;
    let s1 = min(s0 + split_tokens as usize, total);
    let lane = UNIT_POS as usize;
    let first = lane * nv;
    let stream0 = stream * stream_stride as usize / vec;
    // The head this unit's finished scores belong to, and their first token in a tile (0 for
    // the head's first unit, which writes what the head's units share).
    let my_head = lane / head_lanes;
    let my_token = (lane % head_lanes) * held;

    // The unit's slices of the group's queries, scaled: q_r[g * slice + c].
    let q0 = (b * q_heads as usize + h * group) * vpr;
    let mut q_r = Array::<f32>::new(comptime!(group * slice));
    #[unroll]
    for g in 0..group {
        #[unroll]
        for v in 0..nv {
            let x = q[q0 + g * vpr + first + v];
            #[unroll]
            for e in 0..vec {
                q_r[g * slice + v * vec + e] = f32::cast_from(x[e]) * scale;
            }
        }
    }
    let mut acc = Array::<f32>::new(comptime!(group * slice));
    #[unroll]
    for i in 0..comptime!(group * slice) {
        acc[i] = 0.0;
    }
    // The running maximum and (this unit's share of the) sum of its head.
    let mut m_run = f32::new(-3.0e38);
    let mut l_run = 0.0f32;

    // Compressed rows: the bitmap word holding this unit's channels and their first bit in
    // it, the streams' first bitmap word and values, the tile's dealt bitmap words and their
    // row prefixes.
    let (sparse, words, regs) = comptime!((plan.sparse, plan.words(), plan.word_regs()));
    let my_word = lane * slice / 32;
    let my_shift = ((lane * slice) % 32) as u32;
    let bits0 = stream * bits_stride as usize;
    let k_vals0 = stream * k_vals_stride as usize;
    let v_vals0 = stream * v_vals_stride as usize;
    let shared_words = comptime!(plan.shared_words());
    let mut k_shared = SharedMemory::<u32>::new(shared_words);
    let mut v_shared = SharedMemory::<u32>::new(shared_words);
    let mut k_held = Array::<u32>::new(regs);
    let mut v_held = Array::<u32>::new(regs);
    let mut k_before = Array::<u32>::new(regs);
    let mut v_before = Array::<u32>::new(regs);

    let mut keys = Array::<Vector<F, N>>::new(comptime!(tile * nv));
    let mut values = Array::<Vector<F, N>>::new(comptime!(tile * nv));
    let mut part = Array::<f32>::new(sums);
    let mut t0 = s0;
    while t0 < s1 {
        let n = min(tile, s1 - t0);
        // Step 1: load.
        if comptime!(sparse) {
            // Rows below `nc` are compressed, then dense rows up to `n`, then zero rows.
            let mut nc = 0usize;
            if t0 < tc {
                nc = min(t0 + n, tc) - t0;
            }
            if nc > 0 {
                let w0 = bits0 + t0 * words;
                let count = nc * words;
                load_tile_words(
                    k_bits,
                    w0,
                    count,
                    &mut k_held,
                    &mut k_before,
                    &mut k_shared,
                    plan,
                );
                load_tile_words(
                    v_bits,
                    w0,
                    count,
                    &mut v_held,
                    &mut v_before,
                    &mut v_shared,
                    plan,
                );
            }
            #[unroll]
            for u in 0..tile {
                if u < nc {
                    let kb = row_bits(&k_held, &k_before, &k_shared, u, my_word, plan);
                    let vb = row_bits(&v_held, &v_before, &v_shared, u, my_word, plan);
                    let row_k = k_vals0 + (t0 + u) * comptime!(plan.keep_k);
                    let row_v = v_vals0 + (t0 + u) * comptime!(plan.keep_v);
                    decode_slice::<F, N>(k_vals, row_k, kb[0], my_shift, kb[1], &mut keys, u, plan);
                    decode_slice::<F, N>(
                        v_vals,
                        row_v,
                        vb[0],
                        my_shift,
                        vb[1],
                        &mut values,
                        u,
                        plan,
                    );
                } else if u < n {
                    let row = stream0 + (t0 + u - tc) * vpr + first;
                    #[unroll]
                    for v in 0..nv {
                        keys[u * nv + v] = k_rows[row + v];
                        values[u * nv + v] = v_rows[row + v];
                    }
                } else {
                    #[unroll]
                    for v in 0..nv {
                        keys[u * nv + v] = Vector::new(F::new(0.0));
                        values[u * nv + v] = Vector::new(F::new(0.0));
                    }
                }
            }
        } else {
            let row0 = stream0 + t0 * vpr;
            load_slices::<F, N>(k_rows, row0, first, n, &mut keys, tile, nv, vpr);
            load_slices::<F, N>(v_rows, row0, first, n, &mut values, tile, nv, vpr);
        }

        // Step 2: scores.
        partial_scores::<F, N>(&keys, &q_r, &mut part, plan);
        // The butterfly's log2(LANES) = 5 steps, halving the sums each time.
        butterfly_step(
            &mut part,
            &mut exchange,
            16usize,
            comptime!(sums / 2),
            use_plane,
        );
        butterfly_step(
            &mut part,
            &mut exchange,
            8usize,
            comptime!(sums / 4),
            use_plane,
        );
        butterfly_step(
            &mut part,
            &mut exchange,
            4usize,
            comptime!(sums / 8),
            use_plane,
        );
        butterfly_step(
            &mut part,
            &mut exchange,
            2usize,
            comptime!(sums / 16),
            use_plane,
        );
        butterfly_step(
            &mut part,
            &mut exchange,
            1usize,
            comptime!(sums / 32),
            use_plane,
        );

        // Step 3: softmax state of this unit's head.
        let mut m_tile = f32::new(-3.0e38);
        #[unroll]
        for j in 0..held {
            m_tile = max(m_tile, select(my_token + j < n, part[j], f32::new(-3.0e38)));
        }
        m_tile = lanes_reduce(m_tile, &mut exchange, head_lanes, true, use_plane);
        let m_new = max(m_run, m_tile);
        let alpha = Exp::exp(m_run - m_new);
        m_run = m_new;
        let mut p_sum = 0.0f32;
        #[unroll]
        for j in 0..held {
            let p = select(my_token + j < n, Exp::exp(part[j] - m_new), 0.0f32);
            p_sum += p;
            p_s[my_head * tile + my_token + j] = p;
        }
        l_run = l_run * alpha + p_sum;
        if my_token == 0 {
            p_s[sums + my_head] = alpha;
        }
        sync_cube();

        // Step 4: values.
        #[unroll]
        for g in 0..group {
            let a = p_s[sums + g];
            #[unroll]
            for c in 0..slice {
                acc[g * slice + c] *= a;
            }
        }
        // Rows past the tile's end (its last row repeated, or zeros) have probability 0.
        #[unroll]
        for u in 0..tile {
            let mut p = Array::<f32>::new(group);
            #[unroll]
            for g in 0..group {
                p[g] = p_s[g * tile + u];
            }
            #[unroll]
            for v in 0..nv {
                let x = values[u * nv + v];
                #[unroll]
                for e in 0..vec {
                    let xe = f32::cast_from(x[e]);
                    #[unroll]
                    for g in 0..group {
                        acc[g * slice + v * vec + e] += p[g] * xe;
                    }
                }
            }
        }
        // Nobody may write the next tile's probabilities before every unit has read these.
        sync_cube();
        t0 += tile;
    }

    let l_total = lanes_reduce(l_run, &mut exchange, head_lanes, false, use_plane);
    let row0 = b * q_heads as usize + h * group;
    let c0 = lane * slice;
    if comptime!(plan.direct) {
        // Every unit needs every head's sum: through p_s.
        if my_token == 0 {
            p_s[my_head] = l_total;
        }
        sync_cube();
        #[unroll]
        for g in 0..group {
            let l = p_s[g];
            #[unroll]
            for c in 0..slice {
                out[(row0 + g) * d + c0 + c] = F::cast_from(acc[g * slice + c] / l);
            }
        }
    } else {
        #[unroll]
        for g in 0..group {
            #[unroll]
            for c in 0..slice {
                part_o[((row0 + g) * splits + split) * d + c0 + c] = acc[g * slice + c];
            }
        }
        if my_token == 0 {
            let at = ((row0 + my_head) * splits + split) * 2;
            part_ml[at] = m_run;
            part_ml[at + 1] = l_total;
        }
    }
}
