//! Strided views of `[tokens, heads, dim]` activations on the host.
//!
//! Engines keep Q/K/V in layouts that are strided (llama.cpp's KV cache views,
//! fused QKV projections), so every view carries its own element strides and
//! no path requires a contiguous copy. Construction validates that every
//! addressed element lies inside the backing slice; accessors then index
//! without further checks on the hot path of the reference (still safe Rust).

use crate::error::{Error, Result};
use half::{bf16, f16};

/// Element type of an activation or weight tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    BF16,
    F16,
    F32,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::BF16 | DType::F16 => 2,
            DType::F32 => 4,
        }
    }
    /// Name as used in messages and in safetensors headers.
    pub fn name(self) -> &'static str {
        match self {
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::F32 => "f32",
        }
    }
}

/// Read element `i` (in elements, not bytes) of `bytes` as f32.
#[inline]
pub(crate) fn load_f32(bytes: &[u8], dtype: DType, i: usize) -> f32 {
    match dtype {
        DType::BF16 => bf16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32(),
        DType::F16 => f16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32(),
        DType::F32 => f32::from_le_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]]),
    }
}

/// Write `v` rounded to `dtype` (round to nearest even) into element `i`.
#[inline]
pub(crate) fn store_f32(bytes: &mut [u8], dtype: DType, i: usize, v: f32) {
    match dtype {
        DType::BF16 => bytes[2 * i..2 * i + 2].copy_from_slice(&bf16::from_f32(v).to_bits().to_le_bytes()),
        DType::F16 => bytes[2 * i..2 * i + 2].copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes()),
        DType::F32 => bytes[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes()),
    }
}

/// Shape and element strides of a `[tokens, heads, dim]` tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout3 {
    pub shape: [usize; 3],
    pub strides: [usize; 3],
}

impl Layout3 {
    /// Contiguous row-major layout.
    pub fn contiguous(tokens: usize, heads: usize, dim: usize) -> Self {
        Layout3 { shape: [tokens, heads, dim], strides: [heads * dim, dim, 1] }
    }

    /// Number of elements a buffer needs to hold every addressed element:
    /// one past the largest offset, or 0 for an empty tensor. Errors on overflow.
    pub fn span(&self, name: &str) -> Result<usize> {
        if self.shape.contains(&0) {
            return Ok(0);
        }
        let mut last = 0usize;
        for (n, s) in self.shape.iter().zip(self.strides.iter()) {
            let term = (n - 1)
                .checked_mul(*s)
                .ok_or_else(|| Error::invalid(format!("{name}: stride {s} times extent {n} overflows")))?;
            last = last
                .checked_add(term)
                .ok_or_else(|| Error::invalid(format!("{name}: strides address past the 64-bit range")))?;
        }
        Ok(last + 1)
    }

    /// True when no two indices map to the same element. Checked in the
    /// sufficient form used by FlashAttention-style libraries: sorting the
    /// non-trivial dimensions by stride, each stride must be at least the
    /// span of the dimensions below it.
    pub fn is_non_overlapping(&self) -> bool {
        let mut dims: Vec<(usize, usize)> =
            (0..3).filter(|&d| self.shape[d] > 1).map(|d| (self.strides[d], self.shape[d])).collect();
        dims.sort_unstable();
        let mut covered = 1usize;
        for (stride, n) in dims {
            if stride < covered {
                return false;
            }
            covered = match stride.checked_mul(n) {
                Some(c) => c,
                None => return true,
            };
        }
        true
    }

    #[inline]
    pub(crate) fn offset(&self, t: usize, h: usize, d: usize) -> usize {
        t * self.strides[0] + h * self.strides[1] + d * self.strides[2]
    }
}

/// Read-only strided `[tokens, heads, dim]` view over host memory.
#[derive(Clone, Copy, Debug)]
pub struct Tensor3<'a> {
    bytes: &'a [u8],
    dtype: DType,
    layout: Layout3,
}

