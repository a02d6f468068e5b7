//! Sparse prefill through the public API, against oracles that share no code
//! with it: the dense causal attention of `reference::attention::naive`
//! (full masks) and a token-level masked attention written here (random
//! masks). Inputs come from a fixed-seed generator so that failures reproduce.

mod common;
use common::{decode, encode};
use seerattn::attention::{sparse_prefill, AttentionParams};
use seerattn::reference::attention::naive::dense_causal_attention;
use seerattn::{Batch, BlockMask, DType, Error, Layout3, MaskLayout, Tensor3, Tensor3Mut};

const BLOCK: usize = 64;

/// splitmix64: tiny, deterministic, good enough for test inputs.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[lo, hi)`, from the top 24 bits (exact in f32).
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
    }
}

/// One test geometry: per-sequence `(q_len, k_len)`, head counts, head dim, input dtype.
#[derive(Clone, Debug)]
struct Case {
    name: &'static str,
    lens: Vec<(usize, usize)>,
    hq: usize,
    hkv: usize,
    d: usize,
    dtype: DType,
}

/// The geometries every comparison runs over: lengths that are not
/// multiples of 64 and shorter than 64, chunked queries starting mid-block
/// and at a block boundary, several sequences per batch, GQA ratios 1, 4, 8,
/// head dims 64, 128, 256, bf16 and f16.
fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "one sequence of 100, MHA, d64, bf16",
            lens: vec![(100, 100)],
            hq: 2,
            hkv: 2,
            d: 64,
            dtype: DType::BF16,
        },
        Case {
            name: "one sequence of 40, GQA 4, d128, f16",
            lens: vec![(40, 40)],
            hq: 4,
            hkv: 1,
            d: 128,
            dtype: DType::F16,
        },
        Case {
            name: "chunks starting mid-block (130) and at a boundary (128), plus a short prefill; GQA 8, d64, bf16",
            lens: vec![(70, 200), (72, 200), (37, 37)],
            hq: 8,
            hkv: 1,
            d: 64,
            dtype: DType::BF16,
        },
        Case {
            name: "three sequences incl. a one-token chunk; GQA 4, d128, f16",
            lens: vec![(130, 130), (1, 64), (20, 150)],
            hq: 8,
            hkv: 2,
            d: 128,
            dtype: DType::F16,
        },
        Case {
            name: "one sequence of 65, d256, bf16",
            lens: vec![(65, 65)],
            hq: 1,
            hkv: 1,
            d: 256,
            dtype: DType::BF16,
        },
    ]
}

/// Contiguous random Q, K, V for a case.
struct Inputs {
    case: Case,
    batch: Batch,
    q: Vec<u8>,
    k: Vec<u8>,
    v: Vec<u8>,
}

impl Inputs {
    fn new(case: &Case, seed: u64) -> Self {
        let batch = Batch::from_lens(&case.lens).unwrap();
        let mut rng = Rng(seed);
        let mut random = |n: usize| encode(&(0..n).map(|_| rng.uniform(-2.0, 2.0)).collect::<Vec<_>>(), case.dtype);
        let q = random(batch.total_q() * case.hq * case.d);
        let k = random(batch.total_k() * case.hkv * case.d);
        let v = random(batch.total_k() * case.hkv * case.d);
        Inputs { case: case.clone(), batch, q, k, v }
    }

    fn views(&self) -> (Tensor3<'_>, Tensor3<'_>, Tensor3<'_>) {
        let c = &self.case;
        let (tq, tk) = (self.batch.total_q(), self.batch.total_k());
        (
            Tensor3::new("q", &self.q, c.dtype, Layout3::contiguous(tq, c.hq, c.d)).unwrap(),
            Tensor3::new("k", &self.k, c.dtype, Layout3::contiguous(tk, c.hkv, c.d)).unwrap(),
            Tensor3::new("v", &self.v, c.dtype, Layout3::contiguous(tk, c.hkv, c.d)).unwrap(),
        )
    }

    fn mask_layout(&self) -> MaskLayout {
        MaskLayout::new(&self.batch, self.case.hq, BLOCK).unwrap()
    }

    fn scale(&self) -> f32 {
        AttentionParams::for_head_dim(self.case.d).softmax_scale
    }

