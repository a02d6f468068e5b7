//! Block-sparse causal attention: the CPU reference of sparse prefill.
//!
//! For sequence `s`, query head `h` and query token `i` (packed row
//! `q_offset + i`, absolute position `p = q_start + i`), the query attends
//! the key positions `j <= p` whose key block `j / block_size` is listed in
//! mask row `layout.row(s, h, p / block_size - first_q_block)`. Query heads
//! share KV heads in groups (GQA): head `h` reads KV head
//! `h / (num_q_heads / num_kv_heads)`, without repeating K/V in memory.
//!
//! Per query row, with `score_j = scale * (q · k_j)` over the attended keys:
//! - `out = Σ_j softmax(score)_j · v_j`, rounded to the output's dtype;
//! - `lse = ln Σ_j exp(score_j)` (natural log of the *scaled* scores),
//!   laid out `[num_q_heads, total_q]`, f32.
//!
//! Inputs are read as f32 and everything accumulates in f32. The softmax
//! takes two plain passes (the row maximum, then the sum of exponentials);
//! kernels may use online softmax, but the reference stays the textbook form
//! so that a disagreement points at the kernel.
//!
//! # Rows that select no key block
//!
//! A mask row may be empty (the threshold rule can leave a query block with
//! nothing selected). Its queries attend nothing, so the softmax is
//! undefined; the contract, which every kernel must match, is:
//! **every output element is exactly `0.0` and `lse` is `-inf`, never NaN.**
//! Zero adds nothing to the residual stream the output feeds, and `-inf`
//! gives the row zero weight when partial results (split-KV, chunked
//! prefill) are merged by their log-sum-exp; NaN would poison both.
//! (Upstream's Triton kernel writes NaN there.)
//!
//! [`naive`] holds an independent dense causal attention, used by tests as an
//! oracle only.

use crate::batch::Batch;
use crate::mask::{BlockMaskRef, MaskLayout};
use crate::tensor::{Tensor3, Tensor3Mut};

/// Block-sparse causal attention over a validated batch and mask.
///
/// Arguments are trusted: the public entry
/// [`crate::attention::sparse_prefill`] validates shapes, dtypes and the mask
/// first. `q` is `[total_q, num_q_heads, d]`, `k` and `v` are
/// `[total_k, num_kv_heads, d]`, `out` has `q`'s shape, `lse` (when given)
/// holds `num_q_heads * total_q` values.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sparse_prefill(
    q: &Tensor3,
    k: &Tensor3,
    v: &Tensor3,
    batch: &Batch,
    layout: &MaskLayout,
    mask: BlockMaskRef<'_>,
    scale: f32,
    out: &mut Tensor3Mut<'_>,
    mut lse: Option<&mut [f32]>,
) {
    let [total_q, num_q_heads, head_dim] = q.shape();
    let num_kv_heads = k.shape()[1];
    let block = layout.block_size;
    debug_assert!(num_kv_heads > 0 && num_q_heads % num_kv_heads == 0);
    debug_assert_eq!(k.shape(), [batch.total_k(), num_kv_heads, head_dim]);
    debug_assert_eq!(v.shape(), k.shape());
    debug_assert_eq!(out.shape(), q.shape());
    debug_assert_eq!(total_q, batch.total_q());
    debug_assert_eq!(layout.num_heads, num_q_heads);
    debug_assert!(lse.as_ref().map_or(true, |l| l.len() == num_q_heads * total_q));
    let group = num_q_heads / num_kv_heads;

    for s in 0..batch.len() {
        let seq = batch.seq(s, block);
        for kv_head in 0..num_kv_heads {
            // Every query of the head group reads these keys and values, so
            // they are converted to f32 once per sequence and KV head.
            let keys = rows_f32(k, seq.k_offset, seq.k_len, kv_head);
            let values = rows_f32(v, seq.k_offset, seq.k_len, kv_head);
            for h in kv_head * group..(kv_head + 1) * group {
                for i in 0..seq.q_len {
                    let t = seq.q_offset + i;
                    let p = seq.q_start + i;
                    let row = mask.row(layout.row(s, h, p / block - seq.first_q_block));
                    let attended = attended_keys(row, p, block);
                    let query: Vec<f32> = (0..head_dim).map(|x| q.get(t, h, x)).collect();
                    let row_lse = attend(&query, &keys, &values, &attended, scale, |x, value| out.set(t, h, x, value));
                    if let Some(lse) = lse.as_deref_mut() {
                        lse[h * total_q + t] = row_lse;
                    }
                }
            }
        }
    }
}

