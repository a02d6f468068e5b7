//! Stage 5, training: gate self-distillation, the CPU reference.
//!
//! A gate is trained to predict, from pooled pre-RoPE Q and K, where the
//! frozen model's own attention goes. Three pieces, each a plain function:
//!
//! - [`distill_target`]: the ground truth of one layer. For every (sequence,
//!   query head, query block `i`, key block `j <= i`), the **maximum** over the
//!   block's (query row, key) entries of the causal softmax probability
//!   `softmax(scale * q·k)` (post-RoPE Q and K), then each query-block row
//!   normalised to sum 1. This is upstream's `attn_with_pooling` output `Po`
//!   (a 2-D max pool of the attention map).
//! - [`distill_loss`] / [`distill_loss_and_grad`]: the gate's logits (no
//!   softmax; the same function [`crate::reference::scores`] computes, here in
//!   f64), `KL(target || softmax(logits))` per query-block row over the causal
//!   key blocks, rows of the first quarter of the sequence skipped, normalised
//!   as upstream normalises it; and the gradient of that loss with respect to
//!   the gate's projection weights.
//!
//! # The partial-block rule
//!
//! Sequences need not be multiples of the block size, and a chunk
//! (`q_len < k_len`) may start mid-block. A query-block row's maximum runs over
//! the block's **valid** query rows only (positions `q_start..k_len` that fall
//! in the block), and each query's key-block maximum over the **valid keys**
//! only (positions `< k_len` and `<= the query's position`, the causal rule).
//! Nothing outside the sequence contributes, and every row has at least one
//! valid query whose diagonal key block has a positive probability, so every
//! row normalises. (Upstream's Triton kernel does not define this case: its
//! block pointers are not boundary-checked, so rows past the sequence's end
//! read whatever memory follows Q and enter the last row's maximum. Upstream
//! trains only on sequences of a multiple of 64, where the two agree.)
//!
//! # Normalisation of the loss (upstream's)
//!
//! Upstream (`modeling_llama_seerattn.py`, training branch) computes, per layer,
//! `KLDivLoss()(log_softmax(logits[:, :, nb//4:]), target[:, :, nb//4:])` with
//! torch's default `reduction='mean'`: the sum of `t * (ln t - log q)` over every
//! element of the `[batch, heads, nb - nb//4, nb]` tensors, divided by their
//! count. Entries above the diagonal have target 0 and contribute 0 (torch's
//! `xlogy`), but they count in the divisor. Upstream trains with one sequence
//! per device and averages gradients over devices and accumulation steps, so
//! a batch's loss is the **mean over sequences** of
//!
//! ```text
//! loss_s = Σ_{h, i >= skip_s, j <= i} t_hij (ln t_hij - log_softmax(z_hi)_j)
//!          / (num_q_heads * kept_rows_s * k_blocks_s)
//! ```
//!
//! with `skip_s = floor(k_blocks_s * skip_fraction)` (upstream: `nb // 4`,
//! `skip_fraction = 0.25`; rows are numbered by absolute block, so a chunk's
//! rows inside the first quarter of its sequence are skipped) and `kept_rows_s`
//! the sequence's rows at or past `skip_s`. A sequence with no kept row (a
//! chunk entirely inside the first quarter) contributes 0. The functions here
//! return per-sequence losses and the gradient of their **sum**; the trainer
//! ([`crate::distill`]) divides by the number of sequences, sums layers and
//! applies upstream's loss scale.
//!
//! # The backward (also in `docs/distillation.md`)
//!
//! For query head `h`, absolute query block `i`, key block `j`, with `P_q`,
//! `P_k` the pooled (constant) inputs, `R_n` the NeoX RoPE rotation at
//! position `64 n` (orthogonal), `s = 1/sqrt(gate_hidden)`, `ph` the K
//! projection head of `h` (`h` itself for the released layout, `h / group`
//! with a Q projection) and `kv = h / group`:
//!
//! ```text
//! k_lin[ph, j]  = P_k[j, kv] · W_k[ph]            k_gate = R_j k_lin
//! q_lin[h, i]   = P_q[i, h] · W_q[h]   (or P_q)   q_gate = R_i q_lin
//! z[h, i, j]    = s · q_gate[h, i] · k_gate[ph, j]            (j <= i)
//! L_s           = Σ_{h, kept i} Σ_j t_j (ln t_j - z_j + logsumexp_j z) / N_s
//!
//! g[h, i, j]      = dL/dz   = (softmax(z_hi)_j · Σ_j' t_j' - t_j) / N_s   (0 on skipped rows)
//! dk_gate[ph, j]  = s · Σ_{h -> ph} Σ_i g[h, i, j] q_gate[h, i]
//! dq_gate[h, i]   = s · Σ_j g[h, i, j] k_gate[ph, j]
//! dk_lin          = R_jᵀ dk_gate        (the inverse rotation, angle negated)
//! dq_lin          = R_iᵀ dq_gate
//! dW_k[ph]       += P_k[j, kv]ᵀ ⊗ dk_lin   summed over j, sequences
//! dW_q[h]        += P_q[i, h]ᵀ ⊗ dq_lin    summed over i, sequences (Q-projection gates)
//! ```
//!
//! `Σ t = 1` makes `g = softmax - t` for a normalised target; the general
//! form keeps the gradient exact for a target whose rows were rounded (bf16).
//!
//! Precision: the target's scores, log-sum-exps and maxima are f64, stored as
//! f32 (what a kernel would store). The gate forward and backward run in f64
//! from f32 pooled inputs and f32 weights, so that finite differences can
//! check the gradient to many digits; the logits equal
//! [`crate::reference::scores::gate_scores`]'s (f32) up to f32 rounding.

