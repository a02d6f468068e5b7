//! The fuzz targets on stable: every committed input under `fuzz/seeds/<target>/`
//! runs through the same body the libFuzzer target runs (`tests/fuzzing/`).
//! The inputs are the hand-made seeds (`seed-*`), an edge-covering subset of
//! the corpus of the long fuzzing runs (`min-*`, picked by `fuzz/cover.py`),
//! and the input of any crash fuzzing finds (`crash-*`, each also given a
//! named regression test). CI runs this with `cargo test`; no nightly
//! toolchain or cargo-fuzz is needed.
//!
//! `write_seeds` (ignored) regenerates the hand-made seeds:
//! `SEERATTN_WRITE_SEEDS=1 cargo test --test fuzz_replay -- --ignored write_seeds`.
//! Without the variable it writes nothing: `--include-ignored` runs (the GPU
//! runner's) must not rewrite the seeds while the other tests read them.

mod common;
mod fuzzing;

use std::path::PathBuf;

fn seed_dir(target: &str) -> PathBuf {
    common::repo_root().join("fuzz/seeds").join(target)
}

fn replay(target: &str) {
    let dir = seed_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{target}: only {} seeds in {}", files.len(), dir.display());
    for f in &files {
        let data = std::fs::read(f).unwrap();
        let r = std::panic::catch_unwind(|| fuzzing::run(target, &data));
        assert!(r.is_ok(), "{target}: {} fails", f.display());
    }
}

#[test]
fn replay_pth_seeds() {
    replay("pth");
}

#[test]
fn replay_gate_files_seeds() {
    replay("gate_files");
}

#[test]
fn replay_c_api_seeds() {
    replay("c_api");
}

/// The pickle `torch.save` writes for a state dict of bf16 tensors
/// (protocol 2, memoized globals and storages), here for `(name, key,
/// shape)` records each backed by storage `key` of exactly its elements.
fn torch_pickle(tensors: &[(&str, &str, &[u32])]) -> Vec<u8> {
    let mut p = vec![0x80, 2, b'}', b'q', 0, b'('];
    let mut memo = 1u8;
    let mut put = |p: &mut Vec<u8>| {
        p.extend_from_slice(&[b'q', memo]);
        memo += 1;
    };
    let s = |p: &mut Vec<u8>, s: &str| {
        p.push(b'X');
        p.extend_from_slice(&(s.len() as u32).to_le_bytes());
        p.extend_from_slice(s.as_bytes());
    };
    let int = |p: &mut Vec<u8>, v: u32| match v {
        0..=255 => p.extend_from_slice(&[b'K', v as u8]),
        256..=65535 => {
            p.push(b'M');
            p.extend_from_slice(&(v as u16).to_le_bytes())
        }
        _ => {
            p.push(b'J');
            p.extend_from_slice(&v.to_le_bytes())
        }
    };
    for (name, key, shape) in tensors {
        let numel: u32 = shape.iter().product();
        s(&mut p, name);
        put(&mut p);
        p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n");
        put(&mut p);
        p.extend_from_slice(b"((");
        s(&mut p, "storage");
        put(&mut p);
        p.extend_from_slice(b"ctorch\nBFloat16Storage\n");
        put(&mut p);
        s(&mut p, key);
        put(&mut p);
        s(&mut p, "cpu");
        put(&mut p);
        int(&mut p, numel);
        p.push(b't');
        put(&mut p);
        p.push(b'Q');
        int(&mut p, 0);
        let mut strides = vec![1u32; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * shape[i + 1];
        }
        for dims in [shape.to_vec(), strides] {
            match dims.len() {
                1..=3 => {
                    dims.iter().for_each(|&d| int(&mut p, d));
                    p.push(0x84 + dims.len() as u8);
                }
                _ => {
                    p.push(b'(');
                    dims.iter().for_each(|&d| int(&mut p, d));
                    p.push(b't');
                }
            }
            put(&mut p);
        }
        p.extend_from_slice(b"\x89ccollections\nOrderedDict\n");
        put(&mut p);
        p.extend_from_slice(b")R");
        put(&mut p);
        p.extend_from_slice(b"tR");
        put(&mut p);
    }
    p.extend_from_slice(b"u.");
    p
}

/// bf16 bytes of `n` small deterministic values.
fn bf16_bytes(n: usize, salt: usize) -> Vec<u8> {
    (0..n).flat_map(|i| half::bf16::from_f32(((i * 31 + salt * 7) % 17) as f32 / 8.0 - 1.0).to_le_bytes()).collect()
}

const K_NAME: &str = "model.layers.{}.self_attn.attn_gate.mask_linear_k.weight";
const Q_NAME: &str = "model.layers.{}.self_attn.attn_gate.mask_linear_q.weight";

