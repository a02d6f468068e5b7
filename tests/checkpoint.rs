//! Loading released gate checkpoints end to end, and refusing damaged or
//! hostile ones with the right error variant (never a panic).

use seerattn::checkpoint::{
    convert_pth_to_safetensors, describe_gate_dir, export_gate_dir_to_pth, load_gate_dir, parse_pth, parse_safetensors,
    read_pth, read_safetensors, write_pth, write_safetensors, PthExport, RawTensor,
};
use seerattn::{DType, Error};
use std::path::{Path, PathBuf};

mod common;

const GQA: &str = "tests/data/upstream/gqa4_s1000_gates";
const MQA: &str = "tests/data/upstream/mqa_s3072_gates";
const K0: &str = "model.layers.0.self_attn.attn_gate.mask_linear_k.weight";
const K1: &str = "model.layers.1.self_attn.attn_gate.mask_linear_k.weight";

fn repo(p: &str) -> PathBuf {
    common::repo_root().join(p)
}

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("seerattn-ckpt-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn format_message<T: std::fmt::Debug>(r: seerattn::Result<T>, want: &str) -> String {
    match r {
        Err(Error::Format { path, message }) => {
            let all = format!("{path}: {message}");
            assert!(all.contains(want), "{all:?} lacks {want:?}");
            all
        }
        other => panic!("expected a format error containing {want:?}, got {other:?}"),
    }
}

fn unsupported_message<T: std::fmt::Debug>(r: seerattn::Result<T>, want: &str) {
    match r {
        Err(Error::Unsupported(m)) => assert!(m.contains(want), "{m:?} lacks {want:?}"),
        other => panic!("expected an unsupported error containing {want:?}, got {other:?}"),
    }
}

// ---------------------------------------------------------------- real files

/// Reference values read independently of this crate, with Python's zipfile
/// and struct (no torch):
///   d = zipfile.ZipFile(pth).read('attn_gate_weights/data/<key>')
///   bits = struct.unpack('<%dH' % (len(d)//2), d)[i]
/// kept as bf16 bit patterns (value = f32 with those bits in the top half;
/// e.g. 0xbbf6 = -0.00750732421875). Storage key 0 is layer 0, key 1 is
/// layer 1 (per data.pkl). Flat indices are row-major over [heads, 384, 128].
const GQA_VALUES: [(usize, usize, u16); 8] = [
    (0, 0, 0xbbf6),
    (0, 1, 0xbd36),
    (0, 12345, 0x3dd6),
    (0, 393_215, 0xbda4),
    (1, 0, 0xbda3),
    (1, 1, 0x3cb0),
    (1, 12345, 0xbb1a),
    (1, 393_215, 0x3d9e),
];
const MQA_VALUES: [(usize, usize, u16); 8] = [
    (0, 0, 0xbd10),
    (0, 1, 0xbe39),
    (0, 12345, 0x3cdf),
    (0, 196_607, 0xbd1e),
    (1, 0, 0xbd13),
    (1, 1, 0xbcb3),
    (1, 12345, 0x3d84),
    (1, 196_607, 0x3da4),
];

#[test]
fn loads_released_gate_dirs() {
    for (dir, heads, kv, values) in [(GQA, 8, 2, GQA_VALUES), (MQA, 4, 1, MQA_VALUES)] {
        let gate = load_gate_dir(&repo(dir)).unwrap();
        let c = gate.config();
        assert_eq!((c.num_layers, c.num_q_heads, c.num_kv_heads, c.head_dim), (2, heads, kv, 128));
        assert_eq!(c.k_weight_shape(), [heads, 384, 128]);
        assert_eq!(c.gate_type.name(), "Qavg_Kmaxminavg");
        for (layer, index, bits) in values {
            let want = f32::from_bits(u32::from(bits) << 16);
            let w = gate.layer(layer).unwrap();
            assert_eq!(w.k_proj.len(), heads * 384 * 128);
            assert!(w.q_proj.is_none());
            assert_eq!(w.k_proj[index], want, "{dir} layer {layer} element {index}");
        }
        let raw = read_pth(&repo(dir).join("attn_gate_weights.pth")).unwrap();
        let names: Vec<&str> = raw.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, [K0, K1]);
        assert!(raw.iter().all(|t| t.dtype == DType::BF16 && t.shape == [heads, 384, 128]));
    }
}

