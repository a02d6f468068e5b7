//! A minimal, bounds-checked reader for the ZIP archives `torch.save` writes.
//!
//! `torch.save` stores every record uncompressed ("stored", method 0), puts the
//! sizes only in the central directory (local headers carry flag bit 3 and
//! zero sizes), pads local headers with an `FB` extra field so tensor data is
//! 64-byte aligned, and always appends a ZIP64 end-of-central-directory
//! record. This reader handles exactly that family: it trusts nothing in the
//! file, checks every offset and length against the file size with checked
//! arithmetic, verifies CRC-32s, and refuses compression, encryption,
//! multi-disk archives and duplicate names with a [`Error::Format`] naming the
//! problem. A zip crate would bring decompressors and a far larger surface for
//! what is, here, a table of byte ranges.

use crate::error::{Error, Result};

/// Signatures (little-endian u32) of the records this reader understands.
const SIG_LOCAL: u32 = 0x0403_4b50;
const SIG_CENTRAL: u32 = 0x0201_4b50;
const SIG_EOCD: u32 = 0x0605_4b50;
const SIG_ZIP64_EOCD: u32 = 0x0606_4b50;
const SIG_ZIP64_LOCATOR: u32 = 0x0706_4b50;

const EOCD_LEN: usize = 22;
const ZIP64_LOCATOR_LEN: usize = 20;
const ZIP64_EOCD_LEN: usize = 56;
const CENTRAL_LEN: usize = 46;
const LOCAL_LEN: usize = 30;
/// The EOCD may be followed by a comment of at most this many bytes.
const MAX_COMMENT: usize = 0xFFFF;
/// A gate checkpoint has a handful of records per layer; far more than this
/// means a hostile or unrelated archive.
pub(crate) const MAX_ENTRIES: usize = 1 << 16;

/// One stored member: its name and where its bytes lie in the archive.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub name: String,
    start: usize,
    len: usize,
}

/// A parsed archive holding the whole file in memory.
#[derive(Debug)]
pub(crate) struct ZipArchive {
    path: String,
    bytes: Vec<u8>,
    entries: Vec<Entry>,
}

/// Little-endian reads that fail (instead of panicking) past the end.
fn slice(b: &[u8], at: usize, len: usize) -> Option<&[u8]> {
    b.get(at..at.checked_add(len)?)
}
fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    let s = slice(b, at, 2)?;
    Some(u16::from_le_bytes([s[0], s[1]]))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let s = slice(b, at, 4)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    let s = slice(b, at, 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_le_bytes(a))
}

/// CRC-32 (IEEE, reflected), as ZIP uses it. Table built at compile time.
const CRC_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

pub(crate) fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC_TABLE[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
}

/// Where the central directory lies, from the (ZIP64) end records.
struct Directory {
    offset: usize,
    size: usize,
    count: usize,
}

impl ZipArchive {
    /// Parse `bytes` (the whole file); `path` names the file in errors.
    pub(crate) fn parse(path: &str, bytes: Vec<u8>) -> Result<Self> {
        let dir = find_directory(path, &bytes)?;
        let entries = read_central(path, &bytes, &dir)?;
        Ok(ZipArchive { path: path.to_string(), bytes, entries })
    }

    pub(crate) fn path(&self) -> &str {
        &self.path
    }

    pub(crate) fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The stored bytes of member `name`, if present.
    pub(crate) fn get(&self, name: &str) -> Option<&[u8]> {
        let e = self.entries.iter().find(|e| e.name == name)?;
        // In range by construction (checked in `read_central`).
        self.bytes.get(e.start..e.start + e.len)
    }
}

