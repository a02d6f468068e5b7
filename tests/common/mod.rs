//! Helpers shared by the integration tests: the upstream conformance cases
//! and a small deterministic random source.
#![allow(dead_code)]

pub mod capi;
pub mod device;

use seerattn::mask::RowId;
use seerattn::reference::scores::GateScores;
use seerattn::{BlockMask, DType, EmptyRowPolicy, Layout3, MaskParams, SparsityMethod, Tensor3};
use std::collections::HashMap;
use std::path::PathBuf;

/// The checkout the test data is read from: `SEERATTN_TEST_ROOT` when set,
/// else the source tree the tests were compiled in. The override serves test
/// binaries built on one machine and run on another (`scripts/gpu-test.sh`),
/// where the compile-time path does not exist.
pub fn repo_root() -> PathBuf {
    match std::env::var_os("SEERATTN_TEST_ROOT") {
        Some(root) if !root.is_empty() => PathBuf::from(root),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    }
}

/// Directory of the upstream conformance vectors (see its PROVENANCE.md).
pub fn upstream_dir() -> PathBuf {
    repo_root().join("tests/data/upstream")
}

/// One tensor read from a safetensors file.
pub struct Stored {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl Stored {
    /// Elements as f32 (BF16, F16, F32, U8).
    pub fn to_f32(&self) -> Vec<f32> {
        match self.dtype.as_str() {
            "BF16" => self.bytes.chunks(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            "F16" => self.bytes.chunks(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            "F32" => self.bytes.chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            "U8" => self.bytes.iter().map(|&b| b as f32).collect(),
            other => panic!("unexpected dtype {other}"),
        }
    }
    /// A `[tokens, heads, dim]` view of a contiguous BF16 tensor.
    pub fn view3(&self) -> Tensor3<'_> {
        assert_eq!(self.dtype, "BF16");
        let s = &self.shape;
        Tensor3::new("stored", &self.bytes, DType::BF16, Layout3::contiguous(s[0], s[1], s[2])).unwrap()
    }
}

/// One upstream case: its JSON description and its tensors.
pub struct Case {
    pub name: String,
    pub meta: serde_json::Value,
    pub tensors: HashMap<String, Stored>,
}

impl Case {
    pub fn load(name: &str) -> Case {
        let dir = upstream_dir();
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.json"))).unwrap()).unwrap();
        let bytes = std::fs::read(dir.join(format!("{name}.safetensors"))).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let tensors = st
            .tensors()
            .into_iter()
            .map(|(k, v)| {
                (k, Stored { dtype: format!("{:?}", v.dtype()), shape: v.shape().to_vec(), bytes: v.data().to_vec() })
            })
            .collect();
        Case { name: name.to_string(), meta, tensors }
    }
    pub fn get(&self, key: &str) -> &Stored {
        self.tensors.get(key).unwrap_or_else(|| panic!("{}: no tensor {key}", self.name))
    }
    pub fn gate_dir(&self) -> PathBuf {
        upstream_dir().join(self.meta["gate_dir"].as_str().unwrap())
    }
    pub fn gate_layer(&self) -> usize {
        self.meta["gate_layer"].as_u64().unwrap() as usize
    }
    pub fn usize(&self, key: &str) -> usize {
        self.meta[key].as_u64().unwrap() as usize
    }
}

/// splitmix64: a tiny, well-mixed deterministic generator for test data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
    }
    /// Uniform integer in [lo, hi].
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }
}

/// Compare a GPU mask with the CPU reference's (`scores` are the reference's): identical layout, valid rows,
/// and disagreements only at the named near-ties. Returns the count of those.
pub fn compare_masks(what: &str, params: &MaskParams, scores: &GateScores, gpu: &BlockMask, cpu: &BlockMask) -> usize {
    let layout = &scores.layout;
    assert_eq!(gpu.row_offsets, cpu.row_offsets, "{what}: row offsets");
    gpu.as_ref().validate(layout).unwrap_or_else(|e| panic!("{what}: GPU mask invalid: {e}"));
    let rows = (0..layout.rows()).map(|r| MaskRowPair {
        r,
        id: layout.row_id(r),
        probs: scores.row_probs(r),
        logits: scores.row_logits(r),
        gpu: gpu.as_ref().row(r),
        cpu: cpu.as_ref().row(r),
    });
    compare_mask_rows(what, params, rows)
}

/// One mask row as the GPU and the CPU reference selected it, with the
/// reference's probabilities and logits of its causal blocks. `id.k_blocks`
/// is the sequence's key-block count (what top-k and `last_block_dense` use).
pub struct MaskRowPair<'a> {
    /// The row's number, for messages.
    pub r: usize,
    pub id: RowId,
    pub probs: &'a [f32],
    pub logits: &'a [f32],
    pub gpu: &'a [i32],
    pub cpu: &'a [i32],
}