/// One query of [`sparse_prefill`]: the output of packed query row `t`,
/// head `h` (f32, before any rounding to an output dtype) and its lse.
/// The same arithmetic in the same order as `sparse_prefill` (the attended
/// keys ascending, the same two-pass softmax), so the two agree bit for bit;
/// but only the keys this query attends are read, so that spot checks of
/// very long sequences (the GPU scale tests) need not compute every row.
/// Arguments as for [`sparse_prefill`] (trusted); `t < total_q`, `h < num_q_heads`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn query_row(
    q: &Tensor3,
    k: &Tensor3,
    v: &Tensor3,
    batch: &Batch,
    layout: &MaskLayout,
    mask: BlockMaskRef<'_>,
    scale: f32,
    t: usize,
    h: usize,
) -> (Vec<f32>, f32) {
    let [_, num_q_heads, head_dim] = q.shape();
    let kv_head = h / (num_q_heads / k.shape()[1]);
    let block = layout.block_size;
    // Every sequence has queries, so the last one starting at or before `t` owns it.
    let s = (0..batch.len()).rev().find(|&s| batch.seq(s, block).q_offset <= t).expect("t < total_q");
    let seq = batch.seq(s, block);
    let p = seq.q_start + (t - seq.q_offset);
    let row = mask.row(layout.row(s, h, p / block - seq.first_q_block));
    let attended = attended_keys(row, p, block);
    // The attended rows only, renumbered 0..n: `attend` sees the same values in the same order.
    let gather = |x: &Tensor3| -> Vec<f32> {
        attended.iter().flat_map(|&j| (0..head_dim).map(move |d| x.get(seq.k_offset + j, kv_head, d))).collect()
    };
    let (keys, values) = (gather(k), gather(v));
    let query: Vec<f32> = (0..head_dim).map(|d| q.get(t, h, d)).collect();
    let renumbered: Vec<usize> = (0..attended.len()).collect();
    let mut out = vec![0f32; head_dim];
    let lse = attend(&query, &keys, &values, &renumbered, scale, |d, value| out[d] = value);
    (out, lse)
}

/// Rows `first..first + len` of `head` of `t`, as one `[len * dim]` f32 buffer.
fn rows_f32(t: &Tensor3, first: usize, len: usize, head: usize) -> Vec<f32> {
    let dim = t.shape()[2];
    (first..first + len).flat_map(|row| (0..dim).map(move |x| t.get(row, head, x))).collect()
}

/// Key positions (relative to the sequence) that the query at position `p`
/// attends: those of the selected blocks, cut at `p` by causality (only the
/// diagonal block is cut, since selected blocks never lie above it).
fn attended_keys(selected_blocks: &[i32], p: usize, block: usize) -> Vec<usize> {
    selected_blocks
        .iter()
        .flat_map(|&b| {
            let lo = b as usize * block;
            let hi = (lo + block).min(p + 1);
            lo..hi
        })
        .collect()
}

/// Softmax-weighted sum of the `attended` rows of `values`, passed element by
/// element to `write`; returns the log-sum-exp of the scaled scores. With
/// nothing attended it writes zeros and returns `-inf` (the empty-row
/// contract of the module doc).
fn attend(
    query: &[f32],
    keys: &[f32],
    values: &[f32],
    attended: &[usize],
    scale: f32,
    mut write: impl FnMut(usize, f32),
) -> f32 {
    let dim = query.len();
    if attended.is_empty() {
        (0..dim).for_each(|x| write(x, 0.0));
        return f32::NEG_INFINITY;
    }
    let scores: Vec<f32> = attended
        .iter()
        .map(|&j| scale * query.iter().zip(&keys[j * dim..(j + 1) * dim]).map(|(a, b)| a * b).sum::<f32>())
        .collect();
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // Subtracting the maximum keeps every exponent <= 0, so nothing overflows.
    let weights: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
    let sum: f32 = weights.iter().sum();
    for x in 0..dim {
        let acc: f32 = attended.iter().zip(&weights).map(|(&j, w)| w * values[j * dim + x]).sum();
        write(x, acc / sum);
    }
    max + sum.ln()
}