fn find_directory(path: &str, b: &[u8]) -> Result<Directory> {
    let err = |m: String| Error::format(path, m);
    if b.len() < EOCD_LEN {
        return Err(err(format!(
            "not a zip archive: {} bytes is shorter than an end-of-central-directory record",
            b.len()
        )));
    }
    // Search backwards over at most the largest possible comment.
    let last = b.len() - EOCD_LEN;
    let first = last.saturating_sub(MAX_COMMENT);
    let eocd = (first..=last)
        .rev()
        .find(|&i| u32_at(b, i) == Some(SIG_EOCD))
        .ok_or_else(|| err("not a zip archive: no end-of-central-directory record (truncated?)".into()))?;
    let field16 = |o: usize| u16_at(b, eocd + o).ok_or_else(|| err("truncated end-of-central-directory record".into()));
    let field32 = |o: usize| u32_at(b, eocd + o).ok_or_else(|| err("truncated end-of-central-directory record".into()));
    let (disk, cd_disk) = (field16(4)?, field16(6)?);
    let (n_disk, n_total) = (field16(8)?, field16(10)?);
    let (cd_size, cd_offset) = (field32(12)?, field32(16)?);
    let comment_len = field16(20)? as usize;
    if eocd + EOCD_LEN + comment_len != b.len() {
        return Err(err(
            "end-of-central-directory comment length disagrees with the file size (truncated or trailing data)".into(),
        ));
    }

    let zip64_locator = eocd.checked_sub(ZIP64_LOCATOR_LEN).filter(|&l| u32_at(b, l) == Some(SIG_ZIP64_LOCATOR));
    let dir = if let Some(loc) = zip64_locator {
        let disks = u32_at(b, loc + 16).ok_or_else(|| err("truncated ZIP64 locator".into()))?;
        let rec = u64_at(b, loc + 8).ok_or_else(|| err("truncated ZIP64 locator".into()))?;
        if disks > 1 {
            return Err(err(format!("multi-disk archives are not supported ({disks} disks)")));
        }
        let rec = usize::try_from(rec).ok().filter(|&r| r.checked_add(ZIP64_EOCD_LEN).is_some_and(|e| e <= loc));
        let rec = rec.ok_or_else(|| err("ZIP64 end-of-central-directory offset points outside the file".into()))?;
        if u32_at(b, rec) != Some(SIG_ZIP64_EOCD) {
            return Err(err("bad ZIP64 end-of-central-directory signature".into()));
        }
        let f32_ = |o: usize| u32_at(b, rec + o).ok_or_else(|| err("truncated ZIP64 end record".into()));
        let f64_ = |o: usize| u64_at(b, rec + o).ok_or_else(|| err("truncated ZIP64 end record".into()));
        if f32_(16)? != 0 || f32_(20)? != 0 || f64_(24)? != f64_(32)? {
            return Err(err("multi-disk archives are not supported".into()));
        }
        let to_usize =
            |v: u64, what: &str| usize::try_from(v).map_err(|_| err(format!("ZIP64 {what} {v} is out of range")));
        Directory {
            count: to_usize(f64_(32)?, "entry count")?,
            size: to_usize(f64_(40)?, "directory size")?,
            offset: to_usize(f64_(48)?, "directory offset")?,
        }
    } else {
        if disk != 0 || cd_disk != 0 || n_disk != n_total {
            return Err(err("multi-disk archives are not supported".into()));
        }
        Directory { count: n_total as usize, size: cd_size as usize, offset: cd_offset as usize }
    };
    // The directory must lie before the end records and hold at least a
    // fixed-size header per entry; this also caps the entry count by file size.
    let end = dir.offset.checked_add(dir.size).filter(|&e| e <= eocd);
    if end.is_none() {
        return Err(err(format!(
            "central directory (offset {}, {} bytes) extends past the end records at {eocd}",
            dir.offset, dir.size
        )));
    }
    if dir.count > MAX_ENTRIES || dir.count.checked_mul(CENTRAL_LEN).map_or(true, |n| n > dir.size) {
        return Err(err(format!("implausible entry count {} for a {}-byte central directory", dir.count, dir.size)));
    }
    Ok(dir)
}

