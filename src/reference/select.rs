//! Stage 3 of the gate: turn each row's scores into selected key blocks.
//!
//! - Threshold: keep `j` with `prob[j] > threshold` (f32, or bf16 as upstream).
//! - Top-k (`nz_ratio`): keep the `k = MaskParams::top_k(k_blocks)` largest
//!   logits among the row's causal blocks (all of them when the row has
//!   fewer); ties go to the lower block index, so the result is deterministic
//!   (upstream's `torch.topk` leaves ties unspecified).
//! - `last_block_dense`: the last two absolute query-block rows of a
//!   sequence keep every causal block.
//! - A row left empty follows [`EmptyRowPolicy`].

use crate::config::{EmptyRowPolicy, MaskParams, SparsityMethod, ThresholdCompare};
use crate::mask::BlockMask;
use crate::reference::scores::GateScores;
use half::bf16;

/// Selected key blocks of one row, ascending. `logits`/`probs` cover key
/// blocks `0..=q_block`; `k_blocks` is the sequence's key-block count.
pub fn select_row(
    params: &MaskParams,
    logits: &[f32],
    probs: &[f32],
    q_block: usize,
    k_blocks: usize,
    out: &mut Vec<i32>,
) {
    out.clear();
    let causal = q_block + 1;
    if params.last_block_dense && q_block + 2 >= k_blocks {
        out.extend(0..causal as i32);
        return;
    }
    match params.method {
        SparsityMethod::Threshold => {
            let bf16_round = |x: f32| bf16::from_f32(x).to_f32();
            let keep = |p: f32| match params.threshold_compare {
                ThresholdCompare::F32 => p > params.threshold,
                ThresholdCompare::Bf16 => bf16_round(p) > bf16_round(params.threshold),
            };
            out.extend((0..causal).filter(|&j| keep(probs[j])).map(|j| j as i32));
        }
        SparsityMethod::NzRatio => {
            let k = params.top_k(k_blocks).min(causal);
            let mut order: Vec<usize> = (0..causal).collect();
            // Descending logit, ascending index on ties.
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
            let mut chosen: Vec<i32> = order[..k].iter().map(|&j| j as i32).collect();
            chosen.sort_unstable();
            out.extend(chosen);
        }
    }
    if out.is_empty() && params.empty_rows == EmptyRowPolicy::KeepDiagonal {
        out.push(q_block as i32);
    }
}

/// The block mask of a batch's gate scores.
pub fn select_blocks(params: &MaskParams, scores: &GateScores) -> BlockMask {
    let layout = &scores.layout;
    let mut mask = BlockMask::empty(layout);
    let mut row = Vec::new();
    for r in 0..layout.rows() {
        let id = layout.row_id(r);
        select_row(params, scores.row_logits(r), scores.row_probs(r), id.q_block, id.k_blocks, &mut row);
        mask.set_row(r, &row);
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(method: SparsityMethod) -> MaskParams {
        MaskParams {
            method,
            threshold: 0.2,
            nz_ratio: 0.5,
            last_block_dense: false,
            empty_rows: EmptyRowPolicy::KeepDiagonal,
            threshold_compare: ThresholdCompare::F32,
        }
    }

    #[test]
    fn threshold_rows() {
        let p = params(SparsityMethod::Threshold);
        let probs = [0.5, 0.2, 0.25, 0.05];
        let mut out = Vec::new();
        select_row(&p, &[0.0; 4], &probs, 3, 10, &mut out);
        assert_eq!(out, vec![0, 2]);
        // An empty row keeps its diagonal by default, stays empty upstream-style.
        select_row(&p, &[0.0; 4], &[0.1; 4], 3, 10, &mut out);
        assert_eq!(out, vec![3]);
        let up = MaskParams { empty_rows: EmptyRowPolicy::Empty, ..p };
        select_row(&up, &[0.0; 4], &[0.1; 4], 3, 10, &mut out);
        assert!(out.is_empty());
        // Threshold 0 keeps every block with non-zero probability, 1 keeps none.
        let zero = MaskParams { threshold: 0.0, ..p };
        select_row(&zero, &[0.0; 4], &[0.1; 4], 3, 10, &mut out);
        assert_eq!(out, vec![0, 1, 2, 3]);
    }

    #[test]
    fn bf16_compare_rounds_both_sides() {
        // 0.2 is 0.2001953125 in bf16; 0.2005 rounds to the same bf16 value,
        // so upstream's comparison drops it while the f32 comparison keeps it.
        let p = params(SparsityMethod::Threshold);
        let up = MaskParams { threshold_compare: ThresholdCompare::Bf16, ..p };
        let mut out = Vec::new();
        select_row(&p, &[0.0], &[0.2005], 0, 10, &mut out);
        assert_eq!(out, vec![0]);
        select_row(&MaskParams { empty_rows: EmptyRowPolicy::Empty, ..up }, &[0.0], &[0.2005], 0, 10, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn top_k_rows_and_ties() {
        let p = params(SparsityMethod::NzRatio);
        // k = floor((1 - sqrt(0.5)) * 10) = 2.
        assert_eq!(p.top_k(10), 2);
        assert_eq!(p.top_k(1), 1);
        let mut out = Vec::new();
        select_row(&p, &[0.1, 3.0, 0.5, 3.0, -1.0], &[0.0; 5], 4, 10, &mut out);
        assert_eq!(out, vec![1, 3]);
        // Ties go to the lower index.
        select_row(&p, &[1.0, 1.0, 1.0, 1.0], &[0.0; 4], 3, 10, &mut out);
        assert_eq!(out, vec![0, 1]);
        // A row shorter than k keeps everything causal.
        select_row(&p, &[0.3], &[0.0], 0, 10, &mut out);
        assert_eq!(out, vec![0]);
    }

    #[test]
    fn last_rows_dense() {
        let p = MaskParams { last_block_dense: true, ..params(SparsityMethod::NzRatio) };
        let mut out = Vec::new();
        select_row(&p, &[0.0; 9], &[0.0; 9], 8, 10, &mut out);
        assert_eq!(out.len(), 9);
        select_row(&p, &[0.0; 8], &[0.0; 8], 7, 10, &mut out);
        assert_eq!(out.len(), 2);
    }
}