/// [`compare_masks`] over chosen rows (spot checks of masks too long for the
/// whole reference): the rows agree but at near-ties (a probability within
/// 5% of the threshold, a top-k logit within 0.05 + 2% of the k-th, the
/// diagonal that an empty row falls back to), and those are at most 1% of
/// the rows' causal entries (or 1 in 100 for fewer). Returns their count.
pub fn compare_mask_rows<'a>(
    what: &str,
    params: &MaskParams,
    rows: impl IntoIterator<Item = MaskRowPair<'a>>,
) -> usize {
    let (mut near, mut entries) = (0, 0);
    for MaskRowPair { r, id, probs, logits, gpu: g, cpu: c } in rows {
        entries += id.q_block + 1;
        if g == c {
            continue;
        }
        let dense = params.last_block_dense && id.q_block + 2 >= id.k_blocks;
        assert!(!dense, "{what}: row {r} is a dense row and still differs: {g:?} vs {c:?}");
        let mut sorted = logits.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let k = params.top_k(id.k_blocks).min(id.q_block + 1);
        let kth = sorted[k - 1];
        for j in 0..=id.q_block {
            let (in_g, in_c) = (g.contains(&(j as i32)), c.contains(&(j as i32)));
            if in_g == in_c {
                continue;
            }
            match params.method {
                // bf16 features on the GPU: logits within ~1% + 0.03 of the f32 reference.
                SparsityMethod::Threshold => {
                    let p = probs[j];
                    let t = params.threshold;
                    // A row one side found empty falls back to its diagonal
                    // block (the default policy): that block may then differ
                    // however far its probability is from the threshold.
                    let diagonal = [id.q_block as i32];
                    let fallback = j == id.q_block
                        && params.empty_rows == EmptyRowPolicy::KeepDiagonal
                        && (g == diagonal || c == diagonal);
                    assert!(
                        (p - t).abs() <= 0.05 * t || fallback,
                        "{what}: row {r} block {j}: GPU {in_g}, CPU {in_c}, p = {p} not near threshold {t}"
                    );
                }
                SparsityMethod::NzRatio => {
                    let l = logits[j];
                    assert!(
                        (l - kth).abs() <= 0.05 + 0.02 * kth.abs(),
                        "{what}: row {r} block {j}: GPU {in_g}, CPU {in_c}, logit {l} is no tie with the k-th {kth}"
                    );
                }
            }
            near += 1;
        }
    }
    assert!(near * 100 <= entries.max(100), "{what}: {near} near-tie differences of {entries} entries");
    near
}

/// `values` in `dtype`, little-endian bytes.
/// A one-layer gate config of the released type (K projection per query
/// head, `gate_hidden == head_dim`), plain RoPE at `theta`, top-k 0.2.
pub fn released_config(hq: usize, hkv: usize, d: usize, theta: f64) -> seerattn::GateConfig {
    use seerattn::config::{GateType, RopeConfig, RopeScaling};
    seerattn::GateConfig {
        num_layers: 1,
        num_q_heads: hq,
        num_kv_heads: hkv,
        head_dim: d,
        gate_hidden: d,
        block_size: 64,
        gate_type: GateType::released(),
        force_double: false,
        rope: RopeConfig { theta, scaling: RopeScaling::None },
        sparsity_method: SparsityMethod::NzRatio,
        threshold: 0.1,
        nz_ratio: 0.2,
        last_block_dense: false,
    }
}

pub fn encode(values: &[f32], dtype: DType) -> Vec<u8> {
    values
        .iter()
        .flat_map(|&x| match dtype {
            DType::BF16 => half::bf16::from_f32(x).to_le_bytes().to_vec(),
            DType::F16 => half::f16::from_f32(x).to_le_bytes().to_vec(),
            DType::F32 => x.to_le_bytes().to_vec(),
        })
        .collect()
}

/// Little-endian `dtype` bytes as f32.
pub fn decode(bytes: &[u8], dtype: DType) -> Vec<f32> {
    bytes
        .chunks(dtype.size())
        .map(|c| match dtype {
            DType::BF16 => half::bf16::from_le_bytes([c[0], c[1]]).to_f32(),
            DType::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f32(),
            DType::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
        })
        .collect()
}

/// A copy of `gate` with every weight rounded to bf16 (kept as f32): the
/// values the GPU trainer's bf16 copy holds, so that a CPU and a GPU run
/// from it start from the same gate.
pub fn gate_rounded_to_bf16(gate: &seerattn::Gate) -> seerattn::Gate {
    let mut g = gate.clone();
    let shape = g.config().k_weight_shape();
    for layer in 0..g.config().num_layers {
        let w: Vec<u8> = g
            .layer(layer)
            .unwrap()
            .k_proj
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_f32().to_le_bytes())
            .collect();
        g.set_layer_weights(layer, seerattn::gate::WeightRef { dtype: DType::F32, shape, bytes: &w }, None).unwrap();
    }
    g
}