fn read_central(path: &str, b: &[u8], dir: &Directory) -> Result<Vec<Entry>> {
    let err = |m: String| Error::format(path, m);
    let cd_end = dir.offset + dir.size; // checked in find_directory
    let mut entries: Vec<Entry> = Vec::with_capacity(dir.count);
    let mut at = dir.offset;
    for index in 0..dir.count {
        let trunc = || err(format!("central directory entry {index} is truncated"));
        if at.checked_add(CENTRAL_LEN).map_or(true, |e| e > cd_end) {
            return Err(trunc());
        }
        if u32_at(b, at) != Some(SIG_CENTRAL) {
            return Err(err(format!("central directory entry {index}: bad signature")));
        }
        let f16 = |o: usize| u16_at(b, at + o).ok_or_else(trunc);
        let f32_ = |o: usize| u32_at(b, at + o).ok_or_else(trunc);
        let (flags, method) = (f16(8)?, f16(10)?);
        let crc = f32_(16)?;
        let (mut csize, mut usize_, mut local) = (f32_(20)? as u64, f32_(24)? as u64, f32_(42)? as u64);
        let (name_len, extra_len, comment_len) = (f16(28)? as usize, f16(30)? as usize, f16(32)? as usize);
        let disk_start = f16(34)?;
        let name_at = at + CENTRAL_LEN;
        let extra_at = name_at + name_len;
        let next = extra_at + extra_len + comment_len; // each term < 2^16: no overflow
        if next > cd_end {
            return Err(trunc());
        }
        let name_bytes = slice(b, name_at, name_len).ok_or_else(trunc)?;
        let name = std::str::from_utf8(name_bytes)
            .map_err(|_| err(format!("central directory entry {index}: name is not UTF-8")))?
            .to_string();
        let extra = slice(b, extra_at, extra_len).ok_or_else(trunc)?;
        // ZIP64 extended information: the 8-byte values replace, in this
        // order, exactly those 32-bit fields that hold 0xFFFFFFFF.
        if let Some(mut z) = find_extra(extra, 0x0001) {
            for field in [&mut usize_, &mut csize, &mut local] {
                if *field == 0xFFFF_FFFF {
                    let v = u64_at(z, 0).ok_or_else(|| err(format!("{name}: truncated ZIP64 extra field")))?;
                    *field = v;
                    z = z.get(8..).unwrap_or(&[]);
                }
            }
        }
        if disk_start != 0 {
            return Err(err(format!("{name}: entry on another disk; multi-disk archives are not supported")));
        }
        if flags & 1 != 0 {
            return Err(err(format!("{name}: encrypted entries are not supported")));
        }
        if method != 0 {
            return Err(err(format!(
                "{name}: compressed entry (method {method}); torch.save stores members uncompressed, re-save without compression"
            )));
        }
        if csize != usize_ {
            return Err(err(format!("{name}: stored entry with compressed size {csize} != size {usize_}")));
        }
        let start = local_data_start(path, b, &name, local)?;
        let len = usize::try_from(usize_).map_err(|_| err(format!("{name}: size {usize_} out of range")))?;
        if start.checked_add(len).map_or(true, |e| e > dir.offset) {
            return Err(err(format!(
                "{name}: {len} bytes at offset {start} run past the entries' region (truncated?)"
            )));
        }
        let data = &b[start..start + len];
        if crc32(data) != crc {
            return Err(err(format!("{name}: CRC-32 mismatch (corrupted data)")));
        }
        if entries.iter().any(|e| e.name == name) {
            return Err(err(format!("duplicate entry '{name}'")));
        }
        entries.push(Entry { name, start, len });
        at = next;
    }
    Ok(entries)
}

/// The payload of the extra field with header id `id`, if present.
fn find_extra(mut extra: &[u8], id: u16) -> Option<&[u8]> {
    while extra.len() >= 4 {
        let hid = u16_at(extra, 0)?;
        let len = u16_at(extra, 2)? as usize;
        let body = slice(extra, 4, len)?;
        if hid == id {
            return Some(body);
        }
        extra = extra.get(4 + len..)?;
    }
    None
}

