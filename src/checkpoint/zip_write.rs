//! The ZIP container of a `torch.save` archive, written byte for byte as
//! PyTorch's `PyTorchStreamWriter` (caffe2/serialize/inline_container.cc, over
//! miniz) writes it; checked against the released gate files in
//! `tests/data/upstream/*_gates/`, which it reproduces exactly.
//!
//! Layout of every record: a local header with flags 0x0808 (data descriptor
//! follows, UTF-8 name), method 0 (stored), zero time, CRC and sizes; an `FB`
//! extra field of `Z` bytes padding the data to a 64-byte boundary; the data;
//! a 16-byte data descriptor (signature, CRC-32, sizes). After the records:
//! the central directory (no extra fields), a ZIP64 end record, its locator
//! and the classic end record. `finish` appends the two records torch writes
//! when it closes an archive, `version` and `.data/serialization_id`.
//!
//! Records and offsets stay below 4 GiB (torch would switch to ZIP64 extra
//! fields there); larger archives are refused rather than written in a
//! layout never compared with torch's.

use super::zip::crc32;
use crate::error::{Error, Result};

const SIG_LOCAL: u32 = 0x0403_4b50;
const SIG_DESCRIPTOR: u32 = 0x0807_4b50;
const SIG_CENTRAL: u32 = 0x0201_4b50;
const SIG_ZIP64_EOCD: u32 = 0x0606_4b50;
const SIG_ZIP64_LOCATOR: u32 = 0x0706_4b50;
const SIG_EOCD: u32 = 0x0605_4b50;
/// General-purpose flags: bit 3 (sizes in a data descriptor), bit 11 (UTF-8).
const FLAGS: u16 = 0x0808;
const LOCAL_LEN: usize = 30;
/// torch's `kFieldAlignment`: every record's data starts at a multiple of it.
pub(crate) const ALIGNMENT: usize = 64;
/// The `version` record of a `torch.save` archive (`kMinProducedFileFormatVersion`).
const VERSION_RECORD: &[u8] = b"3\n";
/// Above this, miniz would write ZIP64 sizes and offsets.
const LIMIT_32: u64 = 0xFFFF_FFFF;

/// One record already written: what the central directory repeats.
struct Written {
    name: String,
    crc: u32,
    len: u32,
    offset: u32,
}

/// An archive being written in memory, records in the order given.
pub(crate) struct StreamWriter {
    prefix: String,
    out: Vec<u8>,
    records: Vec<Written>,
    /// `combined_uncomp_crc32_`: every record's CRC folded in write order.
    combined_crc: u64,
}

impl StreamWriter {
    /// An empty archive whose records live under `archive_name/` (torch
    /// uses the file name without its extension).
    pub(crate) fn new(archive_name: &str) -> Result<Self> {
        if archive_name.is_empty() || archive_name.contains('/') || archive_name.contains('\\') {
            return Err(Error::invalid(format!("archive name {archive_name:?}: must be non-empty, without slashes")));
        }
        Ok(StreamWriter { prefix: format!("{archive_name}/"), out: Vec::new(), records: Vec::new(), combined_crc: 0 })
    }

