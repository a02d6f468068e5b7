//! The block mask: the one format every producer (the gate, a caller's dense
//! map) writes and every consumer (the sparse attention kernels) reads.
//!
//! A mask has one *row* per (sequence, query head, query block), ordered
//! sequence-major, then head, then query block (`Batch` numbers query blocks
//! by absolute position). Row `r` owns the index slots
//! `row_offsets[r]..row_offsets[r+1]` of `indices`; its first `counts[r]`
//! slots hold the selected key-block indices, strictly increasing and causal
//! (at most the row's own absolute block index). Slots past the count are
//! unused.
//!
//! [`MaskLayout`] gives every row the capacity of its causal row length
//! (`block index + 1`), so any mask fits; a caller that builds masks itself
//! may pack rows tighter, as long as offsets are non-decreasing.
//! Indices and counts are `i32`, offsets `i64` (masks of long batches exceed
//! 2^31 slots).

use crate::batch::Batch;
use crate::error::{Error, Result};

/// Sizes and row offsets of masks for one batch shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaskLayout {
    /// Query heads (one row set per head).
    pub num_heads: usize,
    pub block_size: usize,
    /// Per sequence: `(first row, q_blocks, first_q_block, k_blocks)`.
    seqs: Vec<SeqRows>,
    rows: usize,
    index_capacity: usize,
    dense_len: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SeqRows {
    first_row: usize,
    first_slot: usize,
    first_dense: usize,
    q_blocks: usize,
    first_q_block: usize,
    k_blocks: usize,
}

/// Which row of a mask: sequence, query head, absolute query block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowId {
    pub seq: usize,
    pub head: usize,
    /// Absolute block index of the row's queries; also its causal diagonal.
    pub q_block: usize,
    /// Key blocks of the sequence.
    pub k_blocks: usize,
}

fn tri(n: usize) -> Option<usize> {
    n.checked_mul(n + 1).map(|x| x / 2)
}

impl MaskLayout {
    /// Layout of masks for `batch` with `num_heads` query heads.
    pub fn new(batch: &Batch, num_heads: usize, block_size: usize) -> Result<Self> {
        if num_heads == 0 || block_size == 0 {
            return Err(Error::invalid("mask layout: num_heads and block_size must be positive"));
        }
        let overflow = || Error::invalid("mask layout: sizes overflow");
        let mut seqs = Vec::with_capacity(batch.len());
        let (mut rows, mut slots, mut dense) = (0usize, 0usize, 0usize);
        for sq in batch.seqs(block_size) {
            seqs.push(SeqRows {
                first_row: rows,
                first_slot: slots,
                first_dense: dense,
                q_blocks: sq.q_blocks,
                first_q_block: sq.first_q_block,
                k_blocks: sq.k_blocks,
            });
            let per_head_slots =
                tri(sq.k_blocks).zip(tri(sq.first_q_block)).map(|(a, b)| a - b).ok_or_else(overflow)?;
            rows = sq.q_blocks.checked_mul(num_heads).and_then(|x| x.checked_add(rows)).ok_or_else(overflow)?;
            slots = per_head_slots.checked_mul(num_heads).and_then(|x| x.checked_add(slots)).ok_or_else(overflow)?;
            dense = sq
                .q_blocks
                .checked_mul(sq.k_blocks)
                .and_then(|x| x.checked_mul(num_heads))
                .and_then(|x| x.checked_add(dense))
                .ok_or_else(overflow)?;
        }
        if slots > i64::MAX as usize {
            return Err(overflow());
        }
        Ok(MaskLayout { num_heads, block_size, seqs, rows, index_capacity: slots, dense_len: dense })
    }

    /// Number of rows: entries of `counts`, and `row_offsets` minus one.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Index slots a mask of this layout needs.
    pub fn index_capacity(&self) -> usize {
        self.index_capacity
    }
    /// Bytes of the dense `u8` map: per sequence `[heads, q_blocks, k_blocks]`, concatenated.
    pub fn dense_len(&self) -> usize {
        self.dense_len
    }
    /// Number of sequences.
    pub fn num_seqs(&self) -> usize {
        self.seqs.len()
    }
    /// `(q_blocks, first_q_block, k_blocks)` of sequence `s`.
    pub fn seq_blocks(&self, s: usize) -> (usize, usize, usize) {
        let q = &self.seqs[s];
        (q.q_blocks, q.first_q_block, q.k_blocks)
    }

    /// Row number of (sequence, head, i-th query block of the sequence).
    pub fn row(&self, seq: usize, head: usize, i: usize) -> usize {
        let q = &self.seqs[seq];
        q.first_row + head * q.q_blocks + i
    }

    /// Which (sequence, head, block) row `r` is.
    pub fn row_id(&self, r: usize) -> RowId {
        let s = self.seqs.partition_point(|q| q.first_row <= r) - 1;
        let q = &self.seqs[s];
        let local = r - q.first_row;
        RowId { seq: s, head: local / q.q_blocks, q_block: q.first_q_block + local % q.q_blocks, k_blocks: q.k_blocks }
    }