#[test]
fn pth_to_safetensors_is_bit_identical() {
    let tmp = TempDir::new("convert");
    let src = repo(GQA).join("attn_gate_weights.pth");
    let dst = tmp.path().join("gate.safetensors");
    convert_pth_to_safetensors(&src, &dst).unwrap();
    let mut a = read_pth(&src).unwrap();
    let mut b = read_safetensors(&dst).unwrap();
    a.sort_by(|x, y| x.name.cmp(&y.name));
    b.sort_by(|x, y| x.name.cmp(&y.name));
    assert_eq!(a, b);

    // A directory with only the converted weights loads to the same gate.
    std::fs::copy(repo(GQA).join("config.json"), tmp.path().join("config.json")).unwrap();
    let from_st = load_gate_dir(tmp.path()).unwrap();
    let from_pth = load_gate_dir(&repo(GQA)).unwrap();
    for layer in 0..2 {
        let (x, y) = (from_st.layer(layer).unwrap(), from_pth.layer(layer).unwrap());
        assert!(x.k_proj.iter().zip(&y.k_proj).all(|(p, q)| p.to_bits() == q.to_bits()));
    }
    // With both present, the .pth is the one read (documented choice).
    std::fs::copy(&src, tmp.path().join("attn_gate_weights.pth")).unwrap();
    assert!(describe_gate_dir(tmp.path()).unwrap().contains("attn_gate_weights.pth (2 tensors)"));
    // Without the .pth and with two .safetensors files, the choice is ambiguous.
    std::fs::remove_file(tmp.path().join("attn_gate_weights.pth")).unwrap();
    std::fs::copy(&dst, tmp.path().join("other.safetensors")).unwrap();
    format_message(load_gate_dir(tmp.path()), "several *.safetensors");
}

#[test]
fn describe_mentions_gate_type_and_shapes() {
    let s = describe_gate_dir(&repo(MQA)).unwrap();
    for want in ["Qavg_Kmaxminavg", "[4, 384, 128]", K0, K1, "bf16", "kv heads 1", "mean|w| 0.0497", "llama3"] {
        assert!(s.to_lowercase().contains(&want.to_lowercase()), "describe output lacks {want:?}:\n{s}");
    }
}

// ------------------------------------------------------ damaged .pth archives

#[test]
fn truncated_pth_is_a_format_error() {
    let bytes = std::fs::read(repo(MQA).join("attn_gate_weights.pth")).unwrap();
    let n = bytes.len();
    // Every cut in the first and last 1.5 KiB (headers, pickle, central
    // directory, end records) and a spread through the tensor data.
    let cuts = (0..1536).chain(n - 1536..n).chain((0..n).step_by(7919));
    for cut in cuts {
        let part = bytes[..cut].to_vec();
        let r = std::panic::catch_unwind(|| parse_pth("cut.pth", part));
        match r {
            Ok(Err(Error::Format { .. })) => {}
            Ok(other) => panic!("cut at {cut}: expected a format error, got {:?}", other.map(|t| t.len())),
            Err(_) => panic!("cut at {cut}: panicked"),
        }
    }
}

#[test]
fn byte_flips_never_panic_nor_change_weights() {
    let bytes = std::fs::read(repo(MQA).join("attn_gate_weights.pth")).unwrap();
    let original = parse_pth("x.pth", bytes.clone()).unwrap();
    let n = bytes.len() as u64;
    let mut seed = 0x0DDB_1A5E_5BAD_5EEDu64;
    let mut errors = 0;
    for iter in 0..300 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // Two thirds of the flips land in the small structural regions.
        let at = match iter % 3 {
            0 => seed % 1024,
            1 => n - 1 - seed % 1024,
            _ => seed % n,
        } as usize;
        let mut damaged = bytes.clone();
        damaged[at] ^= 1 << (seed >> 61);
        let r = std::panic::catch_unwind(|| parse_pth("x.pth", damaged));
        match r {
            Err(_) => panic!("flip at byte {at}: panicked"),
            // Padding, timestamps and similar fields are not covered by any check;
            // what matters is that the weights read are then still the true ones.
            Ok(Ok(t)) => assert!(t == original, "flip at byte {at} silently changed the tensors"),
            Ok(Err(Error::Format { .. } | Error::Unsupported(_))) => errors += 1,
            Ok(Err(e)) => panic!("flip at byte {at}: unexpected error variant {e:?}"),
        }
    }
    assert!(errors > 150, "only {errors} of 300 flips were detected");
}