    /// Append record `name` (relative to the archive folder) holding `data`.
    pub(crate) fn write_record(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let full = format!("{}{name}", self.prefix);
        if self.records.iter().any(|r| r.name == full) {
            return Err(Error::invalid(format!("record '{name}' written twice")));
        }
        let name_len = u16::try_from(full.len())
            .map_err(|_| Error::invalid(format!("record name '{full}' is longer than a ZIP name may be")))?;
        let cursor = self.out.len();
        // getPadding(): the data would start after the header, the name and
        // the extra field's own 4-byte header.
        let start = cursor + LOCAL_LEN + full.len() + 4;
        let pad = start.next_multiple_of(ALIGNMENT) - start;
        let end = start + pad + data.len() + 16;
        if cursor as u64 >= LIMIT_32 || data.len() as u64 >= LIMIT_32 || end as u64 >= LIMIT_32 {
            return Err(Error::unsupported(format!(
                "a .pth archive of 4 GiB or more (at record '{name}'); torch writes ZIP64 fields there, which this writer does not"
            )));
        }
        let crc = crc32(data);
        let o = &mut self.out;
        o.extend_from_slice(&SIG_LOCAL.to_le_bytes());
        o.extend_from_slice(&0u16.to_le_bytes()); // version needed, as miniz leaves it
        o.extend_from_slice(&FLAGS.to_le_bytes());
        o.extend_from_slice(&[0; 2 + 2 + 2 + 4 + 4 + 4]); // method, time, date, crc, sizes
        o.extend_from_slice(&name_len.to_le_bytes());
        o.extend_from_slice(&((pad + 4) as u16).to_le_bytes());
        o.extend_from_slice(full.as_bytes());
        o.extend_from_slice(b"FB");
        o.extend_from_slice(&(pad as u16).to_le_bytes());
        o.resize(o.len() + pad, b'Z');
        debug_assert_eq!(o.len() % ALIGNMENT, 0);
        o.extend_from_slice(data);
        o.extend_from_slice(&SIG_DESCRIPTOR.to_le_bytes());
        o.extend_from_slice(&crc.to_le_bytes());
        o.extend_from_slice(&(data.len() as u32).to_le_bytes());
        o.extend_from_slice(&(data.len() as u32).to_le_bytes());
        self.combined_crc = hash_combine(self.combined_crc, u64::from(crc));
        self.records.push(Written { name: full, crc, len: data.len() as u32, offset: cursor as u32 });
        Ok(())
    }

    /// Write `version` and `.data/serialization_id`, the central directory
    /// and the end records; the archive's bytes.
    pub(crate) fn finish(mut self) -> Result<Vec<u8>> {
        self.write_record("version", VERSION_RECORD)?;
        let id = self.serialization_id();
        self.write_record(".data/serialization_id", id.as_bytes())?;

        let cd_offset = self.out.len();
        let o = &mut self.out;
        for r in &self.records {
            o.extend_from_slice(&SIG_CENTRAL.to_le_bytes());
            o.extend_from_slice(&[0; 4]); // version made by, version needed
            o.extend_from_slice(&FLAGS.to_le_bytes());
            o.extend_from_slice(&[0; 6]); // method, time, date
            o.extend_from_slice(&r.crc.to_le_bytes());
            o.extend_from_slice(&r.len.to_le_bytes());
            o.extend_from_slice(&r.len.to_le_bytes());
            o.extend_from_slice(&(r.name.len() as u16).to_le_bytes());
            o.extend_from_slice(&[0; 12]); // extra and comment lengths, disk, attributes
            o.extend_from_slice(&r.offset.to_le_bytes());
            o.extend_from_slice(r.name.as_bytes());
        }
        let cd_size = o.len() - cd_offset;
        let zip64_offset = o.len();
        let count = self.records.len() as u64;
        if count > 0xFFFF || o.len() as u64 + 98 >= LIMIT_32 {
            return Err(Error::unsupported(format!(
                "a .pth archive of {count} records and {} bytes exceeds the classic ZIP limits",
                o.len()
            )));
        }
        o.extend_from_slice(&SIG_ZIP64_EOCD.to_le_bytes());
        o.extend_from_slice(&44u64.to_le_bytes()); // size of the rest of this record
        o.extend_from_slice(&0x031eu16.to_le_bytes()); // made by: Unix, spec 3.0
        o.extend_from_slice(&45u16.to_le_bytes()); // needed: 4.5 (ZIP64)
        o.extend_from_slice(&[0; 8]); // this disk, directory disk
        o.extend_from_slice(&count.to_le_bytes());
        o.extend_from_slice(&count.to_le_bytes());
        o.extend_from_slice(&(cd_size as u64).to_le_bytes());
        o.extend_from_slice(&(cd_offset as u64).to_le_bytes());
        o.extend_from_slice(&SIG_ZIP64_LOCATOR.to_le_bytes());
        o.extend_from_slice(&0u32.to_le_bytes());
        o.extend_from_slice(&(zip64_offset as u64).to_le_bytes());
        o.extend_from_slice(&1u32.to_le_bytes());
        o.extend_from_slice(&SIG_EOCD.to_le_bytes());
        o.extend_from_slice(&[0; 4]);
        o.extend_from_slice(&(count as u16).to_le_bytes());
        o.extend_from_slice(&(count as u16).to_le_bytes());
        o.extend_from_slice(&(cd_size as u32).to_le_bytes());
        o.extend_from_slice(&(cd_offset as u32).to_le_bytes());
        o.extend_from_slice(&0u16.to_le_bytes());
        Ok(self.out)
    }