/// A dense causal attention written independently of the sparse path (no
/// mask, own loops, f64 throughout), used as a test oracle only.
#[doc(hidden)]
pub mod naive {
    use crate::batch::Batch;
    use crate::tensor::Tensor3;

    /// Result of [`dense_causal_attention`].
    pub struct DenseAttention {
        /// `[total_q, num_q_heads, head_dim]`, contiguous.
        pub out: Vec<f64>,
        /// `[num_q_heads, total_q]`: natural log-sum-exp of the scaled scores.
        pub lse: Vec<f64>,
    }

    /// Causal attention of every query over all keys at positions `<= p`
    /// (queries are the last `q_len` of `k_len` positions), GQA by head
    /// groups, with `score = scale * q · k` in f64.
    pub fn dense_causal_attention(q: &Tensor3, k: &Tensor3, v: &Tensor3, batch: &Batch, scale: f64) -> DenseAttention {
        let [total_q, hq, d] = q.shape();
        let hkv = k.shape()[1];
        let (q, k, v) = (to_f64(q), to_f64(k), to_f64(v));
        let mut out = vec![0.0f64; total_q * hq * d];
        let mut lse = vec![0.0f64; hq * total_q];
        for s in 0..batch.len() {
            // The block size does not matter here: only offsets and lengths are used.
            let seq = batch.seq(s, 1);
            for h in 0..hq {
                let kvh = h * hkv / hq;
                for i in 0..seq.q_len {
                    let qrow = seq.q_offset + i;
                    let last_key = seq.k_len - seq.q_len + i;
                    let mut scores = Vec::with_capacity(last_key + 1);
                    for j in 0..=last_key {
                        let mut dot = 0.0f64;
                        for x in 0..d {
                            dot += q[(qrow * hq + h) * d + x] * k[((seq.k_offset + j) * hkv + kvh) * d + x];
                        }
                        scores.push(scale * dot);
                    }
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let exps: Vec<f64> = scores.iter().map(|sc| (sc - max).exp()).collect();
                    let denom: f64 = exps.iter().sum();
                    for x in 0..d {
                        let mut acc = 0.0f64;
                        for (j, e) in exps.iter().enumerate() {
                            acc += e / denom * v[((seq.k_offset + j) * hkv + kvh) * d + x];
                        }
                        out[(qrow * hq + h) * d + x] = acc;
                    }
                    lse[h * total_q + qrow] = max + denom.ln();
                }
            }
        }
        DenseAttention { out, lse }
    }