// ------------------------------------------ hand-built archives and pickles

fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

/// A ZIP archive of `members`, every entry marked with `method` (0 = stored).
fn zip(members: &[(String, Vec<u8>)], method: u16) -> Vec<u8> {
    let mut out = Vec::new();
    let mut cd = Vec::new();
    for (name, data) in members {
        let header = |sig: u32, central: bool, off: u32| {
            let mut h = sig.to_le_bytes().to_vec();
            if central {
                h.extend_from_slice(&20u16.to_le_bytes());
            }
            h.extend_from_slice(&[20, 0, 0, 0]);
            h.extend_from_slice(&method.to_le_bytes());
            h.extend_from_slice(&[0; 4]);
            h.extend_from_slice(&crc32(data).to_le_bytes());
            h.extend_from_slice(&(data.len() as u32).to_le_bytes());
            h.extend_from_slice(&(data.len() as u32).to_le_bytes());
            h.extend_from_slice(&(name.len() as u16).to_le_bytes());
            h.extend_from_slice(&[0, 0]);
            if central {
                h.extend_from_slice(&[0; 10]);
                h.extend_from_slice(&off.to_le_bytes());
            }
            h.extend_from_slice(name.as_bytes());
            h
        };
        cd.extend(header(0x0201_4b50, true, out.len() as u32));
        out.extend(header(0x0403_4b50, false, 0));
        out.extend_from_slice(data);
    }
    let cd_off = out.len() as u32;
    out.extend_from_slice(&cd);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(members.len() as u16).to_le_bytes());
    out.extend_from_slice(&(members.len() as u16).to_le_bytes());
    out.extend_from_slice(&(cd.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_off.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out
}

/// One tensor entry of a state dict pickle, as torch writes it (protocol 2).
struct PklTensor<'a> {
    name: &'a str,
    class: &'a str,
    key: &'a str,
    numel: u32,
    shape: &'a [u32],
}

