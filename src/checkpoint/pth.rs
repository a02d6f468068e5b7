//! `torch.save` archives (`.pth`) to [`RawTensor`]s: the zip reader finds
//! `<top>/data.pkl`, the restricted pickle interpreter turns it into tensor
//! records, and this module resolves each record's storage to the
//! `<top>/data/<key>` member, checks dtype, byte order, element counts,
//! offsets and strides against the bytes actually present, and copies each
//! tensor out as contiguous little-endian data (gathering when the saved
//! tensor was a strided view).

use super::pickle::{self, TensorRecord, Value};
use super::zip::ZipArchive;
use super::RawTensor;
use crate::error::{Error, Result};
use crate::tensor::DType;
use std::collections::HashMap;

/// Tensors may share storages, so the output can exceed the archive; more
/// than this multiple of it can only come from views that alias the same
/// bytes over and over, which weight files do not need (and which would let a
/// small file demand unbounded memory).
const MAX_OUTPUT_FACTOR: usize = 4;

/// Read every tensor of the `torch.save` archive `bytes`; `path` names it in errors.
pub(crate) fn read_pth_bytes(path: &str, bytes: Vec<u8>) -> Result<Vec<RawTensor>> {
    let archive_len = bytes.len();
    let zip = ZipArchive::parse(path, bytes)?;
    let fmt = |m: String| Error::format(path, m);
    let top = top_folder(&zip)?;

    match zip.get(&format!("{top}/byteorder")) {
        // Archives from before torch 1.10 have no byteorder record and are little-endian.
        None | Some(b"little") => {}
        Some(b"big") => return Err(Error::unsupported(format!("{path}: big-endian tensor data (byteorder 'big')"))),
        Some(other) => {
            return Err(fmt(format!("{top}/byteorder holds {:?}, expected 'little'", String::from_utf8_lossy(other))))
        }
    }

    let pkl_name = format!("{top}/data.pkl");
    let pkl = zip.get(&pkl_name).ok_or_else(|| fmt(format!("missing {pkl_name}")))?;
    let root = pickle::load(path, &pkl_name, pkl)?;
    let Value::Dict(items) = root else {
        return Err(fmt(format!("{pkl_name} holds a {}, expected a dict of tensors", root.kind())));
    };

    let mut out: Vec<RawTensor> = Vec::with_capacity(items.len());
    let mut storage_class: HashMap<String, String> = HashMap::new();
    let mut total = 0usize;
    for (key, value) in items {
        let Value::Str(name) = key else {
            return Err(fmt(format!("{pkl_name}: a dict key is a {}, not a string", key.kind())));
        };
        let Value::Tensor(rec) = value else {
            return Err(fmt(format!("entry '{name}' is not a tensor")));
        };
        if out.iter().any(|t| t.name == name) {
            return Err(fmt(format!("tensor '{name}' appears twice")));
        }
        // One storage read as two dtypes would reinterpret bytes.
        let prev = storage_class.entry(rec.storage.key.clone()).or_insert_with(|| rec.storage.class.clone());
        if *prev != rec.storage.class {
            return Err(fmt(format!(
                "tensor '{name}': storage '{}' used as both torch.{prev} and torch.{}",
                rec.storage.key, rec.storage.class
            )));
        }
        let t = resolve(path, &zip, &top, &name, &rec)?;
        total = total.saturating_add(t.data.len());
        if total > archive_len.saturating_mul(MAX_OUTPUT_FACTOR) {
            return Err(fmt(format!(
                "tensors total more than {MAX_OUTPUT_FACTOR}x the archive size at '{name}' (aliasing views are not supported)"
            )));
        }
        out.push(t);
    }
    Ok(out)
}

/// The archive's single top folder, the one holding `data.pkl`. torch names
/// it after the file it first wrote, so any name is accepted.
fn top_folder(zip: &ZipArchive) -> Result<String> {
    let tops: Vec<&str> = zip
        .entries()
        .iter()
        .filter_map(|e| e.name.strip_suffix("/data.pkl"))
        .filter(|t| !t.is_empty() && !t.contains('/'))
        .collect();
    match tops.as_slice() {
        [one] => Ok(one.to_string()),
        [] => Err(Error::format(zip.path(), "no <folder>/data.pkl member: not a torch.save archive")),
        many => Err(Error::format(zip.path(), format!("several data.pkl members ({})", many.join(", ")))),
    }
}

fn dtype_of(path: &str, name: &str, class: &str) -> Result<DType> {
    match class {
        "BFloat16Storage" => Ok(DType::BF16),
        "HalfStorage" => Ok(DType::F16),
        "FloatStorage" => Ok(DType::F32),
        other => Err(Error::unsupported(format!(
            "{path}: tensor '{name}' has storage type torch.{other}; supported: torch.BFloat16Storage, torch.HalfStorage, torch.FloatStorage"
        ))),
    }
}

