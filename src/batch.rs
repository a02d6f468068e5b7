//! Variable-length batches in the `cu_seqlens` convention of FlashAttention.
//!
//! Sequence `s` owns query tokens `cu_q[s]..cu_q[s+1]` and key tokens
//! `cu_k[s]..cu_k[s+1]` of the packed `[tokens, heads, dim]` tensors. Its
//! queries are the *last* `q_len` positions of its `k_len` keys, so
//! `q_len < k_len` is chunked prefill over a KV cache: query `i` sits at
//! absolute position `k_len - q_len + i`.
//!
//! Blocks are aligned to absolute positions: key block `j` holds positions
//! `64j..64j+64`. A query chunk that starts mid-block begins with a partial
//! query block; query-block rows are numbered by their absolute block index.

use crate::error::{Error, Result};

/// Lengths of each sequence of a batch, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    cu_q: Vec<usize>,
    cu_k: Vec<usize>,
}

/// One sequence's geometry at a given block size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqBlocks {
    /// Query tokens of this sequence start at this packed row.
    pub q_offset: usize,
    /// Key tokens of this sequence start at this packed row.
    pub k_offset: usize,
    pub q_len: usize,
    pub k_len: usize,
    /// Absolute position of the first query (`k_len - q_len`).
    pub q_start: usize,
    /// Key blocks: `ceil(k_len / block)`.
    pub k_blocks: usize,
    /// Absolute block index of the first query block: `q_start / block`.
    pub first_q_block: usize,
    /// Query-block rows: `k_blocks - first_q_block`.
    pub q_blocks: usize,
}

impl Batch {
    /// A batch from FlashAttention-style cumulative lengths (`batch + 1`
    /// entries each, starting at 0, non-decreasing), with every
    /// `1 <= q_len <= k_len`.
    pub fn from_cu_seqlens(cu_q: &[i32], cu_k: &[i32]) -> Result<Self> {
        if cu_q.len() < 2 || cu_q.len() != cu_k.len() {
            return Err(Error::invalid(format!(
                "cu_seqlens_q has {} entries and cu_seqlens_k {}: both need batch + 1 >= 2",
                cu_q.len(),
                cu_k.len()
            )));
        }
        let conv = |name: &str, v: &[i32]| -> Result<Vec<usize>> {
            if v[0] != 0 {
                return Err(Error::invalid(format!("{name}[0] = {} must be 0", v[0])));
            }
            let mut out = Vec::with_capacity(v.len());
            for (i, &x) in v.iter().enumerate() {
                if x < 0 || (i > 0 && x < v[i - 1]) {
                    return Err(Error::invalid(format!("{name}[{i}] = {x}: must be non-negative and non-decreasing")));
                }
                out.push(x as usize);
            }
            Ok(out)
        };
        let cu_q = conv("cu_seqlens_q", cu_q)?;
        let cu_k = conv("cu_seqlens_k", cu_k)?;
        Self::from_cumulative(cu_q, cu_k)
    }

    /// A batch from per-sequence `(q_len, k_len)` pairs.
    pub fn from_lens(lens: &[(usize, usize)]) -> Result<Self> {
        let mut cu_q = vec![0usize];
        let mut cu_k = vec![0usize];
        for &(q, k) in lens {
            let nq = cu_q.last().unwrap().checked_add(q).ok_or_else(|| Error::invalid("query tokens overflow"))?;
            let nk = cu_k.last().unwrap().checked_add(k).ok_or_else(|| Error::invalid("key tokens overflow"))?;
            cu_q.push(nq);
            cu_k.push(nk);
        }
        if lens.is_empty() {
            return Err(Error::invalid("a batch needs at least one sequence"));
        }
        Self::from_cumulative(cu_q, cu_k)
    }

    /// One sequence of `len` tokens, queries and keys alike (plain prefill).
    pub fn single(len: usize) -> Result<Self> {
        Self::from_lens(&[(len, len)])
    }