    /// Sparse prefill into a contiguous output of `out_dtype` that starts
    /// out as NaN (so unwritten elements show); returns output and lse.
    fn run(&self, mask: &BlockMask, out_dtype: DType) -> (Vec<f32>, Vec<f32>) {
        let (q, k, v) = self.views();
        let n = self.batch.total_q() * self.case.hq * self.case.d;
        let mut out_bytes = encode(&vec![f32::NAN; n], out_dtype);
        let shape = q.shape();
        let mut out =
            Tensor3Mut::new("out", &mut out_bytes, out_dtype, Layout3::contiguous(shape[0], shape[1], shape[2]))
                .unwrap();
        let mut lse = vec![f32::NAN; self.case.hq * self.batch.total_q()];
        let params = AttentionParams::for_head_dim(self.case.d);
        sparse_prefill(&q, &k, &v, &self.batch, mask.as_ref(), &params, &mut out, Some(&mut lse)).unwrap();
        (decode(&out_bytes, out_dtype), lse)
    }
}

/// A dense `u8` block map for the case, each block selected with probability `density`.
fn random_dense_map(layout: &MaskLayout, density: f32, rng: &mut Rng) -> Vec<u8> {
    (0..layout.dense_len()).map(|_| (rng.uniform(0.0, 1.0) < density) as u8).collect()
}

/// Attention with the mask applied token by token, from the dense block map
/// (not the index lists the library reads): key `j` is visible to the query
/// at position `p` when `j <= p` and the map selects `(block of p, block of j)`.
/// A query that sees nothing gets zeros and `lse = -inf` (the contract).
fn token_masked_attention(inputs: &Inputs, dense: &[u8]) -> (Vec<f64>, Vec<f64>) {
    let Case { hq, hkv, d, dtype, .. } = inputs.case;
    let (q, k, v) = (decode(&inputs.q, dtype), decode(&inputs.k, dtype), decode(&inputs.v, dtype));
    // Element (row, head, x) of a contiguous tensor with `heads` heads, as f64.
    let at = |t: &[f32], heads: usize, row: usize, head: usize, x: usize| t[(row * heads + head) * d + x] as f64;
    let layout = inputs.mask_layout();
    let total_q = inputs.batch.total_q();
    let mut out = vec![0.0f64; total_q * hq * d];
    let mut lse = vec![f64::NEG_INFINITY; hq * total_q];
    let scale = inputs.scale() as f64;
    let (mut q_base, mut k_base) = (0, 0);
    for (s, &(q_len, k_len)) in inputs.case.lens.iter().enumerate() {
        let first_pos = k_len - q_len;
        for h in 0..hq {
            let kvh = h / (hq / hkv);
            for i in 0..q_len {
                let p = first_pos + i;
                let map_row = layout.dense_row_start(s, h, p / BLOCK - first_pos / BLOCK);
                let visible: Vec<bool> = (0..k_len).map(|j| j <= p && dense[map_row + j / BLOCK] != 0).collect();
                let scores: Vec<(usize, f64)> = (0..k_len)
                    .filter(|&j| visible[j])
                    .map(|j| {
                        let dot: f64 =
                            (0..d).map(|x| at(&q, hq, q_base + i, h, x) * at(&k, hkv, k_base + j, kvh, x)).sum();
                        (j, scale * dot)
                    })
                    .collect();
                if scores.is_empty() {
                    continue;
                }
                let max = scores.iter().map(|&(_, sc)| sc).fold(f64::NEG_INFINITY, f64::max);
                let denom: f64 = scores.iter().map(|&(_, sc)| (sc - max).exp()).sum();
                for x in 0..d {
                    out[((q_base + i) * hq + h) * d + x] =
                        scores.iter().map(|&(j, sc)| (sc - max).exp() / denom * at(&v, hkv, k_base + j, kvh, x)).sum();
                }
                lse[h * total_q + q_base + i] = max + denom.ln();
            }
        }
        q_base += q_len;
        k_base += k_len;
    }
    (out, lse)
}

fn full_mask(layout: &MaskLayout) -> BlockMask {
    BlockMask::from_dense(layout, &vec![1u8; layout.dense_len()]).unwrap()
}