    /// First index slot of each row, plus the total, as stored in `row_offsets`.
    pub fn row_offsets(&self) -> Vec<i64> {
        let mut out = Vec::with_capacity(self.rows + 1);
        for q in &self.seqs {
            let mut slot = q.first_slot;
            for _ in 0..self.num_heads {
                for i in 0..q.q_blocks {
                    out.push(slot as i64);
                    slot += q.first_q_block + i + 1;
                }
            }
        }
        out.push(self.index_capacity as i64);
        out
    }

    /// Offset in the dense map of (sequence, head, i-th query block, key block 0).
    pub fn dense_row_start(&self, seq: usize, head: usize, i: usize) -> usize {
        let q = &self.seqs[seq];
        q.first_dense + (head * q.q_blocks + i) * q.k_blocks
    }
}

/// An owned block mask in the index-list format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockMask {
    pub counts: Vec<i32>,
    pub indices: Vec<i32>,
    pub row_offsets: Vec<i64>,
}

/// A borrowed block mask, as a caller hands it in.
#[derive(Clone, Copy, Debug)]
pub struct BlockMaskRef<'a> {
    pub counts: &'a [i32],
    pub indices: &'a [i32],
    pub row_offsets: &'a [i64],
}

impl BlockMask {
    /// An empty mask (every count 0) with the layout's offsets.
    pub fn empty(layout: &MaskLayout) -> Self {
        BlockMask {
            counts: vec![0; layout.rows()],
            indices: vec![0; layout.index_capacity()],
            row_offsets: layout.row_offsets(),
        }
    }

    /// Borrow as a [`BlockMaskRef`].
    pub fn as_ref(&self) -> BlockMaskRef<'_> {
        BlockMaskRef { counts: &self.counts, indices: &self.indices, row_offsets: &self.row_offsets }
    }

    /// Replace row `r`'s selection with `blocks` (ascending, causal; checked
    /// by [`BlockMaskRef::validate`], not here).
    pub fn set_row(&mut self, r: usize, blocks: &[i32]) {
        let start = self.row_offsets[r] as usize;
        self.indices[start..start + blocks.len()].copy_from_slice(blocks);
        self.counts[r] = blocks.len() as i32;
    }

    /// The mask of a dense `u8` map laid out as [`MaskLayout::dense_len`]
    /// describes; non-zero bytes select. Blocks above the causal diagonal are
    /// dropped (they hold no visible keys), as upstream's `tril` does.
    pub fn from_dense(layout: &MaskLayout, dense: &[u8]) -> Result<Self> {
        if dense.len() != layout.dense_len() {
            return Err(Error::invalid(format!(
                "dense mask has {} bytes; this batch needs {} ([heads, q_blocks, k_blocks] per sequence)",
                dense.len(),
                layout.dense_len()
            )));
        }
        let mut mask = BlockMask::empty(layout);
        let mut row = Vec::new();
        for s in 0..layout.num_seqs() {
            let (q_blocks, first_q_block, _) = layout.seq_blocks(s);
            for h in 0..layout.num_heads {
                for i in 0..q_blocks {
                    let start = layout.dense_row_start(s, h, i);
                    let diag = first_q_block + i;
                    row.clear();
                    row.extend((0..=diag).filter(|&j| dense[start + j] != 0).map(|j| j as i32));
                    mask.set_row(layout.row(s, h, i), &row);
                }
            }
        }
        Ok(mask)
    }
}

impl<'a> BlockMaskRef<'a> {
    /// Check the mask against a layout: sizes, offsets in range and
    /// non-decreasing, counts within capacity, indices strictly increasing
    /// and causal. The attention paths call this before reading a mask.
    pub fn validate(&self, layout: &MaskLayout) -> Result<()> {
        let rows = layout.rows();
        if self.counts.len() != rows {
            return Err(Error::invalid(format!(
                "mask: counts has {} entries, the batch has {rows} rows",
                self.counts.len()
            )));
        }
        if self.row_offsets.len() != rows + 1 {
            return Err(Error::invalid(format!(
                "mask: row_offsets has {} entries, needs rows + 1 = {}",
                self.row_offsets.len(),
                rows + 1
            )));
        }
        if self.row_offsets[rows] < 0 || self.row_offsets[rows] as u64 > self.indices.len() as u64 {
            return Err(Error::invalid(format!(
                "mask: row_offsets[{rows}] = {} but indices holds {} slots",
                self.row_offsets[rows],
                self.indices.len()
            )));
        }
        let end = self.row_offsets[rows];
        for r in 0..rows {
            let (lo, hi) = (self.row_offsets[r], self.row_offsets[r + 1]);
            if lo < 0 || hi < lo {
                return Err(Error::invalid(format!("mask: row_offsets[{r}..={}] = {lo}, {hi} decrease", r + 1)));
            }
            // Rows after this one are not checked yet: bound it by the last
            // offset (checked above against the indices) before slicing.
            if hi > end {
                return Err(Error::invalid(format!(
                    "mask: row_offsets[{}] = {hi} exceeds row_offsets[{rows}] = {end}",
                    r + 1
                )));
            }
            let count = self.counts[r];
            if count < 0 || count as i64 > hi - lo {
                return Err(Error::invalid(format!("mask: row {r} count {count} exceeds its {} slots", hi - lo)));
            }
            let id = layout.row_id(r);
            let sel = &self.indices[lo as usize..lo as usize + count as usize];
            let mut prev = -1i64;
            for &j in sel {
                if (j as i64) <= prev || j as usize > id.q_block || j < 0 {
                    return Err(Error::invalid(format!(
                        "mask: row {r} (sequence {}, head {}, query block {}) lists block {j}: indices must be \
                         strictly increasing and within 0..={} (causal)",
                        id.seq, id.head, id.q_block, id.q_block
                    )));
                }
                prev = j as i64;
            }
        }
        Ok(())
    }