/// A small gate's config.json.
fn small_config(layers: usize, hq: usize, hkv: usize, d: usize, hidden: usize, extra: &str) -> String {
    format!(
        "{{\"num_attention_heads\": {hq}, \"num_key_value_heads\": {hkv}, \"head_dim\": {d}, \
         \"num_hidden_layers\": {layers}, \"rope_theta\": 500000.0, \"seerattn_gate_hidden_size\": {hidden}, \
         \"seerattn_threshold\": 0.05{extra}}}"
    )
}

/// The members of a torch.save archive of `tensors` (name, shape).
fn pth_members(tensors: &[(String, Vec<u32>)]) -> Vec<(String, Vec<u8>)> {
    let records: Vec<(&str, String, &[u32])> =
        tensors.iter().enumerate().map(|(i, (n, s))| (n.as_str(), i.to_string(), s.as_slice())).collect();
    let spec: Vec<(&str, &str, &[u32])> = records.iter().map(|(n, k, s)| (*n, k.as_str(), *s)).collect();
    let mut members = vec![
        ("archive/data.pkl".to_string(), torch_pickle(&spec)),
        ("archive/byteorder".to_string(), b"little".to_vec()),
    ];
    for (i, (_, s)) in tensors.iter().enumerate() {
        let n: u32 = s.iter().product();
        members.push((format!("archive/data/{i}"), bf16_bytes(n as usize, i)));
    }
    members.push(("archive/version".to_string(), b"3\n".to_vec()));
    members
}

fn as_refs(members: &[(String, Vec<u8>)]) -> Vec<(&str, &[u8])> {
    members.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect()
}

fn gate_tensors(
    layers: usize,
    k_heads: usize,
    k_in: usize,
    hidden: usize,
    q: Option<(usize, usize)>,
) -> Vec<(String, Vec<u32>)> {
    let mut out = Vec::new();
    for l in 0..layers {
        out.push((K_NAME.replace("{}", &l.to_string()), vec![k_heads as u32, k_in as u32, hidden as u32]));
        if let Some((hq, q_in)) = q {
            out.push((Q_NAME.replace("{}", &l.to_string()), vec![hq as u32, q_in as u32, hidden as u32]));
        }
    }
    out
}

fn safetensors_of(tensors: &[(String, Vec<u32>)]) -> Vec<u8> {
    let data: Vec<Vec<u8>> =
        tensors.iter().enumerate().map(|(i, (_, s))| bf16_bytes(s.iter().product::<u32>() as usize, i)).collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .zip(&data)
        .map(|((n, s), d)| {
            let shape = s.iter().map(|&x| x as usize).collect();
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, shape, d).unwrap())
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

/// C API seeds: one valid call per entry point and geometry. The bytes are
/// the choices `fuzzing::c_api` reads first (entry point, KV heads, group,
/// head_dim, gate_hidden, layers, sequences, per sequence k_len and q_len,
/// dtype); the zeros past the end select the defaults and no mutation.
fn c_api_seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for op in 0u8..12 {
        out.push((format!("op{op:02}_one_seq"), vec![op, 1, 1, 0, 0, 0, 0, 129, 99, 0]));
        out.push((format!("op{op:02}_three_seqs"), vec![op, 2, 2, 1, 2, 1, 2, 63, 63, 199, 30, 0, 0, 1]));
    }
    out
}

