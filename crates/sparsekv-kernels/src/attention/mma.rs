//! The tensor-core variant of the sparse split kernel (CUDA, f16).
//!
//! Same split-K structure and softmax as the CUDA-core kernel in the parent module, but both
//! products run on the matrix units: each compressed row is expanded once into a dense f16
//! tile in shared memory (one unit per row walks its set bits and scatters its kept values
//! into a zeroed row), then one plane per 16 tokens computes `Q . K^T` and one plane per slice
//! of channels computes `P . V` with 16x16x16 `cmma` operations. The query heads of the group
//! are the rows of a 16-row operand (rows past the group are zero), so decoding a row costs
//! about one walk over its kept values instead of a multiply per channel and head.
//!
//! Tile steps: stage the compressed words (as the parent's `stage_rows`/`stage_values`),
//! zero the dense tiles, expand (keys by the first half of the cube, values by the second,
//! window rows copied), scores by `cmma`, softmax state (`cube_reduce`), `P . V` by `cmma`
//! into a tile output, then each unit rescales its share of the running output and adds the
//! tile's.

use cubecl::prelude::*;

use super::{SplitPlan, row_word, stage_compressed};
use crate::reduce::cube_reduce;

/// Rows, columns and depth of one matrix operation.
pub(super) const MMA: usize = 16;
/// Tokens per tile: one plane of 32 units handles 16 tokens' scores, and the cube's
/// `2 * MMA_TILE` units expand the tile's key and value rows in one pass.
pub(super) const MMA_TILE: usize = 64;
/// Units per cube.
pub(super) const MMA_UNITS: usize = 2 * MMA_TILE;
/// Padding of a dense row in shared memory, in elements: keeps every row 32-byte aligned for
/// the matrix loads and shifts consecutive rows across banks.
pub(super) const ROW_PAD: usize = 16;

/// Shared memory the tensor-core split cube uses, in bytes (mirrors the kernel).
pub(super) fn mma_shared_bytes(plan: &SplitPlan) -> usize {
    let (d, g, t) = (plan.head_dim, plan.group, MMA_TILE);
    let row = d + ROW_PAD;
    let e = plan.elem;
    e * (MMA * d + 2 * t * row + MMA * t)
        + 4 * (MMA * t + MMA * d + g * MMA_UNITS)
        + 4 * 2 * (t * d).div_ceil(32)
        + e * (t * (plan.k_row + plan.v_row) + 4)
}

/// Expands tile row `r` (a compressed token) into the zeroed dense row `dense[r * row ..]`:
/// walks the row's set bits in `bits` and writes its kept values from `vals` (rows `stride`
/// apart) at their channels.
#[cube]
fn expand_row<F: Float>(
    r: usize,
    bits: &SharedMemory<u32>,
    vals: &SharedMemory<F>,
    dense: &mut SharedMemory<F>,
    #[comptime] head_dim: usize,
    #[comptime] stride: usize,
    #[comptime] row: usize,
) {
    let words = comptime!(if head_dim >= 32 { head_dim / 32 } else { 1 });
    let dst = r * row;
    let mut slot = r * stride;
    // One loop per bitmap word, as many trips as the word has set bits: the cheapest walk
    // (a single loop over the row's `keep` values must find the next non-empty word on every
    // trip, which costs more than the divergence between the units' words).
    #[unroll]
    for wi in 0..words {
        let mut word = row_word(bits, r, wi, head_dim);
        while word != 0u32 {
            let j = wi * 32 + word.trailing_zeros() as usize;
            word &= word - 1u32;
            dense[dst + j] = vals[slot];
            slot += 1;
        }
    }
}

/// A 16x16 f32 accumulator of zeros.
#[cube]
fn zero_accumulator() -> cmma::Matrix<f32> {
    cmma::Matrix::<f32>::from_value(
        cmma::MatrixIdent::Accumulator,
        MMA,
        MMA,
        MMA,
        cmma::MatrixLayout::Undefined,
        0.0,
    )
}

