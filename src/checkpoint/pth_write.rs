//! Writing `torch.save` archives of tensors: the archive torch 2.x writes for
//! `torch.save({name: tensor, ...}, path)` of contiguous CPU tensors, each
//! with its own storage, byte for byte (the released gate files in
//! `tests/data/upstream/*_gates/` are reproduced exactly).
//!
//! `data.pkl` is what CPython's C pickler emits at protocol 2 for that dict:
//! a plain dict (upstream saves one, not an `OrderedDict`), each value
//! `torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False,
//! OrderedDict())` with the storage as persistent id `('storage',
//! torch.<Type>Storage, key, 'cpu', numel)`, keys `"0"`, `"1"`, ... in order.
//! The memo follows the pickler's: every string, global, non-empty tuple and
//! reduced object is stored (`BINPUT`, `LONG_BINPUT` from index 256), and the
//! objects torch shares between tensors (`'storage'`, `'cpu'`, the storage
//! class, `_rebuild_tensor_v2`, `OrderedDict`) are fetched back (`BINGET`).
//! Dict items go as `SETITEM` for one item, else in `MARK ... SETITEMS`
//! batches of 1000. The records follow in torch's order (`data.pkl`,
//! `.format_version`, `.storage_alignment`, `byteorder`, `data/{key}`, then
//! `version` and `.data/serialization_id`; see `zip_write`).

use super::zip_write::{StreamWriter, ALIGNMENT};
use super::RawTensor;
use crate::error::{Error, Result};
use crate::tensor::DType;
use std::collections::HashSet;

/// Items per `SETITEMS` batch (CPython's `BATCHSIZE`).
const BATCH: usize = 1000;

/// The bytes of a `torch.save` archive of `tensors` (in that order) whose
/// records live under `archive_name/`.
pub(crate) fn pth_bytes(archive_name: &str, tensors: &[RawTensor]) -> Result<Vec<u8>> {
    let mut seen = HashSet::new();
    for t in tensors {
        if !seen.insert(t.name.as_str()) {
            return Err(Error::invalid(format!("tensor '{}' is given twice", t.name)));
        }
        let numel = t.shape.iter().try_fold(1usize, |a, &s| a.checked_mul(s));
        if numel.and_then(|n| n.checked_mul(t.dtype.size())) != Some(t.data.len()) {
            return Err(Error::invalid(format!(
                "tensor '{}': {} bytes do not fit shape {:?} of {}",
                t.name,
                t.data.len(),
                t.shape,
                t.dtype.name()
            )));
        }
    }
    let mut zip = StreamWriter::new(archive_name)?;
    zip.write_record("data.pkl", &state_dict_pickle(tensors))?;
    zip.write_record(".format_version", b"1")?;
    zip.write_record(".storage_alignment", ALIGNMENT.to_string().as_bytes())?;
    zip.write_record("byteorder", b"little")?;
    for (key, t) in tensors.iter().enumerate() {
        zip.write_record(&format!("data/{key}"), &t.data)?;
    }
    zip.finish()
}

/// The legacy storage class torch pickles for a dtype.
fn storage_class(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "BFloat16Storage",
        DType::F16 => "HalfStorage",
        DType::F32 => "FloatStorage",
    }
}

/// torch's contiguous strides: each the product of the later sizes, a size
/// of 0 counted as 1.
fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; shape.len()];
    let mut s = 1usize;
    for (d, &n) in shape.iter().enumerate().rev() {
        strides[d] = s;
        s = s.saturating_mul(n.max(1));
    }
    strides
}

/// A protocol-2 pickle writer with CPython's memo numbering.
struct Pickler {
    out: Vec<u8>,
    memo_len: u32,
}

impl Pickler {
    /// Store the object just written in the next memo slot; its index.
    fn put(&mut self) -> u32 {
        let i = self.memo_len;
        match u8::try_from(i) {
            Ok(b) => self.out.extend_from_slice(&[b'q', b]),
            Err(_) => {
                self.out.push(b'r');
                self.out.extend_from_slice(&i.to_le_bytes());
            }
        }
        self.memo_len += 1;
        i
    }