/// Output within f32 accumulation error (1e-4 of the largest magnitude)
/// plus the rounding of the output dtype (half an ulp: 2^-8 relative for
/// bf16, 2^-11 for f16).
fn assert_out_close(got: &[f32], want: &[f64], out_dtype: DType, what: &str) {
    assert_eq!(got.len(), want.len());
    let largest = want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
    let rounding = match out_dtype {
        DType::BF16 => 2f64.powi(-8),
        DType::F16 => 2f64.powi(-11),
        DType::F32 => 0.0,
    };
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = rounding * w.abs() + 1e-4 * largest;
        assert!((g as f64 - w).abs() <= tol, "{what}: out element {i} = {g}, want {w} (tolerance {tol})");
    }
}

fn assert_lse_close(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len());
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w == f64::NEG_INFINITY {
            assert_eq!(g, f32::NEG_INFINITY, "{what}: lse[{i}] of an empty row");
        } else {
            assert!((g as f64 - w).abs() <= 1e-5 * w.abs().max(1.0), "{what}: lse[{i}] = {g}, want {w}");
        }
    }
}

#[test]
fn full_causal_mask_matches_dense_oracle() {
    for (n, case) in cases().iter().enumerate() {
        let inputs = Inputs::new(case, 1000 + n as u64);
        let (q, k, v) = inputs.views();
        let oracle = dense_causal_attention(&q, &k, &v, &inputs.batch, inputs.scale() as f64);
        let mask = full_mask(&inputs.mask_layout());
        for out_dtype in [DType::F32, case.dtype] {
            let (out, _) = inputs.run(&mask, out_dtype);
            assert_out_close(&out, &oracle.out, out_dtype, &format!("{} (out {})", case.name, out_dtype.name()));
        }
    }
}

#[test]
fn lse_matches_dense_oracle() {
    for (n, case) in cases().iter().enumerate() {
        let inputs = Inputs::new(case, 2000 + n as u64);
        let (q, k, v) = inputs.views();
        let oracle = dense_causal_attention(&q, &k, &v, &inputs.batch, inputs.scale() as f64);
        let (_, lse) = inputs.run(&full_mask(&inputs.mask_layout()), DType::F32);
        assert_lse_close(&lse, &oracle.lse, case.name);
    }
}

#[test]
fn random_sparse_masks_match_token_level_naive() {
    let mut rng = Rng(7);
    for (n, case) in cases().iter().enumerate() {
        let inputs = Inputs::new(case, 3000 + n as u64);
        let layout = inputs.mask_layout();
        for density in [0.3, 0.7] {
            let dense = random_dense_map(&layout, density, &mut rng);
            let mask = BlockMask::from_dense(&layout, &dense).unwrap();
            let (want_out, want_lse) = token_masked_attention(&inputs, &dense);
            let what = format!("{} (density {density})", case.name);
            let (out, lse) = inputs.run(&mask, DType::F32);
            assert_out_close(&out, &want_out, DType::F32, &what);
            assert_lse_close(&lse, &want_lse, &what);
            let (out, _) = inputs.run(&mask, case.dtype);
            assert_out_close(&out, &want_out, case.dtype, &what);
        }
    }
}