    /// Selected key blocks of row `r`.
    pub fn row(&self, r: usize) -> &'a [i32] {
        let lo = self.row_offsets[r] as usize;
        &self.indices[lo..lo + self.counts[r] as usize]
    }

    /// Write the dense `u8` map (1 = selected) of a valid mask.
    pub fn to_dense(&self, layout: &MaskLayout, dense: &mut [u8]) -> Result<()> {
        if dense.len() != layout.dense_len() {
            return Err(Error::BufferTooSmall(format!(
                "dense mask buffer has {} bytes; this batch needs exactly {}",
                dense.len(),
                layout.dense_len()
            )));
        }
        self.validate(layout)?;
        dense.fill(0);
        for s in 0..layout.num_seqs() {
            let (q_blocks, _, _) = layout.seq_blocks(s);
            for h in 0..layout.num_heads {
                for i in 0..q_blocks {
                    let start = layout.dense_row_start(s, h, i);
                    for &j in self.row(layout.row(s, h, i)) {
                        dense[start + j as usize] = 1;
                    }
                }
            }
        }
        Ok(())
    }

    /// Fraction of causal (query block, key block) pairs selected, over all rows.
    pub fn density(&self, layout: &MaskLayout) -> f64 {
        let (mut sel, mut causal) = (0u64, 0u64);
        for r in 0..layout.rows() {
            sel += self.counts[r].max(0) as u64;
            causal += layout.row_id(r).q_block as u64 + 1;
        }
        if causal == 0 {
            0.0
        } else {
            sel as f64 / causal as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_offsets_and_rows() {
        let b = Batch::from_lens(&[(130, 130), (10, 200)]).unwrap();
        let l = MaskLayout::new(&b, 2, 64).unwrap();
        // seq 0: 3 blocks, rows 0..6; seq 1: k_blocks 4, first q block 2, 2 rows per head.
        assert_eq!(l.rows(), 6 + 4);
        assert_eq!(l.index_capacity(), 2 * 6 + 2 * (3 + 4));
        let off = l.row_offsets();
        assert_eq!(off, vec![0, 1, 3, 6, 7, 9, 12, 15, 19, 22, 26]);
        assert_eq!(l.row_id(7), RowId { seq: 1, head: 0, q_block: 3, k_blocks: 4 });
        assert_eq!(l.row_id(8), RowId { seq: 1, head: 1, q_block: 2, k_blocks: 4 });
        assert_eq!(l.dense_len(), 2 * 3 * 3 + 2 * 2 * 4);
    }

    #[test]
    fn dense_round_trip_drops_upper_triangle() {
        let b = Batch::from_lens(&[(200, 200)]).unwrap();
        let l = MaskLayout::new(&b, 1, 64).unwrap();
        let dense = vec![1u8; l.dense_len()];
        let m = BlockMask::from_dense(&l, &dense).unwrap();
        assert_eq!(m.counts, vec![1, 2, 3, 4]);
        let mut back = vec![0u8; l.dense_len()];
        m.as_ref().to_dense(&l, &mut back).unwrap();
        for i in 0..4 {
            for j in 0..4 {
                assert_eq!(back[i * 4 + j], (j <= i) as u8);
            }
        }
        assert!((m.as_ref().density(&l) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn validate_refuses_bad_rows() {
        let b = Batch::single(130).unwrap();
        let l = MaskLayout::new(&b, 1, 64).unwrap();
        let mut m = BlockMask::empty(&l);
        m.set_row(2, &[0, 2]);
        assert!(m.as_ref().validate(&l).is_ok());
        m.set_row(1, &[2]);
        assert!(m.as_ref().validate(&l).is_err(), "non-causal");
        m.set_row(1, &[1, 0]);
        assert!(m.as_ref().validate(&l).is_err(), "not increasing");
        m.set_row(1, &[0]);
        m.counts[0] = 2;
        assert!(m.as_ref().validate(&l).is_err(), "over capacity");
        m.counts[0] = 1;
        m.row_offsets[3] = 100;
        assert!(m.as_ref().validate(&l).is_err(), "offset past indices");
    }
}