    fn get(&mut self, i: u32) {
        match u8::try_from(i) {
            Ok(b) => self.out.extend_from_slice(&[b'h', b]),
            Err(_) => {
                self.out.push(b'j');
                self.out.extend_from_slice(&i.to_le_bytes());
            }
        }
    }

    /// A fresh string object (`BINUNICODE`), memoized.
    fn str(&mut self, s: &str) -> u32 {
        self.out.push(b'X');
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
        self.put()
    }

    /// A shared object: fetched from the memo when already stored.
    fn shared(&mut self, slot: &mut Option<u32>, write: impl FnOnce(&mut Self) -> u32) {
        match *slot {
            Some(i) => self.get(i),
            None => *slot = Some(write(self)),
        }
    }

    fn global(&mut self, module: &str, name: &str) -> u32 {
        self.out.push(b'c');
        for part in [module, name] {
            self.out.extend_from_slice(part.as_bytes());
            self.out.push(b'\n');
        }
        self.put()
    }

    /// A non-negative int as CPython writes it: `BININT1`, `BININT2`,
    /// `BININT` while it fits a signed 32-bit int, else `LONG1` with the
    /// little-endian two's complement in `bit_length / 8 + 1` bytes.
    fn int(&mut self, v: u64) {
        if v <= 0xFF {
            self.out.extend_from_slice(&[b'K', v as u8]);
        } else if v <= 0xFFFF {
            self.out.push(b'M');
            self.out.extend_from_slice(&(v as u16).to_le_bytes());
        } else if v <= 0x7FFF_FFFF {
            self.out.push(b'J');
            self.out.extend_from_slice(&(v as u32).to_le_bytes());
        } else {
            let n = (64 - v.leading_zeros() as usize) / 8 + 1;
            self.out.extend_from_slice(&[0x8a, n as u8]);
            self.out.extend_from_slice(&u128::from(v).to_le_bytes()[..n]);
        }
    }

    /// A tuple of ints: `EMPTY_TUPLE` (not memoized), `TUPLE1..3`, or
    /// `MARK ... TUPLE`; memoized when not empty.
    fn int_tuple(&mut self, values: &[usize]) {
        if values.is_empty() {
            self.out.push(b')');
            return;
        }
        if values.len() > 3 {
            self.out.push(b'(');
        }
        for &v in values {
            self.int(v as u64);
        }
        self.out.push(match values.len() {
            1 => 0x85,
            2 => 0x86,
            3 => 0x87,
            _ => b't',
        });
        self.put();
    }
}

/// Memo slots of the objects torch shares between tensor entries.
#[derive(Default)]
struct Shared {
    rebuild: Option<u32>,
    storage_tag: Option<u32>,
    cpu: Option<u32>,
    ordered_dict: Option<u32>,
    classes: Vec<(DType, u32)>,
}

/// `data.pkl` of `{t.name: t for t in tensors}`.
fn state_dict_pickle(tensors: &[RawTensor]) -> Vec<u8> {
    let mut p = Pickler { out: vec![0x80, 2, b'}'], memo_len: 0 };
    p.put();
    let mut shared = Shared::default();
    if tensors.len() == 1 {
        tensor_entry(&mut p, &mut shared, 0, &tensors[0]);
        p.out.push(b's');
    } else if !tensors.is_empty() {
        // CPython's batch_dict_exact: a full last batch is followed by an
        // empty MARK ... SETITEMS.
        let mut key = 0;
        loop {
            p.out.push(b'(');
            let batch = &tensors[key..(key + BATCH).min(tensors.len())];
            for t in batch {
                tensor_entry(&mut p, &mut shared, key, t);
                key += 1;
            }
            p.out.push(b'u');
            if batch.len() < BATCH {
                break;
            }
        }
    }
    p.out.push(b'.');
    p.out
}