use crate::batch::{Batch, SeqBlocks};
use crate::config::GateConfig;
use crate::gate::LayerWeights;
use crate::mask::MaskLayout;
use crate::reference::pooling::{pool_keys, pool_queries};
use crate::tensor::Tensor3;

/// The distillation target of one layer for a batch, stored like
/// [`crate::reference::scores::GateScores`]: row `r` (see [`MaskLayout`]:
/// sequence, query head, query block) keeps key block `j <= q_block` at
/// `values[row_offsets[r] + j]`.
#[derive(Clone, Debug, PartialEq)]
pub struct DistillTarget {
    pub layout: MaskLayout,
    pub row_offsets: Vec<i64>,
    /// Max-pooled causal attention probabilities, each row summing to 1.
    pub values: Vec<f32>,
}

impl DistillTarget {
    /// Target of row `r`, one value per causal key block.
    pub fn row(&self, r: usize) -> &[f32] {
        let id = self.layout.row_id(r);
        let lo = self.row_offsets[r] as usize;
        &self.values[lo..lo + id.q_block + 1]
    }
}

/// The distillation target of one layer (see the module docs, and its
/// partial-block rule). `q: [total_q, num_q_heads, d]` and
/// `k: [total_k, num_kv_heads, d]` are the **post-RoPE** queries and keys the
/// attention sees; `softmax_scale` is the attention's (usually `1/sqrt(d)`).
///
/// Arguments are trusted (the public entry [`crate::distill::distill_target`]
/// validates them): shapes consistent with `batch`, `num_kv_heads` dividing
/// `num_q_heads`, `block_size > 0`.
pub fn distill_target(q: &Tensor3, k: &Tensor3, batch: &Batch, block_size: usize, softmax_scale: f64) -> DistillTarget {
    let [_, hq, d] = q.shape();
    let hkv = k.shape()[1];
    let group = hq / hkv;
    let layout = MaskLayout::new(batch, hq, block_size).expect("callers validate the batch first");
    let row_offsets = layout.row_offsets();
    let mut values = vec![0.0f32; layout.index_capacity()];
    for (s, seq) in batch.seqs(block_size).enumerate() {
        for kv in 0..hkv {
            // Every query head of the group reads these keys: convert once.
            let keys: Vec<f64> =
                (0..seq.k_len * d).map(|x| f64::from(k.get(seq.k_offset + x / d, kv, x % d))).collect();
            for h in kv * group..(kv + 1) * group {
                let pooled = max_pooled_probs(q, &keys, &seq, h, block_size, softmax_scale);
                for i in 0..seq.q_blocks {
                    let row = &pooled[i * seq.k_blocks..i * seq.k_blocks + seq.first_q_block + i + 1];
                    let sum: f64 = row.iter().sum();
                    let lo = row_offsets[layout.row(s, h, i)] as usize;
                    for (out, &p) in values[lo..lo + row.len()].iter_mut().zip(row) {
                        *out = (p / sum) as f32;
                    }
                }
            }
        }
    }
    DistillTarget { layout, row_offsets, values }
}

/// For query head `h` of one sequence: `[q_blocks, k_blocks]` (row-major) of
/// the maximum causal softmax probability over each block pair's valid
/// entries, not yet normalised. `keys` is the sequence's K of the head's KV
/// head, f64, `[k_len, d]`.
fn max_pooled_probs(
    q: &Tensor3,
    keys: &[f64],
    seq: &SeqBlocks,
    h: usize,
    block: usize,
    softmax_scale: f64,
) -> Vec<f64> {
    let d = q.shape()[2];
    let mut pooled = vec![0.0f64; seq.q_blocks * seq.k_blocks];
    let mut scores = vec![0.0f64; seq.k_len];
    let mut query = vec![0.0f64; d];
    for t in 0..seq.q_len {
        let pos = seq.q_start + t;
        for (x, qx) in query.iter_mut().enumerate() {
            *qx = f64::from(q.get(seq.q_offset + t, h, x));
        }
        // Scores of the causal keys 0..=pos, their maximum and log-sum-exp
        // (two plain passes, as the attention reference does).
        let visible = &mut scores[..=pos];
        for (c, sc) in visible.iter_mut().enumerate() {
            let key = &keys[c * d..(c + 1) * d];
            *sc = softmax_scale * query.iter().zip(key).map(|(a, b)| a * b).sum::<f64>();
        }
        let max = visible.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + visible.iter().map(|&sc| (sc - max).exp()).sum::<f64>().ln();
        // The largest probability in a key block is exp(largest score - lse):
        // one exponential per block instead of one per key.
        let row = &mut pooled[(pos / block - seq.first_q_block) * seq.k_blocks..];
        for (j, cell) in row[..=pos / block].iter_mut().enumerate() {
            let keys_in_block = &visible[j * block..((j + 1) * block).min(pos + 1)];
            let block_max = keys_in_block.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            *cell = cell.max((block_max - lse).exp());
        }
    }
    pooled
}