impl<'a> Tensor3<'a> {
    /// View `bytes` as a tensor of `dtype` with `layout`. `name` is used in error messages.
    pub fn new(name: &str, bytes: &'a [u8], dtype: DType, layout: Layout3) -> Result<Self> {
        check_fits(name, bytes.len(), dtype, &layout)?;
        Ok(Tensor3 { bytes, dtype, layout })
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn layout(&self) -> &Layout3 {
        &self.layout
    }
    pub fn shape(&self) -> [usize; 3] {
        self.layout.shape
    }
    /// Element `(token, head, dim)` as f32.
    #[inline]
    pub fn get(&self, t: usize, h: usize, d: usize) -> f32 {
        load_f32(self.bytes, self.dtype, self.layout.offset(t, h, d))
    }

    /// The elements, packed `[tokens, heads, dim]`, each rounded to `dtype`
    /// (to nearest even).
    pub fn rounded(&self, dtype: DType) -> Vec<u8> {
        let [tokens, heads, dim] = self.layout.shape;
        let mut out = vec![0u8; tokens * heads * dim * dtype.size()];
        let mut i = 0;
        for t in 0..tokens {
            for h in 0..heads {
                for x in 0..dim {
                    store_f32(&mut out, dtype, i, self.get(t, h, x));
                    i += 1;
                }
            }
        }
        out
    }

    /// The elements as a contiguous 16-bit tensor: its dtype and
    /// little-endian bytes. bf16 and f16 keep their dtype and bits; f32 is
    /// rounded to bf16 (to nearest even), as the gate rounds f32 inputs.
    /// For uploading host tensors to kernels that read packed 16-bit rows.
    pub(crate) fn packed_16bit(&self) -> (DType, Vec<u8>) {
        if self.dtype == DType::F32 {
            return (DType::BF16, self.rounded(DType::BF16));
        }
        let [tokens, heads, dim] = self.layout.shape;
        let n = tokens * heads * dim;
        if self.layout == Layout3::contiguous(tokens, heads, dim) {
            return (self.dtype, self.bytes[..2 * n].to_vec());
        }
        // 16-bit elements are copied, not converted (every bit kept).
        let mut out = Vec::with_capacity(2 * n);
        for t in 0..tokens {
            for h in 0..heads {
                for d in 0..dim {
                    let i = self.layout.offset(t, h, d);
                    out.extend_from_slice(&self.bytes[2 * i..2 * i + 2]);
                }
            }
        }
        (self.dtype, out)
    }
}

/// Writable strided `[tokens, heads, dim]` view over host memory.
#[derive(Debug)]
pub struct Tensor3Mut<'a> {
    bytes: &'a mut [u8],
    dtype: DType,
    layout: Layout3,
}