/// One `name: _rebuild_tensor_v2(...)` item; `key` names its storage.
fn tensor_entry(p: &mut Pickler, shared: &mut Shared, key: usize, t: &RawTensor) {
    p.str(&t.name);
    p.shared(&mut shared.rebuild, |p| p.global("torch._utils", "_rebuild_tensor_v2"));
    p.out.extend_from_slice(b"((");
    p.shared(&mut shared.storage_tag, |p| p.str("storage"));
    match shared.classes.iter().find(|(d, _)| *d == t.dtype) {
        Some(&(_, i)) => p.get(i),
        None => {
            let i = p.global("torch", storage_class(t.dtype));
            shared.classes.push((t.dtype, i));
        }
    }
    p.str(&key.to_string());
    p.shared(&mut shared.cpu, |p| p.str("cpu"));
    p.int(t.shape.iter().product::<usize>() as u64);
    p.out.push(b't');
    p.put();
    p.out.push(b'Q'); // BINPERSID
    p.int(0); // storage offset
    p.int_tuple(&t.shape);
    p.int_tuple(&contiguous_strides(&t.shape));
    p.out.push(0x89); // requires_grad = False
    p.shared(&mut shared.ordered_dict, |p| p.global("collections", "OrderedDict"));
    p.out.extend_from_slice(b")R");
    p.put(); // the empty OrderedDict of backward hooks
    p.out.push(b't');
    p.put();
    p.out.push(b'R');
    p.put(); // the tensor
}

#[cfg(test)]
mod tests {
    use super::super::pth::read_pth_bytes;
    use super::super::zip::ZipArchive;
    use super::*;
    use std::collections::BTreeSet;
    use std::path::PathBuf;

    fn upstream(case: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join(format!("tests/data/upstream/{case}_gates/attn_gate_weights.pth"))
    }

    /// torch's archive of the released tensors is reproduced byte for byte:
    /// zip layout, padding, pickle, memo numbering and serialization id.
    #[test]
    fn rewrites_the_released_files_byte_for_byte() {
        for case in ["gqa4_s1000", "mqa_s3072"] {
            let original = std::fs::read(upstream(case)).unwrap();
            let tensors = read_pth_bytes(case, original.clone()).unwrap();
            let ours = pth_bytes("attn_gate_weights", &tensors).unwrap();
            assert_eq!(ours.len(), original.len(), "{case}: length");
            if let Some(i) = ours.iter().zip(&original).position(|(a, b)| a != b) {
                panic!("{case}: first difference at byte {i}: ours {:#04x}, torch's {:#04x}", ours[i], original[i]);
            }
        }
    }

    /// Opcodes and `GLOBAL` names of a pickle, by a scanner that knows the
    /// argument layout of exactly the protocol-2 opcodes a tensor dict may
    /// use; anything else fails the test.
    fn opcodes(p: &[u8]) -> (BTreeSet<u8>, BTreeSet<String>) {
        let (mut ops, mut globals, mut at) = (BTreeSet::new(), BTreeSet::new(), 0);
        while at < p.len() {
            let op = p[at];
            ops.insert(op);
            at += 1;
            let u32_at = |i: usize| u32::from_le_bytes(p[i..i + 4].try_into().unwrap()) as usize;
            at += match op {
                0x80 | b'q' | b'h' | b'K' => 1,
                b'r' | b'j' | b'J' => 4,
                b'M' => 2,
                b'X' => 4 + u32_at(at),
                0x8a => 1 + p[at] as usize,
                b'c' => {
                    let lines: Vec<&[u8]> = p[at..].splitn(3, |&b| b == b'\n').take(2).collect();
                    globals.insert(format!(
                        "{}.{}",
                        String::from_utf8_lossy(lines[0]),
                        String::from_utf8_lossy(lines[1])
                    ));
                    lines[0].len() + lines[1].len() + 2
                }
                b'}' | b'(' | b't' | 0x85 | 0x86 | 0x87 | b')' | b'Q' | 0x89 | b'R' | b's' | b'u' | b'.' => 0,
                other => panic!("opcode {other:#04x} at {} is outside the expected set", at - 1),
            };
        }
        (ops, globals)
    }