/// What the loss leaves out and how it is weighted (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossParams {
    /// Rows with absolute query block `< floor(k_blocks * skip_fraction)` are
    /// left out of the loss. Upstream: 0.25 (the first quarter, "for training
    /// stability"). In `[0, 1)`.
    pub skip_fraction: f64,
}

impl Default for LossParams {
    /// Upstream's choice: skip the first quarter.
    fn default() -> Self {
        LossParams { skip_fraction: 0.25 }
    }
}

impl LossParams {
    /// First kept absolute query-block row of a sequence of `k_blocks` key blocks.
    pub fn first_kept_block(&self, k_blocks: usize) -> usize {
        // k_blocks < 2^31 and skip_fraction < 1: exact enough, and exactly
        // upstream's `nb // 4` for 0.25 (a power of two).
        (k_blocks as f64 * self.skip_fraction).floor() as usize
    }
}

/// Gradients of a layer's gate projections, f64, in the weights' layout
/// (`[heads, in, gate_hidden]` row-major, see [`LayerWeights`]).
#[derive(Clone, Debug, PartialEq)]
pub struct LayerGrads {
    /// d loss / d `mask_linear_k`: `[k_proj_heads, k_in, gate_hidden]`.
    pub k_proj: Vec<f64>,
    /// d loss / d `mask_linear_q` for gates that have one: `[num_q_heads, q_in, gate_hidden]`.
    pub q_proj: Option<Vec<f64>>,
}

impl LayerGrads {
    /// Zero gradients shaped for `config`.
    pub fn zeros(config: &GateConfig) -> Self {
        LayerGrads {
            k_proj: vec![0.0; config.k_weight_shape().iter().product()],
            q_proj: config.q_weight_shape().map(|s| vec![0.0; s.iter().product()]),
        }
    }

    /// Set every gradient to zero (after an optimizer step).
    pub fn clear(&mut self) {
        self.k_proj.fill(0.0);
        if let Some(q) = &mut self.q_proj {
            q.fill(0.0);
        }
    }

    /// Sum of squares of every element (for gradient-norm clipping).
    pub fn squared_norm(&self) -> f64 {
        let sq = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>();
        sq(&self.k_proj) + self.q_proj.as_deref().map_or(0.0, sq)
    }
}

/// Per-sequence losses of one layer (see the module docs for the normalisation).
#[derive(Clone, Debug, PartialEq)]
pub struct SeqLosses {
    /// `loss_s` of each sequence of the batch, in batch order.
    pub per_seq: Vec<f64>,
}

impl SeqLosses {
    /// Sum over the batch's sequences.
    pub fn sum(&self) -> f64 {
        self.per_seq.iter().sum()
    }
    /// Mean over the batch's sequences: upstream's loss of the batch.
    pub fn mean(&self) -> f64 {
        self.sum() / self.per_seq.len() as f64
    }
}

/// Per-sequence distillation losses of one layer's gate (no gradient). As
/// [`distill_loss_and_grad`].
#[allow(clippy::too_many_arguments)]
pub fn distill_loss(
    config: &GateConfig,
    weights: &LayerWeights,
    q_nope: &Tensor3,
    k_nope: &Tensor3,
    batch: &Batch,
    target: &DistillTarget,
    params: &LossParams,
) -> SeqLosses {
    loss_and_grad(config, weights, q_nope, k_nope, batch, target, params, None, ChainFault::None)
}

/// Per-sequence distillation losses of one layer's gate, and the gradient of
/// their **sum** with respect to the layer's weights, **added** into `grads`
/// (so calls accumulate over batches; the caller divides by the number of
/// sequences for upstream's mean).
///
/// `q_nope: [total_q, num_q_heads, head_dim]` and
/// `k_nope: [total_k, num_kv_heads, head_dim]` are the gate's pre-RoPE inputs,
/// `target` the layer's [`distill_target`] for the same `batch` and
/// `config.num_q_heads`. Arguments are trusted (validated by
/// [`crate::distill`]); `grads` must be shaped by [`LayerGrads::zeros`].
#[allow(clippy::too_many_arguments)]
pub fn distill_loss_and_grad(
    config: &GateConfig,
    weights: &LayerWeights,
    q_nope: &Tensor3,
    k_nope: &Tensor3,
    batch: &Batch,
    target: &DistillTarget,
    params: &LossParams,
    grads: &mut LayerGrads,
) -> SeqLosses {
    loss_and_grad(config, weights, q_nope, k_nope, batch, target, params, Some(grads), ChainFault::None)
}

