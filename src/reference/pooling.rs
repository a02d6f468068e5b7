//! Stage 1 of the gate: pool pre-RoPE Q and K over blocks of tokens.
//!
//! Per sequence and block, Q is pooled with the gate type's Q pools and K
//! with its K pools, concatenated in the gate type's order (`[max|min|avg]`
//! for the released `Kmaxminavg`). A block pools over its real tokens only:
//! the last key block of a sequence may be short, and so may the first query
//! block of a chunk that starts mid-block (upstream's `avg_pool3d` with
//! `ceil_mode=True` and no padding divides by the real count too).

use crate::batch::SeqBlocks;
use crate::config::Pool;
use crate::tensor::Tensor3;

/// Pool rows `lo..hi` (packed token rows) of head `head` of `x` into `out`
/// (`pools.len() * dim` values: one `dim`-wide slice per pool, in order).
fn pool_rows(x: &Tensor3, rows: std::ops::Range<usize>, head: usize, pools: &[Pool], out: &mut [f32]) {
    let dim = x.shape()[2];
    let count = rows.len() as f32;
    for (p, pool) in pools.iter().enumerate() {
        let slot = &mut out[p * dim..(p + 1) * dim];
        for (d, o) in slot.iter_mut().enumerate() {
            let values = rows.clone().map(|t| x.get(t, head, d));
            *o = match pool {
                Pool::Max => values.fold(f32::NEG_INFINITY, f32::max),
                Pool::Min => values.fold(f32::INFINITY, f32::min),
                Pool::Avg => values.sum::<f32>() / count,
            };
        }
    }
}

/// Pooled queries of one sequence: `[q_blocks, heads, pools * dim]`, row `i`
/// being absolute query block `seq.first_q_block + i`.
pub fn pool_queries(q: &Tensor3, seq: &SeqBlocks, block: usize, pools: &[Pool]) -> Vec<f32> {
    let [_, heads, dim] = q.shape();
    let width = pools.len() * dim;
    let mut out = vec![0.0; seq.q_blocks * heads * width];
    for i in 0..seq.q_blocks {
        let (lo, hi) = seq.q_block_range(seq.first_q_block + i, block);
        // Absolute positions lo..hi are packed rows q_offset + (pos - q_start).
        let rows = seq.q_offset + lo - seq.q_start..seq.q_offset + hi - seq.q_start;
        for h in 0..heads {
            let at = (i * heads + h) * width;
            pool_rows(q, rows.clone(), h, pools, &mut out[at..at + width]);
        }
    }
    out
}

/// Pooled keys of one sequence: `[k_blocks, kv_heads, pools * dim]`.
pub fn pool_keys(k: &Tensor3, seq: &SeqBlocks, block: usize, pools: &[Pool]) -> Vec<f32> {
    let [_, heads, dim] = k.shape();
    let width = pools.len() * dim;
    let mut out = vec![0.0; seq.k_blocks * heads * width];
    for j in 0..seq.k_blocks {
        let (lo, hi) = seq.k_block_range(j, block);
        let rows = seq.k_offset + lo..seq.k_offset + hi;
        for h in 0..heads {
            let at = (j * heads + h) * width;
            pool_rows(k, rows.clone(), h, pools, &mut out[at..at + width]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Batch;
    use crate::tensor::{DType, Layout3};

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn partial_blocks_pool_real_tokens_only() {
        // One head, dim 1, 5 tokens, blocks of 2: [1,5 | -2,4 | 7].
        let vals = [1.0f32, 5.0, -2.0, 4.0, 7.0];
        let bytes = f32_bytes(&vals);
        let t = Tensor3::new("k", &bytes, DType::F32, Layout3::contiguous(5, 1, 1)).unwrap();
        let b = Batch::single(5).unwrap();
        let seq = b.seq(0, 2);
        let k = pool_keys(&t, &seq, 2, &[Pool::Max, Pool::Min, Pool::Avg]);
        assert_eq!(k, vec![5.0, 1.0, 3.0, 4.0, -2.0, 1.0, 7.0, 7.0, 7.0]);
        // A 3-token chunk at the end (positions 2..5): query blocks 1 and 2, both real-token pooled.
        let qb = Batch::from_lens(&[(3, 5)]).unwrap();
        let qt = Tensor3::new("q", &bytes[8..], DType::F32, Layout3::contiguous(3, 1, 1)).unwrap();
        let q = pool_queries(&qt, &qb.seq(0, 2), 2, &[Pool::Avg]);
        assert_eq!(q, vec![1.0, 7.0]);
        // A chunk starting mid-block (positions 1..5): its first block holds one token.
        let qb = Batch::from_lens(&[(4, 5)]).unwrap();
        let qt = Tensor3::new("q", &bytes[4..], DType::F32, Layout3::contiguous(4, 1, 1)).unwrap();
        let q = pool_queries(&qt, &qb.seq(0, 2), 2, &[Pool::Avg]);
        assert_eq!(q, vec![5.0, 1.0, 7.0]);
    }
}