    fn gate_tensor(layer: usize, proj: char, dtype: DType, shape: &[usize]) -> RawTensor {
        let n = shape.iter().product::<usize>() * dtype.size();
        RawTensor {
            name: format!("model.layers.{layer}.self_attn.attn_gate.mask_linear_{proj}.weight"),
            dtype,
            shape: shape.to_vec(),
            data: (0..n).map(|i| (i * 31 + layer * 7 + 1) as u8).collect(),
        }
    }

    /// The pickle of a gate uses the released file's opcodes and globals; a
    /// gate of 32 or more 3-d tensors (8 memo slots each, 13 for the first)
    /// adds only `LONG_BINPUT`, which CPython's pickler (and so torch)
    /// switches to past memo index 255.
    #[test]
    fn pickle_uses_the_released_opcodes_and_globals() {
        let original = std::fs::read(upstream("gqa4_s1000")).unwrap();
        let zip = ZipArchive::parse("gqa4", original).unwrap();
        let (want_ops, want_globals) = opcodes(zip.get("attn_gate_weights/data.pkl").unwrap());

        // Sizes past 255 and 65535, as in real gates (BININT2, BININT).
        // The pickle does not look at the data.
        let entry = |layer: usize, proj: char, dtype: DType| RawTensor {
            data: Vec::new(),
            ..gate_tensor(layer, proj, dtype, &[0])
        };
        let shaped = |mut t: RawTensor, shape: &[usize]| {
            t.shape = shape.to_vec();
            t
        };
        let small: Vec<RawTensor> = (0..2).map(|l| shaped(entry(l, 'k', DType::BF16), &[2, 384, 128])).collect();
        let (ops, globals) = opcodes(&state_dict_pickle(&small));
        assert_eq!(ops, want_ops);
        assert_eq!(globals, want_globals);

        let large: Vec<RawTensor> = (0..32)
            .flat_map(|l| {
                [shaped(entry(l, 'q', DType::BF16), &[8, 384, 128]), shaped(entry(l, 'k', DType::BF16), &[8, 384, 128])]
            })
            .collect();
        let (ops, globals) = opcodes(&state_dict_pickle(&large));
        // Shared objects are stored by the first tensor, below 256: BINGET stays.
        let long_put: BTreeSet<u8> = [b'r'].into();
        assert_eq!(ops, want_ops.union(&long_put).copied().collect());
        assert_eq!(globals, want_globals);

        // Other dtypes name their own storage class, nothing else changes.
        let others =
            [shaped(entry(0, 'k', DType::F32), &[2, 384, 128]), shaped(entry(1, 'k', DType::F16), &[2, 384, 128])];
        let (ops, globals) = opcodes(&state_dict_pickle(&others));
        assert_eq!(ops, want_ops);
        let want: BTreeSet<String> =
            ["torch._utils._rebuild_tensor_v2", "collections.OrderedDict", "torch.FloatStorage", "torch.HalfStorage"]
                .map(String::from)
                .into();
        assert_eq!(globals, want);
    }