fn pickle(tensors: &[PklTensor<'_>]) -> Vec<u8> {
    let mut p = b"\x80\x02}(".to_vec();
    let s = |p: &mut Vec<u8>, s: &str| {
        p.push(b'X');
        p.extend_from_slice(&(s.len() as u32).to_le_bytes());
        p.extend_from_slice(s.as_bytes());
    };
    let int = |p: &mut Vec<u8>, v: u32| {
        p.push(b'J');
        p.extend_from_slice(&v.to_le_bytes());
    };
    for t in tensors {
        s(&mut p, t.name);
        p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n((");
        s(&mut p, "storage");
        p.extend_from_slice(format!("ctorch\n{}\n", t.class).as_bytes());
        s(&mut p, t.key);
        s(&mut p, "cuda:0");
        int(&mut p, t.numel);
        p.extend_from_slice(b"tQK\x00(");
        for &d in t.shape {
            int(&mut p, d);
        }
        p.extend_from_slice(b"t(");
        let mut stride = 1;
        let mut strides = Vec::new();
        for &d in t.shape.iter().rev() {
            strides.push(stride);
            stride *= d;
        }
        for &st in strides.iter().rev() {
            int(&mut p, st);
        }
        p.extend_from_slice(b"t\x89ccollections\nOrderedDict\n)RtR");
    }
    p.extend_from_slice(b"u.");
    p
}

/// A torch-style archive (top folder `archive`) of `pkl` and storages.
fn pth(pkl: Vec<u8>, storages: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut m = vec![("archive/data.pkl".to_string(), pkl), ("archive/byteorder".to_string(), b"little".to_vec())];
    for (k, d) in storages {
        m.push((format!("archive/data/{k}"), d.clone()));
    }
    m.push(("archive/version".to_string(), b"3\n".to_vec()));
    zip(&m, 0)
}

fn bf16_bytes(n: usize, scale: f32) -> Vec<u8> {
    (0..n).flat_map(|i| half::bf16::from_f32(scale * ((i % 17) as f32 - 8.0) / 64.0).to_le_bytes()).collect()
}

#[test]
fn hostile_pickles_are_refused() {
    // GLOBAL os system + REDUCE: the classic code-execution pickle.
    let evil = pth(b"\x80\x02cos\nsystem\nX\x06\x00\x00\x00rm -rf\x85R.".to_vec(), &[]);
    format_message(parse_pth("evil.pth", evil), "global 'os.system' refused");
    let evil = pth(b"\x80\x02cbuiltins\nexec\nX\x01\x00\x00\x00x\x85R.".to_vec(), &[]);
    format_message(parse_pth("evil.pth", evil), "builtins.exec");
    // A string declaring 4 GiB.
    let huge = pth(b"\x80\x02X\xff\xff\xff\xffabc.".to_vec(), &[]);
    format_message(parse_pth("huge.pth", huge), "declared length 4294967295");
    // Deep nesting and MARK abuse.
    let mut deep = b"\x80\x02".to_vec();
    deep.extend(std::iter::repeat(b"]").take(10).flatten());
    deep.extend(std::iter::repeat(b"(").take(5000).flatten());
    format_message(parse_pth("marks.pth", pth(deep, &[])), "MARKs nest deeper");
    let mut nested = b"\x80\x02)".to_vec();
    nested.extend(std::iter::repeat(0x85u8).take(5000));
    nested.push(b'.');
    format_message(parse_pth("nested.pth", pth(nested, &[])), "nest deeper");
}

#[test]
fn bad_archives_are_refused() {
    let t = PklTensor { name: K0, class: "BFloat16Storage", key: "0", numel: 6, shape: &[2, 3] };
    let good = pth(pickle(&[t]), &[("0", bf16_bytes(6, 1.0))]);
    assert_eq!(parse_pth("ok.pth", good).unwrap()[0].shape, [2, 3]);

    // Compressed entry.
    let members =
        vec![("archive/data.pkl".to_string(), pickle(&[])), ("archive/byteorder".to_string(), b"little".to_vec())];
    format_message(parse_pth("deflate.pth", zip(&members, 8)), "compressed");
    // Wrong dtype: int64 storage.
    let long = PklTensor { name: K0, class: "LongStorage", key: "0", numel: 6, shape: &[2, 3] };
    unsupported_message(parse_pth("long.pth", pth(pickle(&[long]), &[("0", vec![0; 48])])), "torch.LongStorage");
    // Storage shorter than declared.
    let t = PklTensor { name: K0, class: "BFloat16Storage", key: "0", numel: 6, shape: &[2, 3] };
    format_message(parse_pth("short.pth", pth(pickle(&[t]), &[("0", vec![0; 10])])), "holds 10 bytes");
    // Big-endian data.
    let m = vec![("archive/data.pkl".to_string(), pickle(&[])), ("archive/byteorder".to_string(), b"big".to_vec())];
    unsupported_message(parse_pth("big.pth", zip(&m, 0)), "big-endian");
    // Not a torch archive at all.
    format_message(parse_pth("x.pth", zip(&[("a.txt".to_string(), b"hi".to_vec())], 0)), "data.pkl");
}

// ----------------------------------------------------------- gate directories

const TINY_CONFIG: &str = r#"{
  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "num_hidden_layers": 2,
  "rope_theta": 10000.0, "seerattn_gate_type": "Qavg_Kmaxminavg", "seerattn_gate_hidden_size": 64
}"#;

fn tiny_k(layer: usize) -> RawTensor {
    RawTensor {
        name: format!("model.layers.{layer}.self_attn.attn_gate.mask_linear_k.weight"),
        dtype: DType::BF16,
        shape: vec![4, 192, 64],
        data: bf16_bytes(4 * 192 * 64, (layer + 1) as f32),
    }
}

fn gate_dir(tag: &str, config: &str, tensors: &[RawTensor]) -> TempDir {
    let d = TempDir::new(tag);
    std::fs::write(d.path().join("config.json"), config).unwrap();
    write_safetensors(&d.path().join("gate.safetensors"), tensors).unwrap();
    d
}

#[test]
fn gate_dir_checks_tensors_against_config() {
    let ok = gate_dir("ok", TINY_CONFIG, &[tiny_k(0), tiny_k(1)]);
    let g = load_gate_dir(ok.path()).unwrap();
    assert_eq!(g.layer(1).unwrap().k_proj[0], 2.0 * -8.0 / 64.0);

    let missing = gate_dir("missing", TINY_CONFIG, &[tiny_k(0)]);
    let m = format_message(
        load_gate_dir(missing.path()),
        "missing tensor 'model.layers.1.self_attn.attn_gate.mask_linear_k.weight'",
    );
    assert!(m.contains("gate.safetensors"), "{m}");

    let extra = gate_dir("extra", TINY_CONFIG, &[tiny_k(0), tiny_k(1), tiny_k(2)]);
    format_message(load_gate_dir(extra.path()), "layer 2, but the config has 2 layers");

    let mut wrong = tiny_k(1);
    wrong.shape = vec![4, 64, 192];
    let shape = gate_dir("shape", TINY_CONFIG, &[tiny_k(0), wrong]);
    format_message(load_gate_dir(shape.path()), "has shape [4, 64, 192], config.json implies [4, 192, 64]");

    let mut bias = tiny_k(0);
    bias.name = "model.layers.0.self_attn.attn_gate.mask_linear_k.bias".into();
    let unknown = gate_dir("unknown", TINY_CONFIG, &[tiny_k(0), tiny_k(1), bias]);
    format_message(
        load_gate_dir(unknown.path()),
        "unexpected tensor 'model.layers.0.self_attn.attn_gate.mask_linear_k.bias'",
    );

    let mut q = tiny_k(0);
    q.name = "model.layers.0.self_attn.attn_gate.mask_linear_q.weight".into();
    let q_dir = gate_dir("q", TINY_CONFIG, &[tiny_k(0), tiny_k(1), q]);
    format_message(load_gate_dir(q_dir.path()), "has no mask_linear_q");

    let mut nan = tiny_k(1);
    nan.data[0..2].copy_from_slice(&half::bf16::NAN.to_le_bytes());
    let nan_dir = gate_dir("nan", TINY_CONFIG, &[tiny_k(0), nan]);
    format_message(load_gate_dir(nan_dir.path()), "not finite");

    // A duplicated layer in a .pth (safetensors cannot hold two equal names).
    let dup = TempDir::new("dup");
    std::fs::write(dup.path().join("config.json"), TINY_CONFIG).unwrap();
    let t = |key| PklTensor { name: K1, class: "BFloat16Storage", key, numel: 4 * 192 * 64, shape: &[4, 192, 64] };
    let k0 = PklTensor { name: K0, ..t("0") };
    let archive =
        pth(pickle(&[k0, t("1"), t("2")]), &[("0", tiny_k(0).data), ("1", tiny_k(1).data), ("2", tiny_k(1).data)]);
    std::fs::write(dup.path().join("attn_gate_weights.pth"), archive).unwrap();
    format_message(load_gate_dir(dup.path()), "appears twice");

    let none = TempDir::new("none");
    std::fs::write(none.path().join("config.json"), TINY_CONFIG).unwrap();
    format_message(load_gate_dir(none.path()), "no attn_gate_weights.pth and no *.safetensors");
    assert!(matches!(load_gate_dir(&none.path().join("absent")), Err(Error::Io { .. })));
}

#[test]
fn gate_dir_config_errors() {
    let cases: [(&str, &str); 5] = [
        (r#"{"num_attention_heads": 4, "head_dim": 64}"#, "'num_hidden_layers': missing"),
        (
            r#"{"num_attention_heads": "4", "head_dim": 64, "num_hidden_layers": 2}"#,
            "'num_attention_heads': expected a non-negative integer",
        ),
        (r#"{"num_attention_heads": 4,, }"#, "invalid JSON"),
        (
            r#"{"num_attention_heads": 6, "num_key_value_heads": 4, "head_dim": 64, "num_hidden_layers": 2}"#,
            "num_kv_heads = 4 must be positive and divide",
        ),
        (
            r#"{"num_attention_heads": 4, "head_dim": 64, "num_hidden_layers": 2, "rope_scaling": {"rope_type": "llama3"}}"#,
            "rope_scaling.factor",
        ),
    ];
    for (i, (config, want)) in cases.iter().enumerate() {
        let d = gate_dir(&format!("cfg{i}"), config, &[tiny_k(0), tiny_k(1)]);
        let m = format_message(load_gate_dir(d.path()), want);
        assert!(m.contains("config.json"), "{m}");
    }
    let yarn = gate_dir(
        "yarn",
        &TINY_CONFIG.replace("\"rope_theta\"", r#""rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_theta""#),
        &[],
    );
    unsupported_message(load_gate_dir(yarn.path()), "rope_scaling type 'yarn'");
    let gt = gate_dir("gatetype", &TINY_CONFIG.replace("Qavg_Kmaxminavg", "Qavg_Kmedian"), &[]);
    unsupported_message(load_gate_dir(gt.path()), "Qavg_Kmedian");
}

// ------------------------------------------------- writing upstream's .pth

#[test]
fn written_pth_reads_back_bit_identical() {
    let tmp = TempDir::new("write");
    let tensors: Vec<RawTensor> = [(DType::BF16, vec![2, 3, 5]), (DType::F32, vec![7]), (DType::F16, vec![4, 1, 3, 2])]
        .into_iter()
        .enumerate()
        .map(|(i, (dtype, shape))| {
            let n = shape.iter().product::<usize>() * dtype.size();
            // Every byte value, NaN and infinity patterns included: bits, not values, must survive.
            RawTensor { name: format!("t{i}"), dtype, shape, data: (0..n).map(|b| (b * 37 + i) as u8).collect() }
        })
        .collect();
    let path = tmp.path().join("my.weights.pth");
    write_pth(&path, &tensors).unwrap();
    assert_eq!(read_pth(&path).unwrap(), tensors);
    // The records live under the file name without its extension, as torch names them.
    let bytes = std::fs::read(&path).unwrap();
    assert!(bytes.windows(17).any(|w| w == b"my.weights/data.p"));
    // A backslash separates too (torch's basename(): the name starts right after the
    // header's zero byte); a name without a stem gets torch's default.
    for (file, top) in [("dir\\w.pth", &b"\x00w/data.pkl"[..]), (".pth", b"archive/data.pkl")] {
        let path = tmp.path().join(file);
        write_pth(&path, &tensors).unwrap();
        assert_eq!(read_pth(&path).unwrap(), tensors);
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.windows(top.len()).any(|w| w == top), "{file}");
    }
    assert!(matches!(write_pth(&path, &[tensors[0].clone(), tensors[0].clone()]), Err(Error::InvalidArgument(_))));
}

#[test]
fn released_pth_is_rewritten_byte_for_byte() {
    let tmp = TempDir::new("rewrite");
    for dir in [GQA, MQA] {
        let src = repo(dir).join("attn_gate_weights.pth");
        let dst = tmp.path().join("attn_gate_weights.pth");
        write_pth(&dst, &read_pth(&src).unwrap()).unwrap();
        assert!(std::fs::read(&dst).unwrap() == std::fs::read(&src).unwrap(), "{dir}: bytes differ from torch's");
    }
}

#[test]
fn exported_released_gate_is_the_released_gate() {
    let tmp = TempDir::new("export");
    let out = tmp.path().join("out");
    export_gate_dir_to_pth(&repo(GQA), &out, &PthExport::default()).unwrap();
    // Same tensors, dtype and order: torch's own file again.
    assert!(
        std::fs::read(out.join("attn_gate_weights.pth")).unwrap()
            == std::fs::read(repo(GQA).join("attn_gate_weights.pth")).unwrap()
    );
    let (a, b) = (load_gate_dir(&out).unwrap(), load_gate_dir(&repo(GQA)).unwrap());
    assert_eq!(a.config(), b.config());
    for layer in 0..2 {
        assert_eq!(a.layer(layer).unwrap(), b.layer(layer).unwrap());
    }
    // Upstream's fields stay: its loader reads base_model, Hugging Face the rest.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo(GQA).join("config.json")).unwrap()).unwrap();
    for (key, value) in original.as_object().unwrap() {
        assert_eq!(&config[key], value, "field {key}");
    }

    // A new base model; bf16 weights converted to f32 exactly.
    let options = PthExport {
        dtype: Some(DType::F32),
        base_model: Some("meta-llama/Llama-3.1-8B".into()),
        ..PthExport::default()
    };
    let done = export_gate_dir_to_pth(&repo(MQA), &out, &options).unwrap();
    // The synthetic vector's config is not a whole model config.
    assert_eq!(done.tensors, 2);
    assert_eq!(done.missing_model_fields, ["intermediate_size", "vocab_size"]);
    let text = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(text.contains("\"base_model\": \"meta-llama/Llama-3.1-8B\""), "{text}");
    let raw = read_pth(&out.join("attn_gate_weights.pth")).unwrap();
    assert!(raw.iter().all(|t| t.dtype == DType::F32));
    let (a, b) = (load_gate_dir(&out).unwrap(), load_gate_dir(&repo(MQA)).unwrap());
    for layer in 0..2 {
        assert_eq!(a.layer(layer).unwrap(), b.layer(layer).unwrap());
    }
}

#[test]
fn export_refusals() {
    let tmp = TempDir::new("export-refusals");
    // No base_model anywhere: upstream could not load the result.
    let d = gate_dir("nobase", TINY_CONFIG, &[tiny_k(0), tiny_k(1)]);
    match export_gate_dir_to_pth(d.path(), &tmp.path().join("a"), &PthExport::default()) {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("base_model"), "{m}"),
        other => panic!("expected a refusal naming base_model, got {other:?}"),
    }
    assert!(!tmp.path().join("a").join("attn_gate_weights.pth").exists());
    let named = PthExport { base_model: Some("tiny".into()), ..PthExport::default() };
    export_gate_dir_to_pth(d.path(), &tmp.path().join("a"), &named).unwrap();
    // Into the source directory itself.
    assert!(matches!(export_gate_dir_to_pth(d.path(), d.path(), &named), Err(Error::InvalidArgument(_))));
    // A gate saved without the model's config, completed by it.
    let model = r#"{"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "vocab_size": 1000,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "num_hidden_layers": 2,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5}"#;
    let full = PthExport { model_config: Some(model.into()), ..named.clone() };
    let done = export_gate_dir_to_pth(d.path(), &tmp.path().join("c"), &full).unwrap();
    assert!(done.missing_model_fields.is_empty(), "{done:?}");
    let text = std::fs::read_to_string(tmp.path().join("c").join("config.json")).unwrap();
    let written: serde_json::Value = serde_json::from_str(&text).unwrap();
    let want = serde_json::json!({"rms_norm_eps": 1e-5, "vocab_size": 1000, "seerattn_gate_hidden_size": 64, "base_model": "tiny"});
    for (key, value) in want.as_object().unwrap() {
        assert_eq!(&written[key], value, "{key} in {text}");
    }
    // A model config of another geometry is refused.
    let other = PthExport {
        model_config: Some(model.replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 4")),
        ..named.clone()
    };
    match export_gate_dir_to_pth(d.path(), &tmp.path().join("e"), &other) {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("model config"), "{m}"),
        other => panic!("expected a refusal of the model config, got {other:?}"),
    }
    // A source that does not load as a gate.
    let missing = gate_dir("exmissing", TINY_CONFIG, &[tiny_k(0)]);
    format_message(export_gate_dir_to_pth(missing.path(), &tmp.path().join("b"), &named), "missing tensor");
}

// ------------------------------------------------------ damaged safetensors

#[test]
fn bad_safetensors_are_refused() {
    let header = |json: &str, declared: u64, data: usize| {
        let mut b = declared.to_le_bytes().to_vec();
        b.extend_from_slice(json.as_bytes());
        b.extend(std::iter::repeat(0u8).take(data));
        b
    };
    let i64_json = r#"{"w":{"dtype":"I64","shape":[2],"data_offsets":[0,16]}}"#;
    unsupported_message(
        parse_safetensors("i64.safetensors", &header(i64_json, i64_json.len() as u64, 16)),
        "tensor 'w' has dtype I64",
    );
    let ok_json = r#"{"w":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}"#;
    assert_eq!(parse_safetensors("ok", &header(ok_json, ok_json.len() as u64, 4)).unwrap()[0].shape, [2]);
    // Header cut short, header length beyond the file, file shorter than 8 bytes, data cut short.
    let full = header(ok_json, ok_json.len() as u64, 4);
    format_message(parse_safetensors("cut.safetensors", &full[..20]), "invalid safetensors");
    format_message(parse_safetensors("long.safetensors", &header(ok_json, 1 << 20, 4)), "invalid safetensors");
    format_message(parse_safetensors("tiny.safetensors", &full[..5]), "invalid safetensors");
    format_message(parse_safetensors("data.safetensors", &full[..full.len() - 1]), "invalid safetensors");
}
