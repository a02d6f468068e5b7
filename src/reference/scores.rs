//! Stage 2 of the gate: project pooled features, rotate them, score key blocks.
//!
//! For query head `h` and absolute query block `i` of a sequence:
//! - `q_gate = pooled_q[i, h]` (times `mask_linear_q[h]` when the gate has one);
//! - `k_gate[j] = pooled_k[j, kv] · mask_linear_k[h]` for the released layout
//!   (one K projection per *query* head, `kv = h / group`), or
//!   `mask_linear_k[kv]` when the gate has a Q projection (upstream's layout);
//! - both rotated by NeoX half-split RoPE at the absolute position of their
//!   block's start, `64 * block` (what upstream's `position_ids[:, 0::64]`
//!   gives for a whole-sequence prefill; for a chunk starting mid-block the
//!   grid start keeps query-key relative positions those the gate was
//!   trained on);
//! - `logit[j] = q_gate · k_gate[j] / sqrt(gate_hidden)` for causal `j <= i`,
//!   and `prob = softmax(logit)` over those `j`.
//!
//! Upstream computes in bf16 with f32 accumulation; this reference keeps f32
//! throughout (RoPE angles in f64), so probabilities differ from upstream by
//! bf16 rounding only.

use crate::batch::{Batch, SeqBlocks};
use crate::config::GateConfig;
use crate::gate::LayerWeights;
use crate::mask::MaskLayout;
use crate::reference::pooling::{pool_keys, pool_queries};
use crate::tensor::Tensor3;

/// Gate scores of a batch, stored like a full mask: row `r` (see
/// [`MaskLayout`]) keeps key block `j <= q_block` at `row_offsets[r] + j`.
#[derive(Clone, Debug)]
pub struct GateScores {
    pub layout: MaskLayout,
    pub row_offsets: Vec<i64>,
    /// `q_gate · k_gate / sqrt(gate_hidden)`.
    pub logits: Vec<f32>,
    /// Softmax of the logits over each row's causal key blocks.
    pub probs: Vec<f32>,
}

impl GateScores {
    /// Logits of row `r`, one per causal key block.
    pub fn row_logits(&self, r: usize) -> &[f32] {
        let id = self.layout.row_id(r);
        let lo = self.row_offsets[r] as usize;
        &self.logits[lo..lo + id.q_block + 1]
    }
    /// Probabilities of row `r`, one per causal key block.
    pub fn row_probs(&self, r: usize) -> &[f32] {
        let id = self.layout.row_id(r);
        let lo = self.row_offsets[r] as usize;
        &self.probs[lo..lo + id.q_block + 1]
    }
}

/// `x[.. width_in] · w[width_in, width_out]` (row-major) into `out`.
fn project(x: &[f32], w: &[f32], width_out: usize, out: &mut [f32]) {
    out.fill(0.0);
    for (i, &xi) in x.iter().enumerate() {
        let row = &w[i * width_out..(i + 1) * width_out];
        for (o, &wo) in out.iter_mut().zip(row) {
            *o += xi * wo;
        }
    }
}

/// Rotate `x` in place by NeoX half-split RoPE at `position`.
pub fn apply_rope(x: &mut [f32], inv_freq: &[f64], position: usize) {
    let half = x.len() / 2;
    for (i, &f) in inv_freq.iter().enumerate().take(half) {
        let angle = position as f64 * f;
        let (sin, cos) = (angle.sin() as f32, angle.cos() as f32);
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * cos - b * sin;
        x[i + half] = b * cos + a * sin;
    }
}

/// Gate logits and probabilities of one layer for a whole batch. Inputs are
/// pre-RoPE `q_nope: [total_q, hq, head_dim]` and `k_nope: [total_k, hkv, head_dim]`,
/// already validated against `config` and `batch`.
pub fn gate_scores(
    config: &GateConfig,
    weights: &LayerWeights,
    q_nope: &Tensor3,
    k_nope: &Tensor3,
    batch: &Batch,
) -> GateScores {
    let layout = MaskLayout::new(batch, config.num_q_heads, config.block_size)
        .expect("callers validate the batch before scoring");
    let row_offsets = layout.row_offsets();
    let capacity = layout.index_capacity();
    let mut scores = GateScores { layout, row_offsets, logits: vec![0.0; capacity], probs: vec![0.0; capacity] };
    let inv_freq = config.rope.inv_freq(config.gate_hidden);
    for (s, seq) in batch.seqs(config.block_size).enumerate() {
        score_sequence(config, weights, q_nope, k_nope, &seq, &inv_freq, s, &mut scores);
    }
    scores
}

