//! Conformance of the gate against upstream SeerAttention (tests/data/upstream):
//! gate probabilities within bf16 tolerance, and masks equal except at the
//! near-threshold and top-k-tie entries the tests name and bound.

mod common;
use common::*;
use seerattn::reference::scores::GateScores;
use seerattn::*;

const CASES: [&str; 2] = ["gqa4_s1000", "mqa_s3072"];

fn load(case: &Case) -> (Gate, GateScores, Batch) {
    let gate = Gate::load_dir(&case.gate_dir()).unwrap();
    let batch = Batch::single(case.usize("seq_len")).unwrap();
    let scores =
        gate.scores(case.gate_layer(), &case.get("q_nope").view3(), &case.get("k_nope").view3(), &batch).unwrap();
    (gate, scores, batch)
}

/// Index of (head, q_block, k_block) in upstream's `[heads, blocks, blocks]` maps.
fn up_index(nb: usize, head: usize, i: usize, j: usize) -> usize {
    (head * nb + i) * nb + j
}

#[test]
fn gate_probabilities_match_upstream_within_bf16() {
    for name in CASES {
        let case = Case::load(name);
        let (_, scores, _) = load(&case);
        let up_probs = case.get("gate_probs").to_f32();
        let up_logits = case.get("gate_logits").to_f32();
        let nb = case.get("gate_probs").shape[1];
        let (mut worst_p, mut worst_l) = (0f32, 0f32);
        for r in 0..scores.layout.rows() {
            let id = scores.layout.row_id(r);
            for j in 0..=id.q_block {
                let u = up_index(nb, id.head, id.q_block, j);
                // Upstream rounds every intermediate to bf16 (8 bits of
                // mantissa): allow a few bf16 ulps, relative, plus a floor for
                // tiny probabilities.
                let dp = (scores.row_probs(r)[j] - up_probs[u]).abs() / up_probs[u].max(1e-3);
                let dl = (scores.row_logits(r)[j] - up_logits[u]).abs() / up_logits[u].abs().max(1.0);
                worst_p = worst_p.max(dp);
                worst_l = worst_l.max(dl);
            }
        }
        println!("{name}: worst relative prob error {worst_p:.4}, logit error {worst_l:.4}");
        assert!(worst_p < 0.02, "{name}: probability off by {worst_p} relative (tolerance 0.02 = ~5 bf16 ulps)");
        assert!(worst_l < 0.02, "{name}: logit off by {worst_l}");
        // And nothing above the diagonal leaks into upstream's probabilities.
        for h in 0..case.usize("num_q_heads") {
            for i in 0..nb {
                for j in i + 1..nb {
                    assert_eq!(up_probs[up_index(nb, h, i, j)], 0.0);
                }
            }
        }
    }
}

/// The library's mask of the case's gate layer under `params`.
fn mask_of(case: &Case, gate: &Gate, batch: &Batch, params: &MaskParams) -> BlockMask {
    let (q, k) = (case.get("q_nope").view3(), case.get("k_nope").view3());
    gate.compute_block_mask(case.gate_layer(), &q, &k, batch, params).unwrap()
}

fn dense(mask: &BlockMask, layout: &MaskLayout) -> Vec<u8> {
    let mut d = vec![0u8; layout.dense_len()];
    mask.as_ref().to_dense(layout, &mut d).unwrap();
    d
}