fn resolve(path: &str, zip: &ZipArchive, top: &str, name: &str, rec: &TensorRecord) -> Result<RawTensor> {
    let fmt = |m: String| Error::format(path, format!("tensor '{name}': {m}"));
    let dtype = dtype_of(path, name, &rec.storage.class)?;
    let es = dtype.size();
    let key = &rec.storage.key;
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(fmt(format!("storage key {key:?} is not a plain record name")));
    }
    let member = format!("{top}/data/{key}");
    let data = zip.get(&member).ok_or_else(|| fmt(format!("storage record {member} is missing")))?;
    let numel_storage = usize::try_from(rec.storage.numel).ok().filter(|n| n.checked_mul(es) == Some(data.len()));
    let numel_storage = numel_storage.ok_or_else(|| {
        fmt(format!(
            "storage {member} declares {} {} elements but holds {} bytes",
            rec.storage.numel,
            dtype.name(),
            data.len()
        ))
    })?;

    let to_usize = |v: u64, what: &str| usize::try_from(v).map_err(|_| fmt(format!("{what} {v} out of range")));
    let shape = rec.size.iter().map(|&s| to_usize(s, "size")).collect::<Result<Vec<_>>>()?;
    let stride = rec.stride.iter().map(|&s| to_usize(s, "stride")).collect::<Result<Vec<_>>>()?;
    let offset = to_usize(rec.offset, "storage offset")?;
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &s| a.checked_mul(s))
        .ok_or_else(|| fmt(format!("shape {shape:?} overflows")))?;
    if numel > numel_storage {
        return Err(fmt(format!(
            "shape {shape:?} has {numel} elements but its storage only {numel_storage} (aliasing view)"
        )));
    }
    if numel == 0 {
        return Ok(RawTensor { name: name.to_string(), dtype, shape, data: Vec::new() });
    }
    // Largest element offset the view addresses must lie inside the storage.
    let last = shape.iter().zip(&stride).try_fold(offset, |acc, (&n, &s)| acc.checked_add((n - 1).checked_mul(s)?));
    if last.map_or(true, |l| l >= numel_storage) {
        return Err(fmt(format!(
            "offset {offset}, shape {shape:?} and strides {stride:?} address past the {numel_storage} elements of {member}"
        )));
    }

    let mut contiguous_stride = 1usize;
    let contiguous = shape.iter().zip(&stride).rev().all(|(&n, &s)| {
        let ok = n == 1 || s == contiguous_stride;
        contiguous_stride = contiguous_stride.saturating_mul(n);
        ok
    });
    let out = if contiguous {
        data.get(offset * es..(offset + numel) * es).map(<[u8]>::to_vec)
    } else {
        gather(data, es, offset, &shape, &stride, numel)
    };
    let out = out.ok_or_else(|| fmt("element range out of bounds".to_string()))?;
    Ok(RawTensor { name: name.to_string(), dtype, shape, data: out })
}

