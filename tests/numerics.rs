//! Numerical edge cases of the CPU reference, through its Rust API (the C
//! API's side is tests/ffi_cpu.rs): the selection rule at threshold 0 and
//! 1, top-k past the row, NaN scores; attention of tiny and huge scores
//! against an f64 oracle, one-token sequences, all-empty masks.

use seerattn::attention::{sparse_prefill, AttentionParams};
use seerattn::reference::select::select_row;
use seerattn::{
    Batch, BlockMask, DType, EmptyRowPolicy, Layout3, MaskLayout, MaskParams, SparsityMethod, Tensor3, Tensor3Mut,
    ThresholdCompare,
};

mod common;

fn rule(method: SparsityMethod, threshold: f32, nz_ratio: f32, empty_rows: EmptyRowPolicy) -> MaskParams {
    MaskParams {
        method,
        threshold,
        nz_ratio,
        last_block_dense: false,
        empty_rows,
        threshold_compare: ThresholdCompare::F32,
    }
}

#[test]
fn selection_at_the_edges() {
    let keep = EmptyRowPolicy::KeepDiagonal;
    let mut out = Vec::new();
    // Threshold 0: every block with a probability above 0; one that underflowed to 0 is dropped.
    let probs = [0.5, 0.0, 0.25, 0.25];
    select_row(&rule(SparsityMethod::Threshold, 0.0, 1.0, keep), &[0.0; 4], &probs, 3, 8, &mut out);
    assert_eq!(out, [0, 2, 3]);
    // Threshold 1: nothing passes; the diagonal by default, nothing upstream-style.
    select_row(&rule(SparsityMethod::Threshold, 1.0, 1.0, keep), &[0.0; 4], &[1.0, 0.0, 0.0, 0.0], 3, 8, &mut out);
    assert_eq!(out, [3]);
    let empty = EmptyRowPolicy::Empty;
    select_row(&rule(SparsityMethod::Threshold, 1.0, 1.0, empty), &[0.0; 4], &[1.0, 0.0, 0.0, 0.0], 3, 8, &mut out);
    assert!(out.is_empty());
    // Top-k with k past the row keeps the whole causal row.
    let all = rule(SparsityMethod::NzRatio, 0.0, 1.0, keep);
    assert_eq!(all.top_k(8), 8);
    select_row(&all, &[3.0, -1.0, 2.0, 0.5], &[0.0; 4], 3, 8, &mut out);
    assert_eq!(out, [0, 1, 2, 3]);
    // NaN scores: a valid selection either way (threshold drops NaN, top-k orders it).
    let nan = [f32::NAN; 4];
    select_row(&rule(SparsityMethod::Threshold, 0.0, 1.0, keep), &nan, &nan, 3, 8, &mut out);
    assert_eq!(out, [3]);
    select_row(&rule(SparsityMethod::NzRatio, 0.0, 0.5, keep), &nan, &nan, 3, 8, &mut out);
    assert_eq!(out.len(), 2);
    assert!(out.windows(2).all(|w| w[0] < w[1]) && out.iter().all(|&j| (0..=3).contains(&j)));
}

/// One sequence, one head, a full causal mask; inputs uniform in
/// [-scale, scale) rounded to bf16. Returns the reference's output and LSE
/// and an f64 oracle's.
#[allow(clippy::type_complexity)]
fn attention(len: usize, d: usize, scale: f32, seed: u64) -> ((Vec<f32>, Vec<f32>), (Vec<f64>, Vec<f64>), Vec<f32>) {
    let mut rng = common::Rng(seed);
    let mut gen =
        |n: usize| -> Vec<f32> { (0..n).map(|_| half::bf16::from_f32(rng.uniform(-scale, scale)).to_f32()).collect() };
    let (q, k, v) = (gen(len * d), gen(len * d), gen(len * d));
    let bytes = |x: &[f32]| -> Vec<u8> { x.iter().flat_map(|&y| half::bf16::from_f32(y).to_le_bytes()).collect() };
    let (qb, kb, vb) = (bytes(&q), bytes(&k), bytes(&v));
    let layout3 = Layout3::contiguous(len, 1, d);
    let view = |b| Tensor3::new("x", b, DType::BF16, layout3).unwrap();
    let batch = Batch::single(len).unwrap();
    let layout = MaskLayout::new(&batch, 1, 64).unwrap();
    let mut mask = BlockMask::empty(&layout);
    for r in 0..layout.rows() {
        let q_block = layout.row_id(r).q_block as i32;
        mask.set_row(r, &(0..=q_block).collect::<Vec<_>>());
    }
    let mut out = vec![0u8; len * d * 4];
    let mut lse = vec![0f32; len];
    {
        let mut o = Tensor3Mut::new("out", &mut out, DType::F32, layout3).unwrap();
        let p = AttentionParams::for_head_dim(d);
        sparse_prefill(&view(&qb), &view(&kb), &view(&vb), &batch, mask.as_ref(), &p, &mut o, Some(&mut lse)).unwrap();
    }
    let out: Vec<f32> = out.chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let s = 1.0 / (d as f64).sqrt();
    let (mut want, mut want_lse) = (vec![0f64; len * d], vec![0f64; len]);
    for i in 0..len {
        let scores: Vec<f64> =
            (0..=i).map(|j| s * (0..d).map(|x| q[i * d + x] as f64 * k[j * d + x] as f64).sum::<f64>()).collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = scores.iter().map(|&x| (x - max).exp()).sum();
        want_lse[i] = max + sum.ln();
        for x in 0..d {
            want[i * d + x] =
                scores.iter().enumerate().map(|(j, &sc)| (sc - max).exp() / sum * v[j * d + x] as f64).sum();
        }
    }
    ((out, lse), (want, want_lse), v)
}