#[test]
fn threshold_masks_match_upstream_except_near_threshold() {
    for name in CASES {
        let case = Case::load(name);
        let (gate, scores, batch) = load(&case);
        let nb = case.get("gate_probs").shape[1];
        for t in case.meta["thresholds"].as_array().unwrap() {
            let t = t.as_f64().unwrap() as f32;
            let key = format!("mask_threshold_{}", format!("{t}").replace('.', "_"));
            let upstream = case.get(&key).bytes.clone();
            let params = MaskParams {
                method: SparsityMethod::Threshold,
                threshold: t,
                last_block_dense: true,
                empty_rows: EmptyRowPolicy::Empty,
                threshold_compare: ThresholdCompare::Bf16,
                ..MaskParams::from_config(gate.config())
            };
            let ours = mask_of(&case, &gate, &batch, &params);
            let ours = dense(&ours, &scores.layout);
            let mut near = 0;
            for r in 0..scores.layout.rows() {
                let id = scores.layout.row_id(r);
                for j in 0..nb {
                    let u = up_index(nb, id.head, id.q_block, j);
                    if ours[u] != upstream[u] {
                        // Only entries whose probability sits within the
                        // bf16 error of the threshold may disagree.
                        let p = scores.row_probs(r)[j];
                        assert!(
                            (p - t).abs() <= 0.02 * t,
                            "{name} {key}: head {} row {} block {j}: ours {} upstream {} with p = {p} far from {t}",
                            id.head,
                            id.q_block,
                            ours[u],
                            upstream[u]
                        );
                        near += 1;
                    }
                }
            }
            let causal = case.usize("num_q_heads") * nb * (nb + 1) / 2;
            println!("{name} {key}: {near} near-threshold differences of {causal} causal entries");
            assert!(near * 200 <= causal, "{name} {key}: {near} differences exceed 0.5% of entries");
        }
    }
}

#[test]
fn top_k_masks_match_upstream_except_ties() {
    for name in CASES {
        let case = Case::load(name);
        let (gate, scores, batch) = load(&case);
        let nb = case.get("gate_probs").shape[1];
        for r_val in case.meta["nz_ratios"].as_array().unwrap() {
            let ratio = r_val.as_f64().unwrap() as f32;
            for last_dense in [false, true] {
                let key = format!(
                    "mask_nz_{}{}",
                    format!("{ratio}").replace('.', "_"),
                    if last_dense { "_lastdense" } else { "" }
                );
                let upstream = case.get(&key).bytes.clone();
                let params = MaskParams {
                    method: SparsityMethod::NzRatio,
                    nz_ratio: ratio,
                    last_block_dense: last_dense,
                    ..MaskParams::from_config(gate.config())
                };
                let k = params.top_k(nb);
                let mask = mask_of(&case, &gate, &batch, &params);
                let ours = dense(&mask, &scores.layout);
                let mut ties = 0;
                for r in 0..scores.layout.rows() {
                    let id = scores.layout.row_id(r);
                    let logits = scores.row_logits(r);
                    let mut sorted = logits.to_vec();
                    sorted.sort_by(|a, b| b.total_cmp(a));
                    let kth = sorted[k.min(sorted.len()) - 1];
                    for j in id.q_block + 1..nb {
                        let u = up_index(nb, id.head, id.q_block, j);
                        assert!(ours[u] == 0 && upstream[u] == 0, "{name} {key}: block above the diagonal selected");
                    }
                    for (j, &l) in logits.iter().enumerate() {
                        let u = up_index(nb, id.head, id.q_block, j);
                        if ours[u] != upstream[u] {
                            // A disagreement is a tie at the k-th place, up to
                            // the bf16 error of upstream's logits.
                            assert!(
                                (l - kth).abs() <= 0.02 + 0.01 * kth.abs(),
                                "{name} {key}: head {} row {} block {j}: logit {l} is no tie with the k-th {kth}",
                                id.head,
                                id.q_block
                            );
                            ties += 1;
                        }
                    }
                    let want = if last_dense && id.q_block + 2 >= nb { id.q_block + 1 } else { k.min(id.q_block + 1) };
                    assert_eq!(
                        mask.as_ref().row(r).len(),
                        want,
                        "{name} {key}: row {r} keeps the wrong number of blocks"
                    );
                }
                let causal = case.usize("num_q_heads") * nb * (nb + 1) / 2;
                println!("{name} {key}: k = {k}, {ties} tie differences");
                assert!(ties * 100 <= causal, "{name} {key}: {ties} tie differences exceed 1% of entries");
            }
        }
    }
}