/// A deliberately broken link of the backward chain. Production code passes
/// `None` only (the other variants are constructed by the tests alone); the
/// tests inject each fault to show that the finite-difference comparison
/// catches it (a check that could not fail would prove nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))]
enum ChainFault {
    None,
    /// Rotate d k_gate forward (R_j) instead of by its transpose.
    RopeNotTransposed,
    /// Same on the Q side.
    QRopeNotTransposed,
    /// Forget the 1/sqrt(gate_hidden) of the logits.
    NoLogitScale,
    /// d z = -t: drop the softmax (log-sum-exp) term.
    NoSoftmaxTerm,
    /// Only the first query head of a K-projection head feeds its gradient.
    FirstHeadOfGroupOnly,
    /// Pooled K of KV head 0 for every projection head.
    WrongKvHead,
    /// Back-propagate through the skipped rows too.
    GradOnSkippedRows,
}

/// NeoX half-split RoPE at `position` in f64: rotation by `+angle`, or by
/// `-angle` (its transpose, the inverse) when `transpose`.
fn rope_f64(x: &mut [f64], inv_freq: &[f64], position: usize, transpose: bool) {
    let half = x.len() / 2;
    for (i, &f) in inv_freq.iter().enumerate().take(half) {
        let angle = position as f64 * f;
        let (sin, cos) = angle.sin_cos();
        let sin = if transpose { -sin } else { sin };
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * cos - b * sin;
        x[i + half] = b * cos + a * sin;
    }
}

/// `x · w` for `w: [x.len(), out.len()]` row-major, f64.
fn project_f64(x: &[f64], w: &[f32], out: &mut [f64]) {
    let width = out.len();
    out.fill(0.0);
    for (i, &xi) in x.iter().enumerate() {
        for (o, &wv) in out.iter_mut().zip(&w[i * width..(i + 1) * width]) {
            *o += xi * f64::from(wv);
        }
    }
}