/// Regenerate the hand-made seeds of every target (not the minimised corpora).
/// A generator, not a check: it writes only with `SEERATTN_WRITE_SEEDS=1`.
#[test]
#[ignore = "writes fuzz/seeds; run by hand (SEERATTN_WRITE_SEEDS=1) after changing the seed generators"]
fn write_seeds() {
    if std::env::var_os("SEERATTN_WRITE_SEEDS").is_none() {
        eprintln!("write_seeds: SEERATTN_WRITE_SEEDS is not set; nothing written");
        return;
    }
    let write = |target: &str, name: &str, data: &[u8]| {
        let dir = seed_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
    };
    // The released layout (no Q projection), one with a Q projection, a bad one.
    let released = gate_tensors(2, 2, 12, 4, None);
    let with_q = gate_tensors(1, 1, 12, 8, Some((2, 4)));
    let cfg_released = small_config(2, 2, 1, 4, 4, "");
    let cfg_q = small_config(1, 2, 1, 4, 8, ", \"seerattn_sparsity_method\": \"nz_ratio\", \"seerattn_nz_ratio\": 0.5");
    let cfg_llama3 = small_config(
        2,
        2,
        1,
        4,
        4,
        ", \"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8.0, \"low_freq_factor\": 1.0, \
         \"high_freq_factor\": 4.0, \"original_max_position_embeddings\": 8192}",
    );
    for (name, tensors, zip64) in [("released", &released, true), ("with_q", &with_q, false)] {
        let members = pth_members(tensors);
        write("pth", &format!("{name}_members"), &fuzzing::members_input(&as_refs(&members), zip64));
        let archive =
            fuzzing::stored_zip(&as_refs(&members).iter().map(|(n, d)| (n.as_bytes(), *d)).collect::<Vec<_>>(), zip64);
        let mut raw = vec![0u8];
        raw.extend_from_slice(&archive);
        write("pth", &format!("{name}_archive"), &raw);
    }
    // The real torch pickle of the upstream test gate, with tiny storages.
    let real = common::upstream_dir().join("mqa_s3072_gates/attn_gate_weights.pth");
    let real_pkl = seerattn_zip_member(&std::fs::read(real).unwrap(), "attn_gate_weights/data.pkl");
    let real_members = vec![
        ("attn_gate_weights/data.pkl".to_string(), real_pkl),
        ("attn_gate_weights/byteorder".to_string(), b"little".to_vec()),
        ("attn_gate_weights/data/0".to_string(), bf16_bytes(48, 0)),
        ("attn_gate_weights/data/1".to_string(), bf16_bytes(48, 1)),
    ];
    write("pth", "torch_pickle_members", &fuzzing::members_input(&as_refs(&real_members), true));

    let released_pth = fuzzing::members_input(&as_refs(&pth_members(&released)), true);
    let with_q_pth = fuzzing::members_input(&as_refs(&pth_members(&with_q)), false);
    write("gate_files", "released_pth", &fuzzing::gate_files_input(false, &cfg_released, &released_pth));
    write("gate_files", "llama3_pth", &fuzzing::gate_files_input(false, &cfg_llama3, &released_pth));
    write("gate_files", "with_q_pth", &fuzzing::gate_files_input(false, &cfg_q, &with_q_pth));
    write("gate_files", "released_st", &fuzzing::gate_files_input(true, &cfg_released, &safetensors_of(&released)));
    write("gate_files", "with_q_st", &fuzzing::gate_files_input(true, &cfg_q, &safetensors_of(&with_q)));
    write("gate_files", "mismatch_st", &fuzzing::gate_files_input(true, &cfg_q, &safetensors_of(&released)));

    for (name, data) in c_api_seeds() {
        write("c_api", &name, &data);
    }
}

/// The stored bytes of member `name` of a zip archive (for the seeds only:
/// the upstream file is trusted).
fn seerattn_zip_member(zip: &[u8], name: &str) -> Vec<u8> {
    let rd16 = |at: usize| u16::from_le_bytes([zip[at], zip[at + 1]]) as usize;
    let rd32 = |at: usize| u32::from_le_bytes([zip[at], zip[at + 1], zip[at + 2], zip[at + 3]]) as usize;
    let at = 0;
    if at + 30 <= zip.len() && rd32(at) == 0x0403_4b50 {
        let (name_len, extra_len) = (rd16(at + 26), rd16(at + 28));
        let member = &zip[at + 30..at + 30 + name_len];
        let data_at = at + 30 + name_len + extra_len;
        if member == name.as_bytes() {
            // torch writes sizes in the central directory; data.pkl ends with STOP ('.').
            let end = zip[data_at..].iter().position(|&b| b == b'.').unwrap();
            return zip[data_at..=data_at + end].to_vec();
        }
    }
    panic!("{name} is not the first member");
}

/// The seeds load as intended: the hand-made gates load, the pickles parse.
#[test]
fn seeds_reach_the_success_paths() {
    let read = |target: &str, name: &str| std::fs::read(seed_dir(target).join(format!("seed-{name}"))).unwrap();
    for name in ["released_members", "released_archive", "with_q_members", "with_q_archive"] {
        let tensors = seerattn::checkpoint::parse_pth("seed", fuzzing::archive_of(&read("pth", name))).unwrap();
        assert!(!tensors.is_empty(), "{name}");
    }
    for name in ["released_pth", "llama3_pth", "with_q_pth", "released_st", "with_q_st"] {
        let data = read("gate_files", name);
        let mut r = fuzzing::Bytes::new(&data);
        let kind = r.u8();
        let len = r.u16() as usize;
        let config = std::str::from_utf8(r.take(len)).unwrap().to_string();
        let rest = r.rest();
        let weights = if kind & 1 == 0 { fuzzing::archive_of(rest) } else { rest.to_vec() };
        let w = if kind & 1 == 0 {
            seerattn::checkpoint::WeightsBytes::Pth(&weights)
        } else {
            seerattn::checkpoint::WeightsBytes::Safetensors(&weights)
        };
        seerattn::checkpoint::load_gate_bytes("config.json", &config, "w", w).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}