impl<'a> Tensor3Mut<'a> {
    /// As [`Tensor3::new`]; additionally refuses layouts in which two indices
    /// alias one element, since the output would then depend on write order.
    pub fn new(name: &str, bytes: &'a mut [u8], dtype: DType, layout: Layout3) -> Result<Self> {
        check_fits(name, bytes.len(), dtype, &layout)?;
        if !layout.is_non_overlapping() {
            return Err(Error::invalid(format!(
                "{name}: strides {:?} make elements of shape {:?} overlap",
                layout.strides, layout.shape
            )));
        }
        Ok(Tensor3Mut { bytes, dtype, layout })
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn layout(&self) -> &Layout3 {
        &self.layout
    }
    pub fn shape(&self) -> [usize; 3] {
        self.layout.shape
    }
    /// Store `v` (rounded to the tensor's dtype) at `(token, head, dim)`.
    #[inline]
    pub fn set(&mut self, t: usize, h: usize, d: usize, v: f32) {
        let i = self.layout.offset(t, h, d);
        store_f32(self.bytes, self.dtype, i, v)
    }
    /// Read back element `(token, head, dim)` as f32.
    #[inline]
    pub fn get(&self, t: usize, h: usize, d: usize) -> f32 {
        load_f32(self.bytes, self.dtype, self.layout.offset(t, h, d))
    }
}

fn check_fits(name: &str, len_bytes: usize, dtype: DType, layout: &Layout3) -> Result<()> {
    let span = layout.span(name)?;
    let need = span.checked_mul(dtype.size()).ok_or_else(|| Error::invalid(format!("{name}: byte size overflows")))?;
    if need > len_bytes {
        return Err(Error::invalid(format!(
            "{name}: shape {:?} with strides {:?} addresses {need} bytes but the buffer holds {len_bytes}",
            layout.shape, layout.strides
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_and_overlap() {
        let c = Layout3::contiguous(5, 4, 8);
        assert_eq!(c.span("x").unwrap(), 160);
        assert!(c.is_non_overlapping());
        // A [tokens, heads, dim] view into a [tokens, 3*heads, dim] fused QKV buffer.
        let fused = Layout3 { shape: [5, 4, 8], strides: [3 * 4 * 8, 8, 1] };
        assert_eq!(fused.span("x").unwrap(), 4 * 96 + 3 * 8 + 7 + 1);
        assert!(fused.is_non_overlapping());
        let aliasing = Layout3 { shape: [5, 4, 8], strides: [8, 8, 1] };
        assert!(!aliasing.is_non_overlapping());
        let huge = Layout3 { shape: [usize::MAX, 2, 2], strides: [usize::MAX, 1, 1] };
        assert!(huge.span("x").is_err());
    }

    #[test]
    fn views_refuse_short_buffers() {
        let buf = vec![0u8; 10];
        assert!(Tensor3::new("q", &buf, DType::BF16, Layout3::contiguous(1, 1, 5)).is_ok());
        assert!(Tensor3::new("q", &buf, DType::BF16, Layout3::contiguous(1, 1, 6)).is_err());
        let mut out = vec![0u8; 16];
        let aliasing = Layout3 { shape: [2, 2, 2], strides: [1, 1, 1] };
        assert!(Tensor3Mut::new("out", &mut out, DType::F32, aliasing).is_err());
    }

    #[test]
    fn packed_16bit_copies_16_bit_elements_and_rounds_f32() {
        // A strided f16 view (one padding element per head): the elements, packed, bits kept.
        let vals: Vec<f32> = (0..2 * 2 * 3).map(|i| i as f32 * 0.25 - 1.0).collect();
        let strided = Layout3 { shape: [2, 2, 2], strides: [6, 3, 1] };
        let bytes: Vec<u8> = vals.iter().flat_map(|&x| f16::from_f32(x).to_bits().to_le_bytes()).collect();
        let (dt, packed) = Tensor3::new("x", &bytes, DType::F16, strided).unwrap().packed_16bit();
        assert_eq!(dt, DType::F16);
        let want: Vec<f32> = [0, 1, 3, 4, 6, 7, 9, 10].iter().map(|&i| vals[i]).collect();
        let got: Vec<f32> = packed.chunks(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect();
        assert_eq!(got, want);
        // Contiguous bf16: the bytes as they are.
        let bf: Vec<u8> = vals.iter().flat_map(|&x| bf16::from_f32(x).to_bits().to_le_bytes()).collect();
        let view = Tensor3::new("x", &bf, DType::BF16, Layout3::contiguous(3, 2, 2)).unwrap();
        assert_eq!(view.packed_16bit(), (DType::BF16, bf.clone()));
        // f32: rounded to bf16, to nearest even (1 + 2^-8 is a tie, rounding to 1).
        let f: Vec<u8> = [1.0f32 + 1.0 / 256.0, -5.4321].iter().flat_map(|x| x.to_le_bytes()).collect();
        let (dt, packed) = Tensor3::new("x", &f, DType::F32, Layout3::contiguous(1, 1, 2)).unwrap().packed_16bit();
        assert_eq!(dt, DType::BF16);
        let want: Vec<u8> = [1.0f32, -5.4321].iter().flat_map(|&x| bf16::from_f32(x).to_bits().to_le_bytes()).collect();
        assert_eq!(packed, want);
        assert_eq!(bf16::from_le_bytes([packed[0], packed[1]]).to_f32(), 1.0);
    }

    #[test]
    fn round_trip_dtypes() {
        for dt in [DType::BF16, DType::F16, DType::F32] {
            let mut b = vec![0u8; 4 * dt.size()];
            store_f32(&mut b, dt, 3, 1.5);
            assert_eq!(load_f32(&b, dt, 3), 1.5);
        }
    }
}