#[test]
fn tiny_and_huge_scores_match_an_f64_oracle() {
    for scale in [1e-4f32, 1e-2, 1.0, 1e2, 1e4, 1e15] {
        let ((out, lse), (want, want_lse), v) = attention(130, 64, scale, 3);
        let vmax = v.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
        for (i, (&g, &w)) in out.iter().zip(&want).enumerate() {
            assert!(g.is_finite(), "scale {scale}: out[{i}] = {g}");
            // f32 accumulation: a few ulps of the largest |v| per term, and the
            // scores' f32 rounding moves the softmax where scores are large.
            assert!((g as f64 - w).abs() <= 2e-3 * vmax, "scale {scale}: out[{i}] = {g}, oracle {w}");
        }
        for (i, (&g, &w)) in lse.iter().zip(&want_lse).enumerate() {
            assert!(g.is_finite(), "scale {scale}: lse[{i}] = {g}");
            assert!((g as f64 - w).abs() <= 1e-5 * w.abs().max(1.0), "scale {scale}: lse[{i}] = {g}, oracle {w}");
        }
    }
}

#[test]
fn tiny_scores_average_and_huge_scores_pick() {
    // Scores near 0: softmax ~ uniform, the output ~ the mean of the attended values.
    let ((out, _), _, v) = attention(64, 64, 1e-4, 5);
    let d = 64;
    for i in [0usize, 10, 63] {
        for x in 0..d {
            let mean = (0..=i).map(|j| v[j * d + x]).sum::<f32>() / (i + 1) as f32;
            assert!((out[i * d + x] - mean).abs() <= 1e-6, "row {i}: {} vs mean {mean}", out[i * d + x]);
        }
    }
    // Scores of 1e8 and more apart: the output is the value of the best-scoring key, exactly.
    let ((out, lse), (_, want_lse), v) = attention(64, 64, 1e4, 7);
    for i in [0usize, 10, 63] {
        let row = &out[i * d..(i + 1) * d];
        let best = (0..=i).find(|&j| row.iter().zip(&v[j * d..(j + 1) * d]).all(|(a, b)| a == b));
        assert!(best.is_some(), "row {i}: the output is one key's value");
        assert!((lse[i] as f64 - want_lse[i]).abs() <= 1e-5 * want_lse[i].abs());
    }
}

#[test]
fn one_token_and_empty_masks() {
    // One token: the output is its value, the LSE its scaled score.
    let ((out, lse), (want, want_lse), v) = attention(1, 128, 1.0, 9);
    assert_eq!(out, v);
    assert!((lse[0] as f64 - want_lse[0]).abs() <= 1e-5 * want_lse[0].abs().max(1.0));
    assert_eq!(want.len(), 128);
    // An all-empty mask: zeros and LSE -inf, never NaN.
    let batch = Batch::from_lens(&[(1, 1), (70, 200)]).unwrap();
    let layout = MaskLayout::new(&batch, 2, 64).unwrap();
    let mask = BlockMask::empty(&layout);
    let qb = vec![0x3f80u16; 71 * 2 * 64].iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let kb = vec![0x3f80u16; 201 * 64].iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let q = Tensor3::new("q", &qb, DType::BF16, Layout3::contiguous(71, 2, 64)).unwrap();
    let k = Tensor3::new("k", &kb, DType::BF16, Layout3::contiguous(201, 1, 64)).unwrap();
    let mut ob = vec![0xffu8; 71 * 2 * 64 * 4];
    let mut lse = vec![0f32; 2 * 71];
    let mut o = Tensor3Mut::new("o", &mut ob, DType::F32, Layout3::contiguous(71, 2, 64)).unwrap();
    let p = AttentionParams::for_head_dim(64);
    sparse_prefill(&q, &k, &k, &batch, mask.as_ref(), &p, &mut o, Some(&mut lse)).unwrap();
    assert!(ob.chunks(4).all(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) == 0.0));
    assert!(lse.iter().all(|&x| x == f32::NEG_INFINITY));
}