/// A 16x16 operand (`ident` A or B) of `F` loaded from shared memory at `at`, rows (or columns,
/// for `ColMajor`) `stride` elements apart.
#[cube]
fn load_operand<F: Float>(
    src: &SharedMemory<F>,
    at: usize,
    stride: usize,
    #[comptime] ident: cmma::MatrixIdent,
    layout: cmma::MatrixLayout,
) -> cmma::Matrix<F> {
    cmma::Matrix::<F>::from_slice(
        ident,
        MMA,
        MMA,
        MMA,
        layout,
        &src.slice(at, at + (MMA - 1) * stride + MMA),
        stride as u32,
    )
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(super) fn decode_split_mma_kernel<F: Float, N: Size>(
    q: &Array<F>,
    k_bits: &Array<u32>,
    k_vals: &Array<u32>,
    v_bits: &Array<u32>,
    v_vals: &Array<u32>,
    k_win: &Array<Vector<F, N>>,
    v_win: &Array<Vector<F, N>>,
    lens: &Array<u32>,
    part_o: &mut Array<f32>,
    part_ml: &mut Array<f32>,
    bits_stride: u32,
    k_vals_stride: u32,
    v_vals_stride: u32,
    win_stride: u32,
    split_tokens: u32,
    q_heads: u32,
    scale: f32,
    #[comptime] plan: SplitPlan,
) {
    let (d, group, vec) = comptime!((plan.head_dim, plan.group, plan.vec));
    let (tile, units) = comptime!((MMA_TILE, MMA_UNITS));
    let row = comptime!(plan.head_dim + ROW_PAD);
    let vpr = comptime!(plan.head_dim / plan.vec);
    let (kr, vr) = comptime!((plan.k_row, plan.v_row));
    // Output elements each unit accumulates: (head, channel) pairs `tid + i * units`.
    let outs = comptime!((plan.group * plan.head_dim).div_ceil(MMA_UNITS));

    // The group's queries as a 16-row operand (rows past the group are zero), unscaled.
    let mut q_s = SharedMemory::<F>::new_aligned(MMA * d, 32usize);
    let mut kd_s = SharedMemory::<F>::new_aligned(tile * row, 32usize);
    let mut vd_s = SharedMemory::<F>::new_aligned(tile * row, 32usize);
    // Scores and probabilities: [16 rows (heads)][tile tokens].
    let mut s_s = SharedMemory::<f32>::new_aligned(MMA * tile, 32usize);
    let mut p_s = SharedMemory::<F>::new_aligned(MMA * tile, 32usize);
    // The tile's output P . V: [16 rows][head_dim].
    let mut o_s = SharedMemory::<f32>::new_aligned(MMA * d, 32usize);
    let mut red_s = SharedMemory::<f32>::new(group * units);
    let bits_cap = comptime!((MMA_TILE * plan.head_dim).div_ceil(32));
    let mut kb_s = SharedMemory::<u32>::new(bits_cap);
    let mut vb_s = SharedMemory::<u32>::new(bits_cap);
    let mut kv_s = SharedMemory::<F>::new(comptime!(MMA_TILE * plan.k_row + 2));
    let mut vv_s = SharedMemory::<F>::new(comptime!(MMA_TILE * plan.v_row + 2));

    let b = CUBE_POS_Z as usize;
    let h = CUBE_POS_Y as usize;
    let split = CUBE_POS_X as usize;
    let kv_heads = CUBE_COUNT_Y as usize;
    let splits = CUBE_COUNT_X as usize;
    let stream = b * kv_heads + h;
    let tid = UNIT_POS as usize;
    let plane = PLANE_POS as usize;
    // lens: the compressed lengths of the batch, then the window lengths.
    let tc = lens[b] as usize;
    let total = tc + lens[CUBE_COUNT_Z as usize + b] as usize;
    let s0 = split * split_tokens as usize;
    let s1 = min(s0 + split_tokens as usize, total);
    let win0 = stream * win_stride as usize / vec;
    let row0 = b * q_heads as usize + h * group;

    let mut i = tid;
    while i < MMA * d {
        let g = i / d;
        q_s[i] = if g < group {
            q[(row0 + g) * d + i % d]
        } else {
            F::new(0.0)
        };
        i += units;
    }
    let mut i = tid;
    while i < MMA * tile {
        p_s[i] = F::new(0.0);
        i += units;
    }
    let zero = cmma::Matrix::<F>::from_value(
        cmma::MatrixIdent::Accumulator,
        MMA,
        MMA,
        MMA,
        cmma::MatrixLayout::Undefined,
        F::new(0.0),
    );

    let mut m_run = Array::<f32>::new(group);
    let mut l_run = Array::<f32>::new(group);
    let mut acc = Array::<f32>::new(outs);
    #[unroll]
    for g in 0..group {
        m_run[g] = f32::new(-3.0e38);
        l_run[g] = 0.0;
    }
    #[unroll]
    for o in 0..outs {
        acc[o] = 0.0;
    }
    sync_cube();

    let mut t0 = s0;
    while t0 < s1 {
        let n = min(tile, s1 - t0);
        let mut nc = 0usize;
        // Step 1: stage the compressed words and zero the dense tiles (16 rows per store).
        if t0 < tc {
            nc = min(t0 + n, tc) - t0;
            stage_compressed::<F>(
                k_bits,
                v_bits,
                k_vals,
                v_vals,
                &mut kb_s,
                &mut vb_s,
                &mut kv_s,
                &mut vv_s,
                stream,
                t0,
                nc,
                bits_stride,
                k_vals_stride,
                v_vals_stride,
                plan,
                units,
            );
        }
        // The padding columns are never read: zero the 16x16 blocks of the head_dim columns,
        // one plane per column block (no division in the index arithmetic).
        let mut cb = plane;
        while cb < d / MMA {
            #[unroll]
            for rb in 0..MMA_TILE / MMA {
                let at = rb * MMA * row + cb * MMA;
                let end = at + (MMA - 1) * row + MMA;
                let mut kdst = kd_s.slice_mut(at, end);
                cmma::store(&mut kdst, &zero, row as u32, cmma::MatrixLayout::RowMajor);
                let mut vdst = vd_s.slice_mut(at, end);
                cmma::store(&mut vdst, &zero, row as u32, cmma::MatrixLayout::RowMajor);
            }
            cb += comptime!(MMA_UNITS / 32);
        }
        sync_cube();

        // Step 2: expand compressed rows, copy window rows (keys: first half, values: second).
        let r = tid % tile;
        let is_value = tid >= tile;
        if r < nc {
            if is_value {
                expand_row::<F>(r, &vb_s, &vv_s, &mut vd_s, d, vr, row);
            } else {
                expand_row::<F>(r, &kb_s, &kv_s, &mut kd_s, d, kr, row);
            }
        } else if r < n {
            let src = win0 + (t0 + r - tc) * vpr;
            for v in 0..vpr {
                if is_value {
                    let x = v_win[src + v];
                    #[unroll]
                    for e in 0..vec {
                        vd_s[r * row + v * vec + e] = x[e];
                    }
                } else {
                    let x = k_win[src + v];
                    #[unroll]
                    for e in 0..vec {
                        kd_s[r * row + v * vec + e] = x[e];
                    }
                }
            }
        }
        sync_cube();

        // Step 3: scores of 16 tokens per plane, S = Q . K^T.
        if plane < tile / MMA {
            let scores = zero_accumulator();
            #[unroll]
            for kb in 0..d / MMA {
                let (a, b) = (cmma::MatrixIdent::A, cmma::MatrixIdent::B);
                let qa = load_operand(&q_s, kb * MMA, d, a, cmma::MatrixLayout::RowMajor);
                let at = plane * MMA * row + kb * MMA;
                let kt = load_operand(&kd_s, at, row, b, cmma::MatrixLayout::ColMajor);
                cmma::execute::<F, F, f32, f32>(&qa, &kt, &scores, &scores);
            }
            let at = plane * MMA;
            let mut dst = s_s.slice_mut(at, at + (MMA - 1) * tile + MMA);
            cmma::store(&mut dst, &scores, tile as u32, cmma::MatrixLayout::RowMajor);
        }
        sync_cube();

        // Step 4: softmax state; probabilities of the group's rows into p_s.
        let mut sc = Array::<f32>::new(group);
        #[unroll]
        for g in 0..group {
            sc[g] = f32::new(-3.0e38);
            if tid < n {
                sc[g] = s_s[g * tile + tid] * scale;
            }
        }
        let m_tile = cube_reduce(
            &sc,
            &mut red_s,
            group,
            units,
            true,
            comptime!(plan.use_plane),
        );
        let mut alpha = Array::<f32>::new(group);
        #[unroll]
        for g in 0..group {
            let m_new = max(m_run[g], m_tile[g]);
            alpha[g] = Exp::exp(m_run[g] - m_new);
            m_run[g] = m_new;
            let p = Exp::exp(sc[g] - m_new);
            l_run[g] = l_run[g] * alpha[g] + p;
            if tid < tile {
                p_s[g * tile + tid] = F::cast_from(p);
            }
        }
        sync_cube();

        // Step 5: the tile's output O = P . V, 16 channels per matrix, planes over channels.
        let mut nb = plane;
        while nb < d / MMA {
            let out = zero_accumulator();
            #[unroll]
            for kb in 0..tile / MMA {
                let (a, b) = (cmma::MatrixIdent::A, cmma::MatrixIdent::B);
                let pa = load_operand(&p_s, kb * MMA, tile, a, cmma::MatrixLayout::RowMajor);
                let at = kb * MMA * row + nb * MMA;
                let vb = load_operand(&vd_s, at, row, b, cmma::MatrixLayout::RowMajor);
                cmma::execute::<F, F, f32, f32>(&pa, &vb, &out, &out);
            }
            let at = nb * MMA;
            let mut dst = o_s.slice_mut(at, at + (MMA - 1) * d + MMA);
            cmma::store(&mut dst, &out, d as u32, cmma::MatrixLayout::RowMajor);
            nb += comptime!(MMA_UNITS / 32);
        }
        sync_cube();

        // Step 6: rescale this unit's outputs and add the tile's.
        #[unroll]
        for o in 0..outs {
            let at = tid + o * units;
            if at < group * d {
                acc[o] = acc[o] * alpha[at / d] + o_s[at];
            }
        }
        t0 += tile;
    }

    let l_total = cube_reduce(
        &l_run,
        &mut red_s,
        group,
        units,
        false,
        comptime!(plan.use_plane),
    );
    #[unroll]
    for o in 0..outs {
        let at = tid + o * units;
        if at < group * d {
            let (g, c) = (at / d, at % d);
            part_o[((row0 + g) * splits + split) * d + c] = acc[o];
        }
    }
    if tid == 0 {
        #[unroll]
        for g in 0..group {
            let at = ((row0 + g) * splits + split) * 2;
            part_ml[at] = m_run[g];
            part_ml[at + 1] = l_total[g];
        }
    }
}