#[test]
fn empty_rows_write_exact_zeros_and_negative_infinite_lse() {
    let case = &cases()[2];
    let inputs = Inputs::new(case, 4000);
    let layout = inputs.mask_layout();
    // Every other row of the dense map left empty, the rest fully selected.
    let mut dense = vec![0u8; layout.dense_len()];
    for s in 0..layout.num_seqs() {
        let (q_blocks, _, k_blocks) = layout.seq_blocks(s);
        for h in 0..layout.num_heads {
            for i in (0..q_blocks).filter(|i| (i + h) % 2 == 0) {
                let start = layout.dense_row_start(s, h, i);
                dense[start..start + k_blocks].fill(1);
            }
        }
    }
    let mask = BlockMask::from_dense(&layout, &dense).unwrap();
    let (want_out, want_lse) = token_masked_attention(&inputs, &dense);
    let empty_rows = want_lse.iter().filter(|l| **l == f64::NEG_INFINITY).count();
    assert!(empty_rows > 0 && empty_rows < want_lse.len(), "the mask must mix empty and non-empty rows");
    for out_dtype in [DType::F32, DType::BF16] {
        let (out, lse) = inputs.run(&mask, out_dtype);
        assert!(out.iter().all(|x| !x.is_nan()), "no NaN in out ({})", out_dtype.name());
        assert!(lse.iter().all(|x| !x.is_nan()), "no NaN in lse");
        let d = case.d;
        let total_q = inputs.batch.total_q();
        for h in 0..case.hq {
            for t in 0..total_q {
                if want_lse[h * total_q + t] == f64::NEG_INFINITY {
                    assert_eq!(lse[h * total_q + t], f32::NEG_INFINITY, "lse of empty row (token {t}, head {h})");
                    let row = &out[(t * case.hq + h) * d..(t * case.hq + h + 1) * d];
                    assert!(row.iter().all(|&x| x == 0.0), "out of empty row (token {t}, head {h}): {row:?}");
                }
            }
        }
        assert_out_close(&out, &want_out, out_dtype, "non-empty rows beside empty ones");
        assert_lse_close(&lse, &want_lse, "non-empty rows beside empty ones");
    }
}

#[test]
fn diagonal_only_rows_attend_the_causal_part_of_the_diagonal_block() {
    let case = &cases()[2];
    let inputs = Inputs::new(case, 5000);
    let layout = inputs.mask_layout();
    let mut dense = vec![0u8; layout.dense_len()];
    for s in 0..layout.num_seqs() {
        let (q_blocks, first_q_block, _) = layout.seq_blocks(s);
        for h in 0..layout.num_heads {
            for i in 0..q_blocks {
                dense[layout.dense_row_start(s, h, i) + first_q_block + i] = 1;
            }
        }
    }
    let mask = BlockMask::from_dense(&layout, &dense).unwrap();
    let (out, lse) = inputs.run(&mask, DType::F32);
    let (want_out, want_lse) = token_masked_attention(&inputs, &dense);
    assert_out_close(&out, &want_out, DType::F32, "diagonal only");
    assert_lse_close(&lse, &want_lse, "diagonal only");

    // A query at the first position of its block sees only itself: its
    // output is exactly its own value row and its lse its own score.
    let (q, k, v) = inputs.views();
    let (hq, d, total_q) = (case.hq, case.d, inputs.batch.total_q());
    let (mut q_base, mut k_base) = (0, 0);
    let mut checked = 0;
    for &(q_len, k_len) in &case.lens {
        for i in 0..q_len {
            let p = k_len - q_len + i;
            if p % BLOCK != 0 {
                continue;
            }
            for h in 0..hq {
                let kvh = h / (hq / case.hkv);
                for x in 0..d {
                    assert_eq!(
                        out[((q_base + i) * hq + h) * d + x],
                        v.get(k_base + p, kvh, x),
                        "position {p}, head {h}"
                    );
                }
                let score: f64 =
                    (0..d).map(|x| q.get(q_base + i, h, x) as f64 * k.get(k_base + p, kvh, x) as f64).sum();
                let want = inputs.scale() as f64 * score;
                assert!((lse[h * total_q + q_base + i] as f64 - want).abs() < 1e-4 * want.abs().max(1.0));
            }
            checked += 1;
        }
        q_base += q_len;
        k_base += k_len;
    }
    assert!(checked >= 3, "the case must contain block-start queries");
}