    /// Every element of `t`, row-major `[tokens, heads, dim]`, as f64.
    fn to_f64(t: &Tensor3) -> Vec<f64> {
        let [tokens, heads, dim] = t.shape();
        let mut all = Vec::with_capacity(tokens * heads * dim);
        for row in 0..tokens {
            for h in 0..heads {
                for x in 0..dim {
                    all.push(t.get(row, h, x) as f64);
                }
            }
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::BlockMask;
    use crate::tensor::{DType, Layout3};

    /// f32 bytes of `values`, for contiguous `[tokens, heads, dim]` tensors.
    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// Run the reference on small f32 tensors (the reference itself accepts
    /// any dtype and block size; the public entry restricts both).
    #[allow(clippy::too_many_arguments)]
    fn run(
        lens: &[(usize, usize)],
        block: usize,
        [hq, hkv, d]: [usize; 3],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        rows: &[(usize, &[i32])],
        scale: f32,
    ) -> (Vec<f32>, Vec<f32>) {
        let batch = Batch::from_lens(lens).unwrap();
        let (tq, tk) = (batch.total_q(), batch.total_k());
        let (qb, kb, vb) = (f32_bytes(q), f32_bytes(k), f32_bytes(v));
        let q = Tensor3::new("q", &qb, DType::F32, Layout3::contiguous(tq, hq, d)).unwrap();
        let k = Tensor3::new("k", &kb, DType::F32, Layout3::contiguous(tk, hkv, d)).unwrap();
        let v = Tensor3::new("v", &vb, DType::F32, Layout3::contiguous(tk, hkv, d)).unwrap();
        let layout = MaskLayout::new(&batch, hq, block).unwrap();
        let mut mask = BlockMask::empty(&layout);
        for &(r, blocks) in rows {
            mask.set_row(r, blocks);
        }
        mask.as_ref().validate(&layout).unwrap();
        // NaN-filled, so that an element the reference fails to write shows up.
        let mut out_bytes = f32_bytes(&vec![f32::NAN; tq * hq * d]);
        let mut out = Tensor3Mut::new("out", &mut out_bytes, DType::F32, Layout3::contiguous(tq, hq, d)).unwrap();
        let mut lse = vec![f32::NAN; hq * tq];
        sparse_prefill(&q, &k, &v, &batch, &layout, mask.as_ref(), scale, &mut out, Some(&mut lse));
        let out = out_bytes.chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        (out, lse)
    }

    #[test]
    fn single_key_copies_its_value() {
        let (out, lse) = run(&[(1, 1)], 2, [1, 1, 2], &[1.0, 2.0], &[3.0, -1.0], &[5.0, -7.0], &[(0, &[0])], 0.5);
        assert_eq!(out, vec![5.0, -7.0]);
        assert_eq!(lse, vec![0.5 * (3.0 - 2.0)]);
    }

    #[test]
    fn equal_scores_average_values_and_causality_cuts_the_diagonal() {
        // Block size 4, one sequence of 3 tokens, every key identical, so
        // query i averages values 0..=i.
        let k = [1.0, 1.0, 1.0];
        let v = [2.0, 4.0, 9.0];
        let (out, lse) = run(&[(3, 3)], 4, [1, 1, 1], &[1.0, 1.0, 1.0], &k, &v, &[(0, &[0])], 1.0);
        assert_eq!(out, vec![2.0, 3.0, 5.0]);
        for (i, l) in lse.iter().enumerate() {
            assert!((l - (1.0 + ((i + 1) as f32).ln())).abs() < 1e-6);
        }
    }

    #[test]
    fn gqa_groups_read_their_own_kv_head() {
        // 4 query heads over 2 KV heads: heads 0, 1 read KV head 0; heads 2, 3 read KV head 1.
        let q = [0.0; 4];
        let k = [0.0, 0.0];
        let v = [10.0, 20.0];
        let rows: Vec<(usize, &[i32])> = (0..4).map(|r| (r, &[0][..])).collect();
        let (out, _) = run(&[(1, 1)], 2, [4, 2, 1], &q, &k, &v, &rows, 1.0);
        assert_eq!(out, vec![10.0, 10.0, 20.0, 20.0]);
    }

    #[test]
    fn chunk_queries_sit_at_the_end_and_read_their_blocks_row() {
        // k_len 5, q_len 2, block 2: queries at positions 3 (block 1, row 0)
        // and 4 (block 2, row 1). Row 0 selects block 0 only, so position 3
        // sees keys 0, 1; row 1 selects block 1 only, so position 4 sees 2, 3.
        let k = [0.0; 5];
        let v = [1.0, 3.0, 10.0, 20.0, 1000.0];
        let (out, _) = run(&[(2, 5)], 2, [1, 1, 1], &[0.0, 0.0], &k, &v, &[(0, &[0]), (1, &[1])], 1.0);
        assert_eq!(out, vec![2.0, 15.0]);
    }

    #[test]
    fn empty_rows_write_zeros_and_negative_infinite_lse() {
        // Two sequences; only the second's first row selects anything.
        let (out, lse) = run(&[(3, 3), (2, 2)], 2, [1, 1, 2], &[1.0; 10], &[1.0; 10], &[4.0; 10], &[(2, &[0])], 1.0);
        assert_eq!(&out[..6], &[0.0; 6]);
        assert_eq!(&out[6..], &[4.0; 4]);
        assert_eq!(&lse[..3], &[f32::NEG_INFINITY; 3]);
        assert!(lse[3..].iter().all(|l| l.is_finite()));
    }

    #[test]
    fn query_row_is_the_full_references_row_bit_for_bit() {
        // GQA, a chunk, an empty row, partial blocks: every (row, head) of
        // query_row equals what sparse_prefill wrote to an f32 output.
        let lens = [(7, 7), (5, 11), (9, 9)];
        let (block, hq, hkv, d) = (4, 4, 2, 3);
        let batch = Batch::from_lens(&lens).unwrap();
        let (tq, tk) = (batch.total_q(), batch.total_k());
        let value = |i: usize, salt: usize| ((i * 37 + salt * 11) % 23) as f32 / 7.0 - 1.5;
        let (q, k, v): (Vec<f32>, Vec<f32>, Vec<f32>) = (
            (0..tq * hq * d).map(|i| value(i, 1)).collect(),
            (0..tk * hkv * d).map(|i| value(i, 2)).collect(),
            (0..tk * hkv * d).map(|i| value(i, 3)).collect(),
        );
        let layout = MaskLayout::new(&batch, hq, block).unwrap();
        let rows: Vec<(usize, Vec<i32>)> = (0..layout.rows())
            .map(|r| {
                let id = layout.row_id(r);
                // Row 5 empty; the others every other causal block, diagonal included.
                let blocks = (0..=id.q_block as i32).filter(|&j| r != 5 && (j % 2 == 0 || j == id.q_block as i32));
                (r, blocks.collect())
            })
            .collect();
        let rows_ref: Vec<(usize, &[i32])> = rows.iter().map(|(r, b)| (*r, &b[..])).collect();
        let (out, lse) = run(&lens, block, [hq, hkv, d], &q, &k, &v, &rows_ref, 0.7);

        let (qb, kb, vb) = (f32_bytes(&q), f32_bytes(&k), f32_bytes(&v));
        let q = Tensor3::new("q", &qb, DType::F32, Layout3::contiguous(tq, hq, d)).unwrap();
        let k = Tensor3::new("k", &kb, DType::F32, Layout3::contiguous(tk, hkv, d)).unwrap();
        let v = Tensor3::new("v", &vb, DType::F32, Layout3::contiguous(tk, hkv, d)).unwrap();
        let mut mask = BlockMask::empty(&layout);
        for (r, blocks) in &rows {
            mask.set_row(*r, blocks);
        }
        for t in 0..tq {
            for h in 0..hq {
                let (o, l) = query_row(&q, &k, &v, &batch, &layout, mask.as_ref(), 0.7, t, h);
                let want = &out[(t * hq + h) * d..(t * hq + h + 1) * d];
                assert!(
                    o.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "row {t} head {h}: {o:?} vs {want:?}"
                );
                assert_eq!(l.to_bits(), lse[h * tq + t].to_bits(), "row {t} head {h}: lse");
            }
        }
    }

    #[test]
    fn naive_oracle_matches_a_hand_computed_row() {
        let q = [1.0f32, 0.0];
        let k = [1.0f32, 0.0, 0.0, 1.0];
        let v = [1.0f32, 0.0, 0.0, 1.0];
        let (qb, kb, vb) = (f32_bytes(&q), f32_bytes(&k), f32_bytes(&v));
        let batch = Batch::from_lens(&[(1, 2)]).unwrap();
        let q = Tensor3::new("q", &qb, DType::F32, Layout3::contiguous(1, 1, 2)).unwrap();
        let k = Tensor3::new("k", &kb, DType::F32, Layout3::contiguous(2, 1, 2)).unwrap();
        let v = Tensor3::new("v", &vb, DType::F32, Layout3::contiguous(2, 1, 2)).unwrap();
        let r = naive::dense_causal_attention(&q, &k, &v, &batch, 1.0);
        // Scores 1 and 0: weights e/(e+1) and 1/(e+1).
        let e = std::f64::consts::E;
        assert!((r.out[0] - e / (e + 1.0)).abs() < 1e-12);
        assert!((r.out[1] - 1.0 / (e + 1.0)).abs() < 1e-12);
        assert!((r.lse[0] - (e + 1.0).ln()).abs() < 1e-12);
    }
}