/// Copy a strided view element by element into row-major order. The caller
/// has checked that every addressed element lies in `data`; `None` if not.
fn gather(data: &[u8], es: usize, offset: usize, shape: &[usize], stride: &[usize], numel: usize) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(numel * es);
    let mut index = vec![0usize; shape.len()];
    let mut at = offset;
    for _ in 0..numel {
        out.extend_from_slice(data.get(at * es..(at + 1) * es)?);
        // Odometer increment, last dimension fastest, keeping `at` in step.
        for d in (0..shape.len()).rev() {
            // Wrapping: a size-1 dimension may carry any stride, and the
            // arithmetic is exact modulo 2^64 once the carry is undone.
            index[d] += 1;
            at = at.wrapping_add(stride[d]);
            if index[d] < shape[d] {
                break;
            }
            at = at.wrapping_sub(stride[d].wrapping_mul(shape[d]));
            index[d] = 0;
        }
    }
    Some(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::zip::tests::build_zip;
    use super::*;

    /// (name, storage class, storage key, storage numel, offset, size, stride).
    pub(crate) type Spec<'a> = (&'a str, &'a str, &'a str, u32, u32, &'a [u32], &'a [u32]);

    /// A pickle of `{name: _rebuild_tensor_v2(storage(class, key, numel), offset, size, stride, False, OrderedDict())}`
    /// for each tensor, in torch's opcode sequence.
    pub(crate) fn state_dict_pickle(tensors: &[Spec<'_>]) -> Vec<u8> {
        let mut p = vec![0x80, 2, b'}', b'('];
        let s = |p: &mut Vec<u8>, s: &str| {
            p.push(b'X');
            p.extend_from_slice(&(s.len() as u32).to_le_bytes());
            p.extend_from_slice(s.as_bytes());
        };
        let int = |p: &mut Vec<u8>, v: u32| {
            p.push(b'J');
            p.extend_from_slice(&v.to_le_bytes());
        };
        for (name, class, key, numel, offset, size, stride) in tensors {
            s(&mut p, name);
            p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n((");
            s(&mut p, "storage");
            p.extend_from_slice(format!("ctorch\n{class}\n").as_bytes());
            s(&mut p, key);
            s(&mut p, "cpu");
            int(&mut p, *numel);
            p.extend_from_slice(b"tQ");
            int(&mut p, *offset);
            for dims in [size, stride] {
                p.push(b'(');
                for &d in dims.iter() {
                    int(&mut p, d);
                }
                p.push(b't');
            }
            p.extend_from_slice(b"\x89ccollections\nOrderedDict\n)RtR");
        }
        p.extend_from_slice(b"u.");
        p
    }

    pub(crate) fn archive(pkl: &[u8], records: &[(&str, &[u8])]) -> Vec<u8> {
        let mut members: Vec<(String, &[u8])> =
            vec![("arch/data.pkl".into(), pkl), ("arch/byteorder".into(), b"little")];
        for (k, d) in records {
            members.push((format!("arch/data/{k}"), d));
        }
        let refs: Vec<(&str, &[u8])> = members.iter().map(|(n, d)| (n.as_str(), *d)).collect();
        build_zip(&refs, 0, true)
    }

    #[test]
    fn reads_contiguous_offset_and_strided_views() {
        let storage: Vec<u8> = (0u16..12).flat_map(|v| v.to_le_bytes()).collect();
        let pkl = state_dict_pickle(&[
            ("a", "BFloat16Storage", "0", 12, 0, &[3, 4], &[4, 1]),
            ("b", "BFloat16Storage", "0", 12, 2, &[2, 2], &[4, 1]),
            ("t", "BFloat16Storage", "0", 12, 0, &[4, 3], &[1, 4]), // a transposed view
        ]);
        let ts = read_pth_bytes("x.pth", archive(&pkl, &[("0", &storage)])).unwrap();
        let elems =
            |t: &RawTensor| t.data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect::<Vec<_>>();
        assert_eq!(ts[0].shape, vec![3, 4]);
        assert_eq!(elems(&ts[0]), (0..12).collect::<Vec<_>>());
        assert_eq!(elems(&ts[1]), vec![2, 3, 6, 7]);
        assert_eq!(ts[2].shape, vec![4, 3]);
        assert_eq!(elems(&ts[2]), vec![0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]);
        assert!(ts.iter().all(|t| t.dtype == DType::BF16));
    }

    #[test]
    fn refuses_bad_storages() {
        let storage = vec![0u8; 24];
        let cases: [(&[Spec<'_>], &str); 5] = [
            (&[("a", "BFloat16Storage", "0", 13, 0, &[12], &[1])], "declares 13"),
            (&[("a", "BFloat16Storage", "0", 12, 1, &[12], &[1])], "address past"),
            (&[("a", "BFloat16Storage", "0", 12, 0, &[4, 4], &[0, 1])], "aliasing"),
            (&[("a", "BFloat16Storage", "7", 12, 0, &[12], &[1])], "missing"),
            (&[("a", "BFloat16Storage", "0", 12, 0, &[6], &[1]), ("b", "HalfStorage", "0", 12, 0, &[6], &[1])], "both"),
        ];
        for (tensors, want) in cases {
            match read_pth_bytes("x.pth", archive(&state_dict_pickle(tensors), &[("0", &storage)])) {
                Err(Error::Format { message, .. }) => assert!(message.contains(want), "{message} lacks {want}"),
                other => panic!("expected format error with {want}, got {other:?}"),
            }
        }
        let long = state_dict_pickle(&[("a", "LongStorage", "0", 3, 0, &[3], &[1])]);
        match read_pth_bytes("x.pth", archive(&long, &[("0", &storage)])) {
            Err(Error::Unsupported(m)) => assert!(m.contains("LongStorage") && m.contains("'a'"), "{m}"),
            other => panic!("expected unsupported, got {other:?}"),
        }
    }

    /// Mutated pickles inside archives with valid CRCs, so that the damage
    /// reaches the interpreter and the storage checks rather than the zip layer.
    #[test]
    fn mutated_pickles_never_panic() {
        let storage = vec![0u8; 24];
        let base = state_dict_pickle(&[
            ("a", "BFloat16Storage", "0", 12, 0, &[3, 4], &[4, 1]),
            ("b", "BFloat16Storage", "0", 12, 2, &[2, 2], &[4, 1]),
        ]);
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..500 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut p = base.clone();
            let i = (seed % p.len() as u64) as usize;
            p[i] = (seed >> 24) as u8;
            let r = std::panic::catch_unwind(|| read_pth_bytes("x.pth", archive(&p, &[("0", &storage)])));
            assert!(r.is_ok(), "panic on a pickle mutated at byte {i}");
        }
    }
}
