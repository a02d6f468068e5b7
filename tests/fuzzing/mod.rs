//! The bodies of the fuzz targets (`fuzz/fuzz_targets/*.rs` include this
//! module by path) and of their stable replay (`tests/fuzz_replay.rs`, which
//! runs every committed seed and regression input through the same
//! functions on a stable toolchain, without cargo-fuzz).
//!
//! Each body takes arbitrary bytes and must return normally: a panic (an
//! `assert!` below, or one inside the library, which libFuzzer's panic hook
//! turns into an abort even where the C boundary would catch it) is a crash,
//! and so is undefined behaviour that AddressSanitizer sees in a fuzz build.
//!
//! - [`pth`]: the `.pth` reader (zip + restricted pickle), on raw archive
//!   bytes or on archives rebuilt from fuzzed members with valid CRCs (so the
//!   damage reaches the pickle interpreter and the storage checks).
//! - [`gate_files`]: the gate loader (`config.json` + `.pth` or
//!   `.safetensors`), and a mask computed with every gate that loads.
//! - [`c_api::c_api`]: the C entry points called through their `extern "C"`
//!   functions with fuzzer-built descriptors and params over host buffers of
//!   exactly the size each descriptor spans.
#![allow(dead_code)]

pub mod c_api;

use seerattn::checkpoint::{self, WeightsBytes};
use seerattn::{Batch, DType, Error, Layout3, MaskParams, Tensor3};

/// The names of the fuzz targets, which are also the directories of their
/// seeds under `fuzz/seeds/`.
pub const TARGETS: [&str; 3] = ["pth", "gate_files", "c_api"];

/// Run the body of target `name` on `data`.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "pth" => pth(data),
        "gate_files" => gate_files(data),
        "c_api" => c_api::c_api(data),
        other => panic!("no fuzz target {other}"),
    }
}

/// A cursor over fuzz input that never fails: past the end it yields zeros.
pub struct Bytes<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Bytes<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Bytes { data, pos: 0 }
    }
    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }
    pub fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    pub fn u64(&mut self) -> u64 {
        (self.u32() as u64) | ((self.u32() as u64) << 32)
    }
    /// Up to `n` bytes (fewer at the end of the input).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        let end = start.saturating_add(n).min(self.data.len());
        self.pos = self.pos.saturating_add(n);
        &self.data[start..end]
    }
    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        self.pos = self.data.len();
        &self.data[start..]
    }
}

/// CRC-32 (IEEE), as ZIP uses it.
fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = (c >> 1) ^ (0xEDB8_8320 & (c & 1).wrapping_neg());
        }
    }
    !c
}