    /// Entry names (past the archive folder), order and 64-byte alignment of
    /// the data are those of the released file, for any number of tensors.
    #[test]
    fn archive_mirrors_the_released_entry_list() {
        let original = std::fs::read(upstream("mqa_s3072")).unwrap();
        let names = |bytes: Vec<u8>, top: &str| {
            let zip = ZipArchive::parse("x", bytes.clone()).unwrap();
            zip.entries()
                .iter()
                .map(|e| {
                    let data = zip.get(&e.name).unwrap();
                    let offset = data.as_ptr() as usize - zip.get(&zip.entries()[0].name).unwrap().as_ptr() as usize;
                    assert_eq!(offset % ALIGNMENT, 0, "{} not aligned", e.name);
                    e.name.strip_prefix(top).unwrap().to_string()
                })
                .collect::<Vec<_>>()
        };
        let released = names(original, "attn_gate_weights/");
        let tensors: Vec<RawTensor> = (0..5).map(|l| gate_tensor(l, 'k', DType::F32, &[3, 5, 7])).collect();
        let ours = names(pth_bytes("gate", &tensors).unwrap(), "gate/");
        let data = |v: &[String]| v.iter().filter(|n| n.starts_with("data/")).count();
        let skeleton = |v: &[String]| v.iter().filter(|n| !n.starts_with("data/")).cloned().collect::<Vec<_>>();
        assert_eq!(skeleton(&ours), skeleton(&released));
        assert_eq!((data(&released), data(&ours)), (2, 5));
        // Storages sit between byteorder and version, in key order.
        let at = ours.iter().position(|n| n == "byteorder").unwrap();
        assert_eq!(ours[at + 1..at + 6], (0..5).map(|k| format!("data/{k}")).collect::<Vec<_>>()[..]);
    }

    #[test]
    fn round_trips_shapes_dtypes_and_large_dicts() {
        let mut tensors = vec![
            gate_tensor(0, 'k', DType::BF16, &[2, 3, 4]),
            gate_tensor(1, 'k', DType::F32, &[5]),
            gate_tensor(2, 'k', DType::F16, &[]),
            gate_tensor(3, 'k', DType::BF16, &[1, 2, 3, 4, 5]),
            gate_tensor(4, 'k', DType::F32, &[2, 0, 3]),
            gate_tensor(5, 'k', DType::BF16, &[70_000, 2]),
        ];
        for l in 6..1006 {
            tensors.push(gate_tensor(l, 'q', DType::BF16, &[1, 2]));
        }
        for n in [0, 1, 2, 6, 1000, tensors.len()] {
            let bytes = pth_bytes("t", &tensors[..n]).unwrap();
            assert_eq!(read_pth_bytes("t", bytes).unwrap(), tensors[..n], "{n} tensors");
        }
        assert!(
            matches!(pth_bytes("t", &[tensors[0].clone(), tensors[0].clone()]), Err(Error::InvalidArgument(m)) if m.contains("twice"))
        );
        let mut short = tensors[0].clone();
        short.data.pop();
        assert!(matches!(pth_bytes("t", &[short]), Err(Error::InvalidArgument(m)) if m.contains("do not fit")));
        assert!(pth_bytes("a/b", &[]).is_err());
    }

    #[test]
    fn ints_and_tuples_as_cpython_writes_them() {
        let mut p = Pickler { out: Vec::new(), memo_len: 0 };
        for v in [0, 255, 256, 65535, 65536, 0x7FFF_FFFF, 0x8000_0000, u64::MAX] {
            p.int(v);
        }
        let want: Vec<u8> = [
            &b"K\x00K\xffM\x00\x01M\xff\xffJ\x00\x00\x01\x00J\xff\xff\xff\x7f"[..],
            b"\x8a\x05\x00\x00\x00\x80\x00",
            b"\x8a\x09\xff\xff\xff\xff\xff\xff\xff\xff\x00",
        ]
        .concat();
        assert_eq!(p.out, want);
        assert_eq!(contiguous_strides(&[2, 0, 3]), [3, 3, 1]);
        assert_eq!(contiguous_strides(&[8, 384, 128]), [49152, 128, 1]);
        p.memo_len = 255;
        p.out.clear();
        p.int_tuple(&[1, 2, 3, 4]);
        p.int_tuple(&[]);
        p.get(256);
        assert_eq!(p.out, b"(K\x01K\x02K\x03K\x04tq\xff)j\x00\x01\x00\x00");
        p.out.clear();
        p.int_tuple(&[7]);
        assert_eq!(p.out, b"K\x07\x85r\x00\x01\x00\x00");
    }
}