/// Offset of an entry's data, read from its local header at `local`.
fn local_data_start(path: &str, b: &[u8], name: &str, local: u64) -> Result<usize> {
    let err = |m: &str| Error::format(path, format!("{name}: {m}"));
    let local = usize::try_from(local).map_err(|_| err("local header offset out of range"))?;
    if u32_at(b, local) != Some(SIG_LOCAL) {
        return Err(err("local header missing or bad signature (truncated?)"));
    }
    let name_len = u16_at(b, local + 26).ok_or_else(|| err("truncated local header"))? as usize;
    let extra_len = u16_at(b, local + 28).ok_or_else(|| err("truncated local header"))? as usize;
    let method = u16_at(b, local + 8).ok_or_else(|| err("truncated local header"))?;
    if method != 0 {
        return Err(err(&format!("compressed entry (method {method} in its local header)")));
    }
    // The local name must match the directory's, so the two views of the
    // archive cannot disagree about which bytes belong to which member.
    if slice(b, local + LOCAL_LEN, name_len) != Some(name.as_bytes()) {
        return Err(err("local header name differs from the central directory"));
    }
    local
        .checked_add(LOCAL_LEN + name_len + extra_len)
        .filter(|&s| s <= b.len())
        .ok_or_else(|| err("local header runs past the end of the file"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Build a stored zip archive the way torch does (no ZIP64 unless asked).
    pub(crate) fn build_zip(members: &[(&str, &[u8])], method: u16, zip64: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let mut central = Vec::new();
        for (name, data) in members {
            let off = out.len() as u32;
            let crc = crc32(data);
            out.extend_from_slice(&SIG_LOCAL.to_le_bytes());
            out.extend_from_slice(&[20, 0, 0, 0]);
            out.extend_from_slice(&method.to_le_bytes());
            out.extend_from_slice(&[0; 4]);
            out.extend_from_slice(&crc.to_le_bytes());
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(&0u16.to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(data);
            central.extend_from_slice(&SIG_CENTRAL.to_le_bytes());
            central.extend_from_slice(&[20, 0, 20, 0, 0, 0]);
            central.extend_from_slice(&method.to_le_bytes());
            central.extend_from_slice(&[0; 4]);
            central.extend_from_slice(&crc.to_le_bytes());
            central.extend_from_slice(&(data.len() as u32).to_le_bytes());
            central.extend_from_slice(&(data.len() as u32).to_le_bytes());
            central.extend_from_slice(&(name.len() as u16).to_le_bytes());
            central.extend_from_slice(&[0; 12]);
            central.extend_from_slice(&off.to_le_bytes());
            central.extend_from_slice(name.as_bytes());
        }
        let cd_off = out.len();
        out.extend_from_slice(&central);
        let n = members.len();
        if zip64 {
            let rec = out.len() as u64;
            out.extend_from_slice(&SIG_ZIP64_EOCD.to_le_bytes());
            out.extend_from_slice(&44u64.to_le_bytes());
            out.extend_from_slice(&[45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            out.extend_from_slice(&(n as u64).to_le_bytes());
            out.extend_from_slice(&(n as u64).to_le_bytes());
            out.extend_from_slice(&(central.len() as u64).to_le_bytes());
            out.extend_from_slice(&(cd_off as u64).to_le_bytes());
            out.extend_from_slice(&SIG_ZIP64_LOCATOR.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&rec.to_le_bytes());
            out.extend_from_slice(&1u32.to_le_bytes());
        }
        out.extend_from_slice(&SIG_EOCD.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        let (n16, sz, off) =
            if zip64 { (0xFFFF, u32::MAX, u32::MAX) } else { (n as u16, central.len() as u32, cd_off as u32) };
        out.extend_from_slice(&n16.to_le_bytes());
        out.extend_from_slice(&n16.to_le_bytes());
        out.extend_from_slice(&sz.to_le_bytes());
        out.extend_from_slice(&off.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out
    }

    #[test]
    fn crc_known_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn reads_plain_and_zip64() {
        for zip64 in [false, true] {
            let z = ZipArchive::parse("t.zip", build_zip(&[("a/x", b"hello"), ("a/y", b"")], 0, zip64)).unwrap();
            assert_eq!(z.get("a/x"), Some(&b"hello"[..]));
            assert_eq!(z.get("a/y"), Some(&b""[..]));
            assert_eq!(z.get("a/z"), None);
            assert_eq!(z.entries().len(), 2);
        }
    }

    #[test]
    fn refuses_compression_corruption_duplicates_and_truncation() {
        let msg = |bytes: Vec<u8>| match ZipArchive::parse("t.zip", bytes) {
            Err(Error::Format { path, message }) => {
                assert_eq!(path, "t.zip");
                message
            }
            other => panic!("expected a format error, got {other:?}"),
        };
        assert!(msg(build_zip(&[("a", b"xyz")], 8, false)).contains("compressed"));
        assert!(msg(build_zip(&[("a", b"1"), ("a", b"2")], 0, false)).contains("duplicate"));
        let mut flipped = build_zip(&[("a", b"xyz")], 0, false);
        flipped[31] ^= 1; // the first data byte after the 30-byte header and 1-byte name
        assert!(msg(flipped).contains("CRC"));
        let whole = build_zip(&[("a", b"xyz"), ("b", b"pq")], 0, true);
        for cut in 0..whole.len() {
            msg(whole[..cut].to_vec());
        }
        assert!(msg(Vec::new()).contains("not a zip"));
    }
}