    /// `writeSerializationId()`: 20 decimal digits of the record names' hashes
    /// combined in the iteration order of torch's `std::unordered_set` of
    /// names, then 20 of the records' CRCs combined in write order. torch
    /// only logs it on load; it is reproduced so that the archive is the one
    /// torch would write.
    fn serialization_id(&self) -> String {
        let hashes: Vec<u64> =
            self.records.iter().map(|r| libstdcxx_hash(&r.name.as_bytes()[self.prefix.len()..])).collect();
        let names = unordered_set_order(&hashes).into_iter().fold(0, |acc, i| hash_combine(acc, hashes[i]));
        format!("{names:020}{:020}", self.combined_crc)
    }
}

/// `c10::hash_combine` on 64-bit `size_t`.
fn hash_combine(seed: u64, value: u64) -> u64 {
    seed ^ value.wrapping_add(0x9e37_79b9).wrapping_add(seed << 6).wrapping_add(seed >> 2)
}

/// `std::hash<std::string>` of libstdc++ on 64-bit Linux (the build torch's
/// wheels use): `std::_Hash_bytes(data, len, 0xc70f6907)`.
fn libstdcxx_hash(bytes: &[u8]) -> u64 {
    const MUL: u64 = (0xc6a4_a793 << 32) + 0x5bd1_e995;
    let shift_mix = |v: u64| v ^ (v >> 47);
    let mut hash = 0xc70f_6907 ^ (bytes.len() as u64).wrapping_mul(MUL);
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let w = u64::from_le_bytes(w.try_into().expect("chunks of 8"));
        hash ^= shift_mix(w.wrapping_mul(MUL)).wrapping_mul(MUL);
        hash = hash.wrapping_mul(MUL);
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        hash ^= rest.iter().rev().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
        hash = hash.wrapping_mul(MUL);
    }
    shift_mix(shift_mix(hash).wrapping_mul(MUL))
}

/// libstdc++'s bucket counts (`__prime_list` from index 6, as `_M_next_bkt`
/// searches it), far enough for the 65535 records a classic ZIP can hold.
const PRIMES: [usize; 128] = [
    17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97, 103, 109, 113, 127, 137, 139, 149, 157,
    167, 179, 193, 199, 211, 227, 241, 257, 277, 293, 313, 337, 359, 383, 409, 439, 467, 503, 541, 577, 619, 661, 709,
    761, 823, 887, 953, 1031, 1109, 1193, 1289, 1381, 1493, 1613, 1741, 1879, 2029, 2179, 2357, 2549, 2753, 2971, 3209,
    3469, 3739, 4027, 4349, 4703, 5087, 5503, 5953, 6427, 6949, 7517, 8123, 8783, 9497, 10273, 11113, 12011, 12983,
    14033, 15173, 16411, 17749, 19183, 20753, 22447, 24281, 26267, 28411, 30727, 33223, 35933, 38873, 42043, 45481,
    49201, 53201, 57557, 62233, 67307, 72817, 78779, 85229, 92203, 99733, 107897, 116731, 126271, 136607, 147793,
    159871, 172933, 187091, 202409, 218971, 236897, 256279, 277261, 299951,
];
/// `_M_next_bkt`'s table for requests below 14.
const FAST_BUCKETS: [usize; 14] = [2, 2, 2, 3, 5, 5, 7, 7, 11, 11, 11, 11, 13, 13];

/// Where a bucket's run of nodes begins: after the list head or after a node.
#[derive(Clone, Copy)]
enum Before {
    Head,
    Node(usize),
}

