//! Sparse prefill against upstream's Triton block-sparse kernel, on the
//! recorded conformance vectors (`tests/data/upstream`, see PROVENANCE.md).
//!
//! Causal attention of a token depends only on earlier tokens, so each test
//! takes a slice of a recorded case (a prefix, or a chunk of queries over a
//! prefix of keys) to stay fast in debug builds; the upstream output for
//! those tokens is the same computation.

use half::bf16;
use safetensors::SafeTensors;
use seerattn::attention::{sparse_prefill, AttentionParams};
use seerattn::{Batch, BlockMask, DType, Layout3, MaskLayout, Tensor3, Tensor3Mut};
use std::ops::Range;

mod common;

const BLOCK: usize = 64;
const MASK: &str = "mask_threshold_0_05";
const UPSTREAM_OUT: &str = "out_sparse_threshold_0_05";

fn load(name: &str) -> Vec<u8> {
    let path = common::upstream_dir().join(format!("{name}.safetensors"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn bf16_at(bytes: &[u8], i: usize) -> f32 {
    bf16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f32()
}

/// A strided `[tokens, heads.len(), d]` view of tokens `first..first + tokens`
/// and `heads` of a recorded `[seq, all_heads, d]` bf16 tensor.
fn view<'a>(file: &'a SafeTensors, name: &str, first: usize, tokens: usize, heads: Range<usize>) -> Tensor3<'a> {
    let t = file.tensor(name).unwrap();
    let all_heads = t.shape()[1];
    let d = t.shape()[2];
    let bytes = &t.data()[(first * all_heads + heads.start) * d * 2..];
    let layout = Layout3 { shape: [tokens, heads.len(), d], strides: [all_heads * d, d, 1] };
    Tensor3::new(name, bytes, DType::BF16, layout).unwrap()
}

/// Run sparse prefill on one sequence whose keys are the recorded tokens
/// `0..k_len` and whose queries are its last `q_len`, for the query heads
/// `q_heads` (a whole number of GQA groups) and their KV heads, with the
/// recorded mask rows of those heads; compare with the recorded upstream
/// output. Returns the number of query rows upstream left NaN (empty mask
/// rows); those must be exactly 0.0 here.
fn compare_with_upstream(case: &str, q_len: usize, k_len: usize, q_heads: Range<usize>) -> usize {
    let bytes = load(case);
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let group = file.tensor("q").unwrap().shape()[1] / file.tensor("k").unwrap().shape()[1];
    let kv_heads = q_heads.start / group..q_heads.end / group;
    let heads = q_heads.len();
    let batch = Batch::from_lens(&[(q_len, k_len)]).unwrap();
    let q_start = k_len - q_len;
    let q = view(&file, "q", q_start, q_len, q_heads.clone());
    let k = view(&file, "k", 0, k_len, kv_heads.clone());
    let v = view(&file, "v", 0, k_len, kv_heads);
    let d = q.shape()[2];

    // The recorded mask is `[heads, blocks, blocks]` over the whole sequence;
    // this batch's rows are its query blocks, its columns its key blocks.
    let recorded = file.tensor(MASK).unwrap();
    let blocks = recorded.shape()[1];
    let layout = MaskLayout::new(&batch, heads, BLOCK).unwrap();
    let (q_blocks, first_q_block, k_blocks) = layout.seq_blocks(0);
    let mut dense = vec![0u8; layout.dense_len()];
    for h in 0..heads {
        for i in 0..q_blocks {
            let src = ((q_heads.start + h) * blocks + first_q_block + i) * blocks;
            let dst = layout.dense_row_start(0, h, i);
            dense[dst..dst + k_blocks].copy_from_slice(&recorded.data()[src..src + k_blocks]);
        }
    }
    let mask = BlockMask::from_dense(&layout, &dense).unwrap();

    // All-ones bytes are f32 NaN: an element left unwritten cannot pass as 0.0.
    let mut out_bytes = vec![0xFFu8; q_len * heads * d * 4];
    let mut out = Tensor3Mut::new("out", &mut out_bytes, DType::F32, Layout3::contiguous(q_len, heads, d)).unwrap();
    let params = AttentionParams::for_head_dim(d);
    sparse_prefill(&q, &k, &v, &batch, mask.as_ref(), &params, &mut out, None).unwrap();

    let upstream = file.tensor(UPSTREAM_OUT).unwrap();
    let all_heads = upstream.shape()[1];
    let mut nan_rows = 0;
    for i in 0..q_len {
        for h in 0..heads {
            let row = (q_start + i) * all_heads + q_heads.start + h;
            let want: Vec<f32> = (0..d).map(|x| bf16_at(upstream.data(), row * d + x)).collect();
            let got: Vec<f32> = (0..d).map(|x| out.get(i, h, x)).collect();
            if want.iter().any(|w| w.is_nan()) {
                nan_rows += 1;
                assert!(
                    got.iter().all(|&g| g == 0.0),
                    "{case}: token {}, head {h}: empty row must be zeros",
                    q_start + i
                );
                continue;
            }
            for x in 0..d {
                // Upstream rounds P to bf16 before P·V and stores bf16: allow
                // a few bf16 ulps relative to the row's largest magnitude.
                let row_max = want.iter().fold(0.0f32, |m, w| m.max(w.abs()));
                let tol = 2f32.powi(-7) * want[x].abs() + 2f32.powi(-8) * row_max;
                assert!(
                    (got[x] - want[x]).abs() <= tol,
                    "{case}: token {}, head {h}, dim {x}: {} vs upstream {}",
                    q_start + i,
                    got[x],
                    want[x]
                );
            }
        }
    }
    nan_rows
}

#[test]
fn gqa4_prefix_matches_upstream() {
    // First 300 of 1000 tokens (not a multiple of 64), query heads 4..8 over
    // KV head 1 (views that start mid-tensor); these mask rows are fully causal.
    let nan_rows = compare_with_upstream("gqa4_s1000", 300, 300, 4..8);
    assert_eq!(nan_rows, 0);
}

#[test]
fn gqa4_sparse_chunk_matches_upstream() {
    // Queries 700..870 (starting 60 tokens into block 10, ending mid-block
    // 13) over keys 0..870, all 8 query heads over both KV heads: sparse
    // rows, some without their diagonal block.
    let nan_rows = compare_with_upstream("gqa4_s1000", 170, 870, 0..8);
    assert_eq!(nan_rows, 0);
}

#[test]
fn mqa_chunk_with_empty_rows_matches_upstream_and_writes_zeros() {
    // Query block 32 (tokens 2048..2112) over keys 0..2112, all 4 query
    // heads over the one KV head: upstream left heads 1 and 2 of this block
    // empty (NaN there); the others must match.
    let nan_rows = compare_with_upstream("mqa_s3072", 64, 2112, 0..4);
    assert_eq!(nan_rows, 2 * 64);
}