#[test]
fn strided_views_match_contiguous_and_the_oracle() {
    // Q, K, V as views into one fused `[tokens, hq + 2 * hkv, d]` projection
    // buffer; the output head-major with padding between heads.
    let case = Case {
        name: "fused QKV, head-major output",
        lens: vec![(100, 100), (50, 50)],
        hq: 4,
        hkv: 2,
        d: 64,
        dtype: DType::BF16,
    };
    let contiguous = Inputs::new(&case, 6000);
    let (cq, ck, cv) = contiguous.views();
    let tokens = contiguous.batch.total_q();
    let (hq, hkv, d) = (case.hq, case.hkv, case.d);
    let width = hq + 2 * hkv;
    let mut fused = vec![0f32; tokens * width * d];
    for t in 0..tokens {
        for x in 0..d {
            for h in 0..hq {
                fused[(t * width + h) * d + x] = cq.get(t, h, x);
            }
            for h in 0..hkv {
                fused[(t * width + hq + h) * d + x] = ck.get(t, h, x);
                fused[(t * width + hq + hkv + h) * d + x] = cv.get(t, h, x);
            }
        }
    }
    let fused = encode(&fused, case.dtype);
    let size = case.dtype.size();
    let view = |heads: usize, first_head: usize, name: &str| {
        let layout = Layout3 { shape: [tokens, heads, d], strides: [width * d, d, 1] };
        Tensor3::new(name, &fused[first_head * d * size..], case.dtype, layout).unwrap()
    };
    let (q, k, v) = (view(hq, 0, "q"), view(hkv, hq, "k"), view(hkv, hq + hkv, "v"));

    let layout = contiguous.mask_layout();
    let mut rng = Rng(11);
    let mask = BlockMask::from_dense(&layout, &random_dense_map(&layout, 0.6, &mut rng)).unwrap();
    let padded_tokens = tokens + 3;
    let out_layout = Layout3 { shape: [tokens, hq, d], strides: [d, padded_tokens * d, 1] };
    let mut out_bytes = encode(&vec![f32::NAN; hq * padded_tokens * d], DType::F32);
    let mut out = Tensor3Mut::new("out", &mut out_bytes, DType::F32, out_layout).unwrap();
    let mut lse = vec![0f32; hq * tokens];
    let params = AttentionParams::for_head_dim(d);
    sparse_prefill(&q, &k, &v, &contiguous.batch, mask.as_ref(), &params, &mut out, Some(&mut lse)).unwrap();

    let (want_out, want_lse) = contiguous.run(&mask, DType::F32);
    for t in 0..tokens {
        for h in 0..hq {
            for x in 0..d {
                let want = want_out[(t * hq + h) * d + x];
                assert_eq!(out.get(t, h, x).to_bits(), want.to_bits(), "token {t}, head {h}, dim {x}");
            }
        }
    }
    assert_eq!(lse, want_lse);
    let strided: Vec<f32> = (0..tokens)
        .flat_map(|t| (0..hq).flat_map(move |h| (0..d).map(move |x| (t, h, x))))
        .map(|(t, h, x)| out.get(t, h, x))
        .collect();
    let dense: Vec<u8> = {
        let mut m = vec![0u8; layout.dense_len()];
        mask.as_ref().to_dense(&layout, &mut m).unwrap();
        m
    };
    let (oracle_out, _) = token_masked_attention(&contiguous, &dense);
    assert_out_close(&strided, &oracle_out, DType::F32, case.name);
}

/// One call's arguments, valid unless a test changes them.
#[derive(Clone)]
struct Call {
    lens: Vec<(usize, usize)>,
    q: ([usize; 3], DType),
    k: ([usize; 3], DType),
    v: ([usize; 3], DType),
    out: ([usize; 3], DType),
    lse_len: Option<usize>,
    params: AttentionParams,
    mask: BlockMask,
}

impl Call {
    /// 70 tokens (two blocks), 2 query heads over 1 KV head, d64, bf16.
    fn valid() -> Self {
        let lens = vec![(70, 70)];
        let batch = Batch::from_lens(&lens).unwrap();
        let mask = full_mask(&MaskLayout::new(&batch, 2, BLOCK).unwrap());
        Call {
            lens,
            q: ([70, 2, 64], DType::BF16),
            k: ([70, 1, 64], DType::BF16),
            v: ([70, 1, 64], DType::BF16),
            out: ([70, 2, 64], DType::BF16),
            lse_len: Some(2 * 70),
            params: AttentionParams::for_head_dim(64),
            mask,
        }
    }