/// `dw += x ⊗ dy` for `dw: [x.len(), dy.len()]` row-major.
fn add_outer(dw: &mut [f64], x: &[f64], dy: &[f64]) {
    let width = dy.len();
    for (i, &xi) in x.iter().enumerate() {
        for (g, &d) in dw[i * width..(i + 1) * width].iter_mut().zip(dy) {
            *g += xi * d;
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn loss_and_grad(
    config: &GateConfig,
    weights: &LayerWeights,
    q_nope: &Tensor3,
    k_nope: &Tensor3,
    batch: &Batch,
    target: &DistillTarget,
    params: &LossParams,
    mut grads: Option<&mut LayerGrads>,
    fault: ChainFault,
) -> SeqLosses {
    debug_assert_eq!(target.layout, MaskLayout::new(batch, config.num_q_heads, config.block_size).unwrap());
    let inv_freq = config.rope.inv_freq(config.gate_hidden);
    let per_seq = batch
        .seqs(config.block_size)
        .enumerate()
        .map(|(s, seq)| {
            let grads = grads.as_deref_mut();
            sequence_loss_and_grad(config, weights, q_nope, k_nope, &seq, s, target, params, &inv_freq, grads, fault)
        })
        .collect();
    SeqLosses { per_seq }
}

#[allow(clippy::too_many_arguments)]
fn sequence_loss_and_grad(
    config: &GateConfig,
    weights: &LayerWeights,
    q_nope: &Tensor3,
    k_nope: &Tensor3,
    seq: &SeqBlocks,
    s: usize,
    target: &DistillTarget,
    params: &LossParams,
    inv_freq: &[f64],
    grads: Option<&mut LayerGrads>,
    fault: ChainFault,
) -> f64 {
    let block = config.block_size;
    let hidden = config.gate_hidden;
    let (hq, hkv, group) = (config.num_q_heads, config.num_kv_heads, config.group_size());
    let (q_in, k_in) = (config.q_in(), config.k_in());
    let k_heads = config.k_proj_heads();
    let per_q_head_k = k_heads == hq;
    let proj_head = |h: usize| if per_q_head_k { h } else { h / group };
    let kv_of_proj = |ph: usize| if per_q_head_k { ph / group } else { ph };
    let kb = seq.k_blocks;
    let logit_scale = 1.0 / (hidden as f64).sqrt();
    let logit_scale_back = if fault == ChainFault::NoLogitScale { 1.0 } else { logit_scale };

    let skip = params.first_kept_block(kb);
    let first_kept_row = skip.saturating_sub(seq.first_q_block).min(seq.q_blocks);
    let kept_rows = seq.q_blocks - first_kept_row;
    if kept_rows == 0 {
        return 0.0;
    }
    // upstream's 'mean' divides by every element of the kept [heads, rows, nb] map.
    let norm = (hq * kept_rows * kb) as f64;

    let to_f64 = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<f64>>();
    let pooled_q = to_f64(pool_queries(q_nope, seq, block, &config.gate_type.q_pools));
    let pooled_k = to_f64(pool_keys(k_nope, seq, block, &config.gate_type.k_pools));
    let pk = |j: usize, kv: usize| &pooled_k[(j * hkv + kv) * k_in..(j * hkv + kv + 1) * k_in];
    let pq = |i: usize, h: usize| &pooled_q[(i * hq + h) * q_in..(i * hq + h + 1) * q_in];

    // Forward: rotated gate K [k_heads, kb, hidden] and gate Q [hq, q_blocks, hidden].
    let mut k_gate = vec![0.0f64; k_heads * kb * hidden];
    for ph in 0..k_heads {
        let w = &weights.k_proj[ph * k_in * hidden..(ph + 1) * k_in * hidden];
        for j in 0..kb {
            let out = &mut k_gate[(ph * kb + j) * hidden..(ph * kb + j + 1) * hidden];
            project_f64(pk(j, kv_of_proj(ph)), w, out);
            rope_f64(out, inv_freq, j * block, false);
        }
    }
    let mut q_gate = vec![0.0f64; hq * seq.q_blocks * hidden];
    for h in 0..hq {
        for i in 0..seq.q_blocks {
            let out = &mut q_gate[(h * seq.q_blocks + i) * hidden..(h * seq.q_blocks + i + 1) * hidden];
            match &weights.q_proj {
                Some(wq) => project_f64(pq(i, h), &wq[h * q_in * hidden..(h + 1) * q_in * hidden], out),
                None => out.copy_from_slice(pq(i, h)),
            }
            rope_f64(out, inv_freq, (seq.first_q_block + i) * block, false);
        }
    }
    let kg = |ph: usize, j: usize| &k_gate[(ph * kb + j) * hidden..(ph * kb + j + 1) * hidden];
    let qg = |h: usize, i: usize| &q_gate[(h * seq.q_blocks + i) * hidden..(h * seq.q_blocks + i + 1) * hidden];

    // Loss and d loss / d logits, row by row.
    let mut loss = 0.0f64;
    let mut dk_gate = vec![0.0f64; k_heads * kb * hidden];
    let mut dq_gate = vec![0.0f64; hq * seq.q_blocks * hidden];
    let mut logits = Vec::with_capacity(kb);
    for h in 0..hq {
        let ph = proj_head(h);
        for i in 0..seq.q_blocks {
            let q_block = seq.first_q_block + i;
            let kept = i >= first_kept_row;
            let backprop = kept || fault == ChainFault::GradOnSkippedRows;
            if !backprop {
                continue;
            }
            logits.clear();
            logits.extend((0..=q_block).map(|j| logit_scale * dot(qg(h, i), kg(ph, j))));
            let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + logits.iter().map(|z| (z - max).exp()).sum::<f64>().ln();
            let t = target.row(target.layout.row(s, h, i));
            let t_mass: f64 = t.iter().map(|&x| f64::from(x)).sum();
            if kept {
                // t ln t is 0 where t is 0 (torch's xlogy): such entries add nothing.
                loss += t
                    .iter()
                    .zip(&logits)
                    .filter(|(&tj, _)| tj > 0.0)
                    .map(|(&tj, &z)| f64::from(tj) * (f64::from(tj).ln() - (z - lse)))
                    .sum::<f64>();
            }
            if grads.is_none() {
                continue;
            }
            for (j, &z) in logits.iter().enumerate() {
                let softmax_term = (z - lse).exp() * t_mass;
                let softmax_term = if fault == ChainFault::NoSoftmaxTerm { 0.0 } else { softmax_term };
                let g = (softmax_term - f64::from(t[j])) / norm * logit_scale_back;
                if !(fault == ChainFault::FirstHeadOfGroupOnly && h % group != 0) {
                    let dk = &mut dk_gate[(ph * kb + j) * hidden..(ph * kb + j + 1) * hidden];
                    dk.iter_mut().zip(qg(h, i)).for_each(|(d, &q)| *d += g * q);
                }
                let dq = &mut dq_gate[(h * seq.q_blocks + i) * hidden..(h * seq.q_blocks + i + 1) * hidden];
                dq.iter_mut().zip(kg(ph, j)).for_each(|(d, &k)| *d += g * k);
            }
        }
    }
    let Some(grads) = grads else { return loss / norm };

    // Undo RoPE (its transpose), then dW = pooledᵀ ⊗ d(projection output).
    let (k_transpose, q_transpose) = (fault != ChainFault::RopeNotTransposed, fault != ChainFault::QRopeNotTransposed);
    for ph in 0..k_heads {
        let kv = if fault == ChainFault::WrongKvHead { 0 } else { kv_of_proj(ph) };
        let dw = &mut grads.k_proj[ph * k_in * hidden..(ph + 1) * k_in * hidden];
        for j in 0..kb {
            let dk = &mut dk_gate[(ph * kb + j) * hidden..(ph * kb + j + 1) * hidden];
            rope_f64(dk, inv_freq, j * block, k_transpose);
            add_outer(dw, pk(j, kv), dk);
        }
    }
    if let Some(dwq_all) = grads.q_proj.as_mut() {
        for h in 0..hq {
            let dw = &mut dwq_all[h * q_in * hidden..(h + 1) * q_in * hidden];
            for i in 0..seq.q_blocks {
                let dq = &mut dq_gate[(h * seq.q_blocks + i) * hidden..(h * seq.q_blocks + i + 1) * hidden];
                rope_f64(dq, inv_freq, (seq.first_q_block + i) * block, q_transpose);
                add_outer(dw, pq(i, h), dq);
            }
        }
    }
    loss / norm
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{GateType, RopeConfig, RopeScaling, SparsityMethod};
    use crate::reference::scores::gate_scores;
    use crate::tensor::{DType, Layout3};

    /// splitmix64 for test data.
    struct Rng(u64);

    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
            lo + (hi - lo) * ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
        }
    }

    fn f32_bytes(n: usize, rng: &mut Rng, amplitude: f32) -> Vec<u8> {
        (0..n).flat_map(|_| rng.uniform(-amplitude, amplitude).to_le_bytes()).collect()
    }

    fn view<'a>(bytes: &'a [u8], tokens: usize, heads: usize, dim: usize) -> Tensor3<'a> {
        Tensor3::new("t", bytes, DType::F32, Layout3::contiguous(tokens, heads, dim)).unwrap()
    }

    /// A small gate config; `gate_type` and `force_double` decide whether it has a Q projection.
    fn config(hq: usize, hkv: usize, d: usize, hidden: usize, gate_type: &str, force_double: bool) -> GateConfig {
        let c = GateConfig {
            num_layers: 1,
            num_q_heads: hq,
            num_kv_heads: hkv,
            head_dim: d,
            gate_hidden: hidden,
            block_size: 64,
            gate_type: GateType::parse(gate_type).unwrap(),
            force_double,
            rope: RopeConfig {
                theta: 10000.0,
                scaling: RopeScaling::Llama3 {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 256.0,
                },
            },
            sparsity_method: SparsityMethod::Threshold,
            threshold: 0.1,
            nz_ratio: 1.0,
            last_block_dense: false,
        };
        c.validate().unwrap();
        c
    }

    /// One layer's inputs, weights and target on random data.
    struct Problem {
        name: &'static str,
        config: GateConfig,
        batch: Batch,
        weights: LayerWeights,
        q_nope: Vec<u8>,
        k_nope: Vec<u8>,
        target: DistillTarget,
    }

    impl Problem {
        fn new(name: &'static str, config: GateConfig, lens: &[(usize, usize)], seed: u64) -> Problem {
            let mut rng = Rng(seed);
            let batch = Batch::from_lens(lens).unwrap();
            let (hq, hkv, d) = (config.num_q_heads, config.num_kv_heads, config.head_dim);
            let (tq, tk) = (batch.total_q(), batch.total_k());
            let q_nope = f32_bytes(tq * hq * d, &mut rng, 1.0);
            let k_nope = f32_bytes(tk * hkv * d, &mut rng, 1.0);
            // Post-RoPE inputs of the target: independent random data, scaled
            // so the attention is peaked enough to give rows some structure.
            let q = f32_bytes(tq * hq * d, &mut rng, 2.0);
            let k = f32_bytes(tk * hkv * d, &mut rng, 2.0);
            let target =
                distill_target(&view(&q, tq, hq, d), &view(&k, tk, hkv, d), &batch, 64, 1.0 / (d as f64).sqrt());
            // Weights on a grid of 2^-12 (|w| < 1), so that w ± 2^-8 and
            // w ± 2^-9 are exact in f32 and the difference quotients'
            // denominators are exactly the steps.
            let mut grid = |shape: [usize; 3]| -> Vec<f32> {
                (0..shape.iter().product::<usize>())
                    .map(|_| (rng.uniform(-0.6, 0.6) * 4096.0).round() / 4096.0)
                    .collect()
            };
            let weights =
                LayerWeights { k_proj: grid(config.k_weight_shape()), q_proj: config.q_weight_shape().map(&mut grid) };
            Problem { name, config, batch, weights, q_nope, k_nope, target }
        }

        fn inputs(&self) -> (Tensor3<'_>, Tensor3<'_>) {
            let c = &self.config;
            (
                view(&self.q_nope, self.batch.total_q(), c.num_q_heads, c.head_dim),
                view(&self.k_nope, self.batch.total_k(), c.num_kv_heads, c.head_dim),
            )
        }

        fn loss(&self, weights: &LayerWeights) -> f64 {
            let (q, k) = self.inputs();
            distill_loss(&self.config, weights, &q, &k, &self.batch, &self.target, &LossParams::default()).sum()
        }

        fn gradient(&self, fault: ChainFault) -> LayerGrads {
            let (q, k) = self.inputs();
            let mut g = LayerGrads::zeros(&self.config);
            let params = LossParams::default();
            loss_and_grad(&self.config, &self.weights, &q, &k, &self.batch, &self.target, &params, Some(&mut g), fault);
            g
        }

        /// Worst `|analytic - numeric| / max|analytic|` over a spread of
        /// elements of every weight tensor (every 7th element: all heads,
        /// rows and columns are visited), the numeric derivative being
        /// Richardson's extrapolation of central differences at steps
        /// 2^-8 and 2^-9.
        fn worst_error(&self, grads: &LayerGrads) -> f64 {
            let central = |which: usize, idx: usize, step: f32| {
                let mut plus = self.weights.clone();
                let mut minus = self.weights.clone();
                fn slot(w: &mut LayerWeights, which: usize, idx: usize) -> &mut f32 {
                    if which == 0 {
                        &mut w.k_proj[idx]
                    } else {
                        &mut w.q_proj.as_mut().unwrap()[idx]
                    }
                }
                *slot(&mut plus, which, idx) += step;
                *slot(&mut minus, which, idx) -= step;
                (self.loss(&plus) - self.loss(&minus)) / (2.0 * f64::from(step))
            };
            let mut worst = 0.0f64;
            let tensors: Vec<&[f64]> =
                [Some(grads.k_proj.as_slice()), grads.q_proj.as_deref()].into_iter().flatten().collect();
            let scale = tensors.iter().flat_map(|t| t.iter()).fold(0.0f64, |m, g| m.max(g.abs()));
            assert!(scale > 0.0, "{}: zero gradient", self.name);
            for (which, analytic) in tensors.iter().enumerate() {
                for idx in (0..analytic.len()).step_by(7) {
                    let h = 1.0 / 256.0;
                    let numeric = (4.0 * central(which, idx, h / 2.0) - central(which, idx, h)) / 3.0;
                    worst = worst.max((analytic[idx] - numeric).abs() / scale);
                }
            }
            worst
        }
    }

    fn problems() -> Vec<Problem> {
        vec![
            // GQA, the released layout (K projection per query head), one
            // sequence of 8 blocks with a partial last block (492 = 7*64 + 44).
            // 8 blocks skip 2 rows: row 0 alone would prove nothing about the
            // skip, its gradient is 0 (one causal block: softmax 1 = target).
            Problem::new("gqa4_partial", config(4, 2, 8, 8, "Qavg_Kmaxminavg", false), &[(492, 492)], 1),
            // MQA with a Q projection (two Q pools, gate_hidden != head_dim):
            // K projected per KV head; a chunk starting mid-block, and a
            // second sequence in the batch.
            Problem::new("mqa_qproj_chunk", config(4, 1, 8, 6, "Qmaxavg_Kmaxmin", false), &[(130, 330), (200, 200)], 2),
            // MHA with force_double: Q and K projections with equal widths; a
            // one-block sequence and one of 257 tokens (a 1-token last block).
            Problem::new("mha_double_varlen", config(2, 2, 8, 8, "Qavg_Kmaxminavg", true), &[(64, 64), (257, 257)], 3),
        ]
    }

    // Tolerance of the gradient check, relative to the largest gradient
    // element. The extrapolated difference quotient errs by O(h^4) ≈ 4e-10
    // times the loss's fifth derivative (the loss is a smooth function of
    // products of weights with O(1) inputs), plus f64 rounding of the loss,
    // about 1e-16 * (number of summed terms, < 1e4) / h ≈ 3e-10 absolute.
    // Gradients here are 1e-3..1e-1 in size, so 1e-6 of the largest leaves
    // a margin of 10^2..10^3 over both, while any wrong link of the chain
    // gives errors of the order of the gradient itself (checked below).
    const GRAD_TOLERANCE: f64 = 1e-6;

    #[test]
    fn gradient_matches_finite_differences() {
        for p in problems() {
            let worst = p.worst_error(&p.gradient(ChainFault::None));
            println!("{}: worst gradient error {worst:.2e} of the largest element", p.name);
            assert!(worst < GRAD_TOLERANCE, "{}: gradient off by {worst:e} (relative to its largest element)", p.name);
        }
    }

    #[test]
    fn every_broken_link_of_the_chain_fails_the_same_comparison() {
        for p in problems() {
            let c = &p.config;
            let mut faults = vec![ChainFault::RopeNotTransposed, ChainFault::NoLogitScale, ChainFault::NoSoftmaxTerm];
            if p.batch.seqs(64).any(|s| LossParams::default().first_kept_block(s.k_blocks) > s.first_q_block + 1) {
                // Some sequence skips a row with more than one causal block.
                faults.push(ChainFault::GradOnSkippedRows);
            }
            if c.group_size() > 1 {
                faults.push(ChainFault::FirstHeadOfGroupOnly);
            }
            if c.num_kv_heads > 1 {
                faults.push(ChainFault::WrongKvHead);
            }
            if c.has_q_proj() {
                faults.push(ChainFault::QRopeNotTransposed);
            }
            for fault in faults {
                let worst = p.worst_error(&p.gradient(fault));
                println!("{} with {fault:?}: error {worst:.2e}", p.name);
                assert!(worst > 1e3 * GRAD_TOLERANCE, "{}: the check misses {fault:?} (error {worst:e})", p.name);
            }
        }
    }

    #[test]
    fn gradient_accumulates_and_loss_matches_f32_reference_scores() {
        for p in problems() {
            let (q, k) = p.inputs();
            let params = LossParams::default();
            let once = p.gradient(ChainFault::None);
            let mut twice = once.clone();
            let losses = distill_loss_and_grad(&p.config, &p.weights, &q, &k, &p.batch, &p.target, &params, &mut twice);
            // Added into the accumulator, not overwritten: twice the
            // gradient, up to the rounding of the partial sums.
            let largest = once.k_proj.iter().fold(0.0f64, |m, g| m.max(g.abs()));
            for (a, b) in twice.k_proj.iter().zip(&once.k_proj) {
                assert!((a - 2.0 * b).abs() <= 1e-12 * largest, "{}: {a} is not twice {b}", p.name);
            }
            // The loss from the existing f32 gate scores (logits of
            // reference::scores), with the normalisation written out here.
            let gate = {
                let mut g = crate::Gate::new(p.config.clone()).unwrap();
                let kb: Vec<u8> = p.weights.k_proj.iter().flat_map(|x| x.to_le_bytes()).collect();
                let qb: Option<Vec<u8>> =
                    p.weights.q_proj.as_ref().map(|w| w.iter().flat_map(|x| x.to_le_bytes()).collect());
                let qs = p.config.q_weight_shape();
                g.set_layer_weights(
                    0,
                    crate::WeightRef { dtype: DType::F32, shape: p.config.k_weight_shape(), bytes: &kb },
                    qb.as_ref().map(|b| crate::WeightRef { dtype: DType::F32, shape: qs.unwrap(), bytes: b }),
                )
                .unwrap();
                g
            };
            let scores = gate_scores(&p.config, gate.layer(0).unwrap(), &q, &k, &p.batch);
            let mut per_seq = vec![0.0f64; p.batch.len()];
            for r in 0..scores.layout.rows() {
                let id = scores.layout.row_id(r);
                let seq = p.batch.seq(id.seq, 64);
                let skip = id.k_blocks / 4;
                if id.q_block < skip {
                    continue;
                }
                let kept = seq.q_blocks - skip.saturating_sub(seq.first_q_block);
                let z = scores.row_logits(r);
                let max = z.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
                let lse = max + z.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
                let kl: f64 =
                    p.target.row(r).iter().zip(z).map(|(&t, &x)| t as f64 * ((t as f64).ln() - (x as f64 - lse))).sum();
                per_seq[id.seq] += kl / (p.config.num_q_heads * kept * id.k_blocks) as f64;
            }
            for (s, (ours, theirs)) in losses.per_seq.iter().zip(&per_seq).enumerate() {
                assert!(
                    (ours - theirs).abs() <= 1e-5 * theirs.abs() + 1e-9,
                    "{} sequence {s}: loss {ours} vs {theirs} from the f32 gate scores",
                    p.name
                );
            }
            for (seq, &l) in p.batch.seqs(64).zip(&losses.per_seq) {
                // A one-block sequence has one causal block per row: softmax
                // and target are both 1 there, and the KL is exactly 0.
                if seq.k_blocks == 1 {
                    assert_eq!(l, 0.0, "{}", p.name);
                } else {
                    assert!(l > 0.0, "{}: a random gate has a positive KL", p.name);
                }
            }
        }
    }

    /// The target by its definition, written as plainly as possible: each
    /// query row's full softmax, then the maximum over every (row, key) of
    /// each block pair, then the row normalisation.
    fn target_by_definition(q: &Tensor3, k: &Tensor3, batch: &Batch, scale: f64) -> Vec<Vec<f64>> {
        let [_, hq, d] = q.shape();
        let group = hq / k.shape()[1];
        let mut rows = Vec::new();
        for seq in batch.seqs(64) {
            for h in 0..hq {
                for i in 0..seq.q_blocks {
                    let qb = seq.first_q_block + i;
                    let mut row = vec![0.0f64; qb + 1];
                    for pos in (qb * 64).max(seq.q_start)..((qb + 1) * 64).min(seq.k_len) {
                        let t = seq.q_offset + pos - seq.q_start;
                        let s: Vec<f64> = (0..=pos)
                            .map(|c| {
                                scale
                                    * (0..d)
                                        .map(|x| q.get(t, h, x) as f64 * k.get(seq.k_offset + c, h / group, x) as f64)
                                        .sum::<f64>()
                            })
                            .collect();
                        let z: f64 = s.iter().map(|v| v.exp()).sum();
                        for (c, v) in s.iter().enumerate() {
                            row[c / 64] = row[c / 64].max(v.exp() / z);
                        }
                    }
                    let sum: f64 = row.iter().sum();
                    rows.push(row.iter().map(|v| v / sum).collect());
                }
            }
        }
        rows
    }

    #[test]
    fn target_follows_its_definition_on_partial_blocks_and_chunks() {
        let mut rng = Rng(11);
        // Chunks starting mid-block and at a block start, a partial last
        // block, a sequence shorter than a block.
        let batch = Batch::from_lens(&[(150, 300), (129, 129), (40, 40), (64, 192)]).unwrap();
        let (hq, hkv, d) = (4, 2, 8);
        let q = f32_bytes(batch.total_q() * hq * d, &mut rng, 1.5);
        let k = f32_bytes(batch.total_k() * hkv * d, &mut rng, 1.5);
        let (qv, kv) = (view(&q, batch.total_q(), hq, d), view(&k, batch.total_k(), hkv, d));
        let target = distill_target(&qv, &kv, &batch, 64, 0.4);
        let want = target_by_definition(&qv, &kv, &batch, 0.4);
        assert_eq!(target.layout.rows(), want.len());
        for (r, want_row) in want.iter().enumerate() {
            let row = target.row(r);
            assert_eq!(row.len(), want_row.len());
            let sum: f64 = row.iter().map(|&x| x as f64).sum();
            assert!((sum - 1.0).abs() < 1e-6, "row {r} sums to {sum}");
            for (j, (&got, &w)) in row.iter().zip(want_row).enumerate() {
                assert!(got > 0.0, "row {r} block {j}: every causal block holds a visible key");
                assert!((got as f64 - w).abs() <= 1e-6 * w + 1e-12, "row {r} block {j}: {got} vs {w}");
            }
        }
    }
}