/// The iteration order of a libstdc++ `std::unordered_set` (max load factor
/// 1, `_Prime_rehash_policy`) after inserting distinct keys with hash codes
/// `hashes` in order: a singly linked list in which a node joins the front
/// of its bucket's run, or the front of the list when its bucket is empty,
/// and a rehash re-inserts the nodes in list order.
fn unordered_set_order(hashes: &[u64]) -> Vec<usize> {
    let mut next: Vec<Option<usize>> = vec![None; hashes.len()];
    let mut head: Option<usize> = None;
    let mut buckets: Vec<Option<Before>> = vec![None];
    let mut next_resize = 0usize;
    let bucket = |i: usize, n: usize| (hashes[i] % n as u64) as usize;

    for i in 0..hashes.len() {
        // _M_need_rehash(n_bkt, n_elt = i, n_ins = 1).
        if i + 1 > next_resize {
            let n_bkt = buckets.len();
            let min_bkts = (i + 1).max(if next_resize == 0 { 11 } else { 0 });
            if min_bkts >= n_bkt {
                let want = (min_bkts + 1).max(n_bkt * 2);
                let n = if want < FAST_BUCKETS.len() {
                    FAST_BUCKETS[want]
                } else {
                    PRIMES[PRIMES.partition_point(|&p| p < want).min(PRIMES.len() - 1)]
                };
                next_resize = n;
                // _M_rehash_aux: re-insert in list order.
                let mut fresh: Vec<Option<Before>> = vec![None; n];
                let mut p = head.take();
                let mut begin_bucket = 0;
                while let Some(node) = p {
                    p = next[node];
                    let b = bucket(node, n);
                    match fresh[b] {
                        None => {
                            next[node] = head;
                            head = Some(node);
                            fresh[b] = Some(Before::Head);
                            if next[node].is_some() {
                                fresh[begin_bucket] = Some(Before::Node(node));
                            }
                            begin_bucket = b;
                        }
                        Some(before) => {
                            let slot = match before {
                                Before::Head => &mut head,
                                Before::Node(j) => &mut next[j],
                            };
                            next[node] = slot.replace(node);
                        }
                    }
                }
                buckets = fresh;
            } else {
                next_resize = n_bkt;
            }
        }
        // _M_insert_bucket_begin.
        let n = buckets.len();
        let b = bucket(i, n);
        match buckets[b] {
            Some(before) => {
                let slot = match before {
                    Before::Head => &mut head,
                    Before::Node(j) => &mut next[j],
                };
                next[i] = slot.replace(i);
            }
            None => {
                next[i] = head.replace(i);
                if let Some(old_first) = next[i] {
                    buckets[bucket(old_first, n)] = Some(Before::Node(i));
                }
                buckets[b] = Some(Before::Head);
            }
        }
    }
    let mut order = Vec::with_capacity(hashes.len());
    let mut p = head;
    while let Some(node) = p {
        order.push(node);
        p = next[node];
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A brute-force model of the same container: a list where a key goes in
    /// front of the first key of its bucket, or at the front; rehash
    /// re-inserts in list order into the new bucket count.
    fn model_order(hashes: &[u64]) -> Vec<usize> {
        let insert = |list: &mut Vec<usize>, i: usize, n: u64| {
            let at = list.iter().position(|&j| hashes[j] % n == hashes[i] % n).unwrap_or(0);
            list.insert(at, i);
        };
        let (mut list, mut n_bkt, mut next_resize) = (Vec::new(), 1usize, 0usize);
        for i in 0..hashes.len() {
            if i + 1 > next_resize {
                let min = (i + 1).max(if next_resize == 0 { 11 } else { 0 });
                if min >= n_bkt {
                    let want = (min + 1).max(n_bkt * 2);
                    n_bkt = (want..).find(|&p| FAST_BUCKETS.get(p) == Some(&p) || PRIMES.contains(&p)).unwrap();
                    next_resize = n_bkt;
                    let old = std::mem::take(&mut list);
                    for j in old {
                        insert(&mut list, j, n_bkt as u64);
                    }
                } else {
                    next_resize = n_bkt;
                }
            }
            insert(&mut list, i, n_bkt as u64);
        }
        list
    }

    #[test]
    fn unordered_set_order_matches_the_list_model() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        for n in [0, 1, 2, 7, 13, 14, 30, 100, 300] {
            let hashes: Vec<u64> = (0..n)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed
                })
                .collect();
            assert_eq!(unordered_set_order(&hashes), model_order(&hashes), "{n} keys");
        }
    }
}