    fn run(&self) -> Result<(), Error> {
        let batch = Batch::from_lens(&self.lens).unwrap();
        let buffer = |(shape, dtype): ([usize; 3], DType)| vec![0u8; shape.iter().product::<usize>() * dtype.size()];
        let (qb, kb, vb) = (buffer(self.q), buffer(self.k), buffer(self.v));
        let mut ob = buffer(self.out);
        let tensor = |name, bytes, (shape, dtype): ([usize; 3], DType)| {
            Tensor3::new(name, bytes, dtype, Layout3::contiguous(shape[0], shape[1], shape[2])).unwrap()
        };
        let (q, k, v) = (tensor("q", &qb, self.q), tensor("k", &kb, self.k), tensor("v", &vb, self.v));
        let ([t, h, d], out_dtype) = self.out;
        let mut out = Tensor3Mut::new("out", &mut ob, out_dtype, Layout3::contiguous(t, h, d)).unwrap();
        let mut lse = self.lse_len.map(|n| vec![0f32; n]);
        sparse_prefill(&q, &k, &v, &batch, self.mask.as_ref(), &self.params, &mut out, lse.as_deref_mut())
    }
}

fn assert_invalid(call: Call, what: &str) {
    let r = call.run();
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{what}: expected InvalidArgument, got {r:?}");
}

fn assert_unsupported(call: Call, what: &str) {
    let r = call.run();
    assert!(matches!(r, Err(Error::Unsupported(_))), "{what}: expected Unsupported, got {r:?}");
}

#[test]
fn validation_reports_each_bad_argument() {
    let base = Call::valid();
    base.run().expect("the baseline call is valid");
    let with = |change: &dyn Fn(&mut Call)| {
        let mut c = base.clone();
        change(&mut c);
        c
    };
    assert!(with(&|c| c.lse_len = None).run().is_ok(), "lse is optional");
    assert!(with(&|c| c.out.1 = DType::F32).run().is_ok(), "f32 output is accepted");

    assert_invalid(with(&|c| c.q.0[0] = 71), "q tokens != total_q");
    assert_invalid(with(&|c| c.q.0[1] = 0), "q with 0 heads");
    assert_invalid(with(&|c| c.k.0[0] = 69), "k tokens != total_k");
    assert_invalid(with(&|c| c.v.0[0] = 69), "v tokens != total_k");
    assert_invalid(with(&|c| (c.k.0[1], c.v.0[1]) = (0, 0)), "k, v with 0 heads");
    assert_invalid(with(&|c| (c.k.0[1], c.v.0[1]) = (3, 3)), "q heads not a multiple of kv heads");
    assert_invalid(with(&|c| c.v.0[1] = 2), "v heads != k heads");
    assert_invalid(with(&|c| c.k.0[2] = 128), "k head_dim != q head_dim");
    assert_invalid(with(&|c| c.v.0[2] = 128), "v head_dim != head_dim");
    assert_unsupported(with(&|c| (c.q.0[2], c.k.0[2], c.v.0[2], c.out.0[2]) = (96, 96, 96, 96)), "head_dim 96");
    assert_unsupported(with(&|c| (c.q.1, c.k.1, c.v.1) = (DType::F32, DType::F32, DType::F32)), "f32 inputs");
    assert_invalid(with(&|c| c.k.1 = DType::F16), "k dtype != q dtype");
    assert_invalid(with(&|c| c.v.1 = DType::F16), "v dtype != q dtype");
    assert_invalid(with(&|c| c.out.0[0] = 69), "out shape != q shape");
    assert_unsupported(with(&|c| c.out.1 = DType::F16), "out f16 with bf16 inputs");
    assert_invalid(with(&|c| c.lse_len = Some(139)), "lse too short");
    assert_invalid(with(&|c| c.lse_len = Some(141)), "lse too long");
    assert_invalid(with(&|c| c.params.softmax_scale = 0.0), "scale 0");
    assert_invalid(with(&|c| c.params.softmax_scale = -0.125), "negative scale");
    assert_invalid(with(&|c| c.params.softmax_scale = f32::NAN), "NaN scale");
    assert_invalid(with(&|c| c.params.softmax_scale = f32::INFINITY), "infinite scale");
    assert_unsupported(with(&|c| c.params.block_size = 128), "block size 128");
    assert_invalid(with(&|c| c.params.block_size = 0), "block size 0");
    assert_invalid(with(&|c| c.mask.counts.truncate(1)), "mask with too few rows");
    assert_invalid(with(&|c| c.mask.set_row(0, &[1])), "mask selecting a block above the diagonal");
}