    fn from_cumulative(cu_q: Vec<usize>, cu_k: Vec<usize>) -> Result<Self> {
        for s in 0..cu_q.len() - 1 {
            let q = cu_q[s + 1] - cu_q[s];
            let k = cu_k[s + 1] - cu_k[s];
            if q == 0 {
                return Err(Error::invalid(format!("sequence {s} has no query tokens (q_len = 0)")));
            }
            if q > k {
                return Err(Error::invalid(format!(
                    "sequence {s}: q_len = {q} exceeds k_len = {k} (queries are the last q_len of the k_len positions)"
                )));
            }
            if k > i32::MAX as usize {
                return Err(Error::invalid(format!("sequence {s}: k_len = {k} exceeds 2^31 - 1")));
            }
        }
        Ok(Batch { cu_q, cu_k })
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.cu_q.len() - 1
    }
    /// Always false: a batch holds at least one sequence.
    pub fn is_empty(&self) -> bool {
        false
    }
    /// Total query tokens (rows of packed Q and of the output).
    pub fn total_q(&self) -> usize {
        *self.cu_q.last().unwrap()
    }
    /// Total key tokens (rows of packed K and V).
    pub fn total_k(&self) -> usize {
        *self.cu_k.last().unwrap()
    }

    /// Geometry of sequence `s` for blocks of `block` tokens.
    pub fn seq(&self, s: usize, block: usize) -> SeqBlocks {
        let q_len = self.cu_q[s + 1] - self.cu_q[s];
        let k_len = self.cu_k[s + 1] - self.cu_k[s];
        let q_start = k_len - q_len;
        let k_blocks = k_len.div_ceil(block);
        let first_q_block = q_start / block;
        SeqBlocks {
            q_offset: self.cu_q[s],
            k_offset: self.cu_k[s],
            q_len,
            k_len,
            q_start,
            k_blocks,
            first_q_block,
            q_blocks: k_blocks - first_q_block,
        }
    }

    /// Geometry of every sequence.
    pub fn seqs(&self, block: usize) -> impl Iterator<Item = SeqBlocks> + '_ {
        (0..self.len()).map(move |s| self.seq(s, block))
    }
}

impl SeqBlocks {
    /// Absolute token range `[lo, hi)` of key block `j`.
    pub fn k_block_range(&self, j: usize, block: usize) -> (usize, usize) {
        (j * block, ((j + 1) * block).min(self.k_len))
    }
    /// Absolute token range `[lo, hi)` of the queries in absolute block `j`
    /// (the first may be partial when a chunk starts mid-block).
    pub fn q_block_range(&self, j: usize, block: usize) -> (usize, usize) {
        ((j * block).max(self.q_start), ((j + 1) * block).min(self.k_len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_of_chunks() {
        let b = Batch::from_lens(&[(1000, 1000), (100, 300), (1, 64)]).unwrap();
        let s0 = b.seq(0, 64);
        assert_eq!((s0.k_blocks, s0.first_q_block, s0.q_blocks), (16, 0, 16));
        assert_eq!(s0.q_block_range(15, 64), (960, 1000));
        let s1 = b.seq(1, 64);
        assert_eq!((s1.q_start, s1.k_blocks, s1.first_q_block, s1.q_blocks), (200, 5, 3, 2));
        assert_eq!(s1.q_block_range(3, 64), (200, 256));
        assert_eq!((s1.q_offset, s1.k_offset), (1000, 1000));
        let s2 = b.seq(2, 64);
        assert_eq!((s2.q_start, s2.k_blocks, s2.first_q_block, s2.q_blocks), (63, 1, 0, 1));
        assert_eq!(b.total_q(), 1101);
        assert_eq!(b.total_k(), 1364);
    }

    #[test]
    fn bad_lengths() {
        assert!(Batch::from_lens(&[]).is_err());
        assert!(Batch::from_lens(&[(0, 10)]).is_err());
        assert!(Batch::from_lens(&[(11, 10)]).is_err());
        assert!(Batch::from_cu_seqlens(&[0], &[0]).is_err());
        assert!(Batch::from_cu_seqlens(&[1, 5], &[0, 5]).is_err());
        assert!(Batch::from_cu_seqlens(&[0, 5, 4], &[0, 5, 9]).is_err());
        assert!(Batch::from_cu_seqlens(&[0, 5], &[0, 5, 6]).is_err());
        assert!(Batch::from_cu_seqlens(&[0, -1], &[0, 5]).is_err());
        assert!(Batch::from_cu_seqlens(&[0, 5, 9], &[0, 5, 13]).is_ok());
    }
}