#[allow(clippy::too_many_arguments)]
fn score_sequence(
    config: &GateConfig,
    weights: &LayerWeights,
    q_nope: &Tensor3,
    k_nope: &Tensor3,
    seq: &SeqBlocks,
    inv_freq: &[f64],
    s: usize,
    scores: &mut GateScores,
) {
    let block = config.block_size;
    let hidden = config.gate_hidden;
    let (hq, hkv, group) = (config.num_q_heads, config.num_kv_heads, config.group_size());
    let (q_in, k_in) = (config.q_in(), config.k_in());
    let pooled_q = pool_queries(q_nope, seq, block, &config.gate_type.q_pools);
    let pooled_k = pool_keys(k_nope, seq, block, &config.gate_type.k_pools);
    let per_q_head_k = config.k_proj_heads() == hq;
    let scale = 1.0 / (hidden as f32).sqrt();

    // K projected and rotated, per projection head: [k_proj_heads, k_blocks, hidden].
    let mut k_gate = vec![0.0f32; config.k_proj_heads() * seq.k_blocks * hidden];
    for ph in 0..config.k_proj_heads() {
        let kv = if per_q_head_k { ph / group } else { ph };
        let w = &weights.k_proj[ph * k_in * hidden..(ph + 1) * k_in * hidden];
        for j in 0..seq.k_blocks {
            let x = &pooled_k[(j * hkv + kv) * k_in..(j * hkv + kv + 1) * k_in];
            let out = &mut k_gate[(ph * seq.k_blocks + j) * hidden..(ph * seq.k_blocks + j + 1) * hidden];
            project(x, w, hidden, out);
            apply_rope(out, inv_freq, j * block);
        }
    }

    let mut q_gate = vec![0.0f32; hidden];
    for h in 0..hq {
        let ph = if per_q_head_k { h } else { h / group };
        for i in 0..seq.q_blocks {
            let q_block = seq.first_q_block + i;
            let x = &pooled_q[(i * hq + h) * q_in..(i * hq + h + 1) * q_in];
            match &weights.q_proj {
                Some(wq) => project(x, &wq[h * q_in * hidden..(h + 1) * q_in * hidden], hidden, &mut q_gate),
                None => q_gate.copy_from_slice(x),
            }
            apply_rope(&mut q_gate, inv_freq, q_block * block);

            let r = scores.layout.row(s, h, i);
            let lo = scores.row_offsets[r] as usize;
            let logits = &mut scores.logits[lo..lo + q_block + 1];
            for (j, logit) in logits.iter_mut().enumerate() {
                let k = &k_gate[(ph * seq.k_blocks + j) * hidden..(ph * seq.k_blocks + j + 1) * hidden];
                *logit = q_gate.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
            }
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let probs = &mut scores.probs[lo..lo + q_block + 1];
            let mut sum = 0.0f32;
            for (p, &l) in probs.iter_mut().zip(logits.iter()) {
                *p = (l - max).exp();
                sum += *p;
            }
            probs.iter_mut().for_each(|p| *p /= sum);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_rotates_pairs_and_preserves_norm() {
        let inv = [1.0f64, 0.5];
        let mut x = [1.0f32, 2.0, 3.0, 4.0];
        apply_rope(&mut x, &inv, 0);
        assert_eq!(x, [1.0, 2.0, 3.0, 4.0]);
        apply_rope(&mut x, &inv, 3);
        // Pair (x0, x2) rotated by 3 rad, pair (x1, x3) by 1.5 rad.
        let (s3, c3) = (3.0f32.sin(), 3.0f32.cos());
        assert!((x[0] - (1.0 * c3 - 3.0 * s3)).abs() < 1e-6);
        assert!((x[2] - (3.0 * c3 + 1.0 * s3)).abs() < 1e-6);
        let norm: f32 = x.iter().map(|v| v * v).sum();
        assert!((norm - 30.0).abs() < 1e-4);
    }

    #[test]
    fn relative_rotation_only_depends_on_distance() {
        // <rope(q, a), rope(k, b)> depends on a - b: the property that makes
        // block-start positions meaningful for the gate.
        let inv: Vec<f64> = (0..4).map(|i| 1.0 / 10000f64.powf(i as f64 / 4.0)).collect();
        let q0 = [0.3f32, -1.0, 0.5, 2.0, 1.0, 0.1, -0.7, 0.2];
        let k0 = [1.1f32, 0.4, -0.2, 0.9, -1.5, 0.6, 0.3, -0.8];
        let dot = |a: usize, b: usize| {
            let (mut q, mut k) = (q0, k0);
            apply_rope(&mut q, &inv, a);
            apply_rope(&mut k, &inv, b);
            q.iter().zip(&k).map(|(x, y)| x * y).sum::<f32>()
        };
        assert!((dot(640, 128) - dot(512, 0)).abs() < 1e-3);
    }
}