/// A stored (uncompressed) zip archive of `members`, with correct CRCs, as
/// `torch.save` writes them: sizes in the central directory only (local
/// flag bit 3), and a ZIP64 end record when `zip64`.
pub fn stored_zip(members: &[(&[u8], &[u8])], zip64: bool) -> Vec<u8> {
    let le16 = |v: &mut Vec<u8>, x: u16| v.extend_from_slice(&x.to_le_bytes());
    let le32 = |v: &mut Vec<u8>, x: u32| v.extend_from_slice(&x.to_le_bytes());
    let le64 = |v: &mut Vec<u8>, x: u64| v.extend_from_slice(&x.to_le_bytes());
    let (mut out, mut central) = (Vec::new(), Vec::new());
    for (name, data) in members {
        let (offset, crc) = (out.len() as u32, crc32(data));
        le32(&mut out, 0x0403_4b50);
        out.extend_from_slice(&[20, 0, 8, 0, 0, 0, 0, 0, 0, 0]); // version, flags (bit 3), method 0, time, date
        le32(&mut out, 0);
        le32(&mut out, 0);
        le32(&mut out, 0);
        le16(&mut out, name.len() as u16);
        le16(&mut out, 0);
        out.extend_from_slice(name);
        out.extend_from_slice(data);
        le32(&mut central, 0x0201_4b50);
        central.extend_from_slice(&[20, 0, 20, 0, 8, 0, 0, 0, 0, 0, 0, 0]);
        le32(&mut central, crc);
        le32(&mut central, data.len() as u32);
        le32(&mut central, data.len() as u32);
        le16(&mut central, name.len() as u16);
        central.extend_from_slice(&[0; 12]);
        le32(&mut central, offset);
        central.extend_from_slice(name);
    }
    let (cd_offset, n) = (out.len(), members.len());
    out.extend_from_slice(&central);
    if zip64 {
        let record = out.len() as u64;
        le32(&mut out, 0x0606_4b50);
        le64(&mut out, 44);
        out.extend_from_slice(&[45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        le64(&mut out, n as u64);
        le64(&mut out, n as u64);
        le64(&mut out, central.len() as u64);
        le64(&mut out, cd_offset as u64);
        le32(&mut out, 0x0706_4b50);
        le32(&mut out, 0);
        le64(&mut out, record);
        le32(&mut out, 1);
    }
    le32(&mut out, 0x0605_4b50);
    le32(&mut out, 0);
    le16(&mut out, n as u16);
    le16(&mut out, n as u16);
    le32(&mut out, central.len() as u32);
    le32(&mut out, cd_offset as u32);
    le16(&mut out, 0);
    out
}

/// The archive bytes an input describes. Its first byte picks the form:
/// even, the rest is the archive as is; odd, the rest lists members
/// (`[name_len u8][name][data_len u16][data]`, repeated) that are packed
/// into a valid stored archive (bit 1: with a ZIP64 end record).
pub fn archive_of(data: &[u8]) -> Vec<u8> {
    let mut r = Bytes::new(data);
    let mode = r.u8();
    if mode & 1 == 0 {
        return r.rest().to_vec();
    }
    let mut members: Vec<(&[u8], &[u8])> = Vec::new();
    while !r.is_empty() && members.len() < 64 {
        let name_len = r.u8() as usize;
        let name = r.take(name_len);
        let data_len = r.u16() as usize;
        members.push((name, r.take(data_len)));
    }
    stored_zip(&members, mode & 2 != 0)
}

/// Inverse of [`archive_of`]'s member form, for building seeds.
pub fn members_input(members: &[(&str, &[u8])], zip64: bool) -> Vec<u8> {
    let mut out = vec![if zip64 { 3 } else { 1 }];
    for (name, data) in members {
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(data.len() as u16).to_le_bytes());
        out.extend_from_slice(data);
    }
    out
}

/// The error variants a hostile file may produce, with a message.
fn check_file_error(e: &Error) {
    match e {
        Error::Format { message, .. } => assert!(!message.is_empty()),
        Error::Unsupported(m) | Error::InvalidArgument(m) => assert!(!m.is_empty()),
        other => panic!("unexpected error variant for in-memory bytes: {other:?}"),
    }
}

/// Target `pth`: the `torch.save` reader. Tensors it returns must hold
/// exactly the bytes their shape and dtype say.
pub fn pth(data: &[u8]) {
    let bytes = archive_of(data);
    let len = bytes.len();
    match checkpoint::parse_pth("fuzz.pth", bytes) {
        Ok(tensors) => {
            let mut total = 0usize;
            for t in &tensors {
                let numel = t.shape.iter().try_fold(1usize, |a, &s| a.checked_mul(s)).expect("shape overflows");
                assert_eq!(t.data.len(), numel * t.dtype.size(), "tensor '{}'", t.name);
                total += t.data.len();
            }
            assert!(total <= 4 * len, "{total} tensor bytes from a {len}-byte archive");
        }
        Err(e) => check_file_error(&e),
    }
}

/// Target `gate_files`: a gate from `config.json` text and a weights file.
/// Input: `[kind u8][config_len u16][config][weights...]`; kind even: the
/// weights are a `.pth` in [`archive_of`]'s forms, odd: `.safetensors`.
/// A gate that loads computes a mask for a short batch.
pub fn gate_files(data: &[u8]) {
    let mut r = Bytes::new(data);
    let kind = r.u8();
    let config_len = r.u16() as usize;
    let config = String::from_utf8_lossy(r.take(config_len)).into_owned();
    let rest = r.rest();
    let loaded = if kind & 1 == 0 {
        let archive = archive_of(rest);
        checkpoint::load_gate_bytes("config.json", &config, "weights.pth", WeightsBytes::Pth(&archive))
    } else {
        checkpoint::load_gate_bytes("config.json", &config, "weights.safetensors", WeightsBytes::Safetensors(rest))
    };
    let gate = match loaded {
        Ok(g) => g,
        Err(e) => return check_file_error(&e),
    };
    let c = gate.config().clone();
    for layer in 0..c.num_layers {
        assert!(gate.has_layer(layer), "layer {layer} loaded without weights");
    }
    // One mask per loaded gate: a 2-block sequence, small inputs.
    let tokens = 70;
    let batch = Batch::single(tokens).unwrap();
    let elems = |heads: usize| tokens * heads * c.head_dim;
    if elems(c.num_q_heads) > 1 << 20 {
        return;
    }
    let fill = |heads: usize| -> Vec<u8> {
        (0..elems(heads))
            .flat_map(|i| half::bf16::from_f32(((i * 37 % 101) as f32 - 50.0) / 25.0).to_le_bytes())
            .collect()
    };
    let (qb, kb) = (fill(c.num_q_heads), fill(c.num_kv_heads));
    let q = Tensor3::new("q", &qb, DType::BF16, Layout3::contiguous(tokens, c.num_q_heads, c.head_dim)).unwrap();
    let k = Tensor3::new("k", &kb, DType::BF16, Layout3::contiguous(tokens, c.num_kv_heads, c.head_dim)).unwrap();
    let params = MaskParams::from_config(&c);
    let mask = gate.compute_block_mask(0, &q, &k, &batch, &params).expect("a loaded gate computes a mask");
    let layout = seerattn::MaskLayout::new(&batch, c.num_q_heads, c.block_size).unwrap();
    mask.as_ref().validate(&layout).expect("the gate's mask is valid");
}

/// Seed inputs for [`gate_files`]: `[kind][config_len][config][weights]`.
pub fn gate_files_input(safetensors: bool, config: &str, weights: &[u8]) -> Vec<u8> {
    let mut out = vec![safetensors as u8];
    out.extend_from_slice(&(config.len() as u16).to_le_bytes());
    out.extend_from_slice(config.as_bytes());
    out.extend_from_slice(weights);
    out
}
