//! `.safetensors` to and from [`RawTensor`]s, through the `safetensors` crate
//! (which validates the header, offsets and sizes). Gate weights are floats,
//! so only BF16, F16 and F32 are accepted; any other dtype is refused naming
//! the tensor. Writing tags the file `{"format": "pt"}` as `safetensors.torch`
//! does, so Python tooling loads it as a torch state dict.

use super::RawTensor;
use crate::error::{Error, Result};
use crate::tensor::DType;
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use std::collections::HashMap;

/// Parse a whole `.safetensors` file; `path` names it in errors. Tensors come
/// back in file (data offset) order.
pub(crate) fn read_safetensors_bytes(path: &str, bytes: &[u8]) -> Result<Vec<RawTensor>> {
    read_safetensors_with_metadata(path, bytes).map(|(tensors, _)| tensors)
}

/// As [`read_safetensors_bytes`], with the header's `__metadata__` map
/// (empty when the file has none).
pub(crate) fn read_safetensors_with_metadata(
    path: &str,
    bytes: &[u8],
) -> Result<(Vec<RawTensor>, HashMap<String, String>)> {
    let st =
        SafeTensors::deserialize(bytes).map_err(|e| Error::format(path, format!("invalid safetensors file: {e}")))?;
    let (_, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| Error::format(path, format!("invalid safetensors file: {e}")))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let mut views: Vec<(String, TensorView<'_>)> = st.tensors();
    views.sort_by_key(|(_, v)| v.data().as_ptr() as usize);
    let tensors = views
        .into_iter()
        .map(|(name, v)| {
            let dtype = match v.dtype() {
                Dtype::BF16 => DType::BF16,
                Dtype::F16 => DType::F16,
                Dtype::F32 => DType::F32,
                other => {
                    return Err(Error::unsupported(format!(
                        "{path}: tensor '{name}' has dtype {other:?}; supported: BF16, F16, F32"
                    )))
                }
            };
            Ok(RawTensor { name, dtype, shape: v.shape().to_vec(), data: v.data().to_vec() })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((tensors, metadata))
}

/// Serialize `tensors` to the bytes of a `.safetensors` file.
pub(crate) fn safetensors_bytes(tensors: &[RawTensor]) -> Result<Vec<u8>> {
    safetensors_bytes_with_metadata(tensors, &HashMap::new())
}

/// As [`safetensors_bytes`], with `metadata` added to the header's
/// `__metadata__` map next to `"format": "pt"` (which it may not replace).
pub(crate) fn safetensors_bytes_with_metadata(
    tensors: &[RawTensor],
    metadata: &HashMap<String, String>,
) -> Result<Vec<u8>> {
    let mut seen = std::collections::HashSet::new();
    let mut views = Vec::with_capacity(tensors.len());
    for t in tensors {
        if !seen.insert(t.name.as_str()) {
            return Err(Error::invalid(format!("tensor '{}' is given twice", t.name)));
        }
        let dtype = match t.dtype {
            DType::BF16 => Dtype::BF16,
            DType::F16 => Dtype::F16,
            DType::F32 => Dtype::F32,
        };
        let view = TensorView::new(dtype, t.shape.clone(), &t.data).map_err(|e| {
            Error::invalid(format!(
                "tensor '{}': {} bytes do not fit shape {:?} of {}: {e}",
                t.name,
                t.data.len(),
                t.shape,
                t.dtype.name()
            ))
        })?;
        views.push((t.name.as_str(), view));
    }
    if metadata.contains_key("format") {
        return Err(Error::invalid("safetensors metadata: the key 'format' is reserved (always \"pt\")"));
    }
    let mut metadata = metadata.clone();
    metadata.insert("format".to_string(), "pt".to_string());
    safetensors::serialize(views, Some(metadata))
        .map_err(|e| Error::invalid(format!("cannot serialize safetensors: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, dtype: DType, shape: &[usize]) -> RawTensor {
        let n = shape.iter().product::<usize>() * dtype.size();
        RawTensor { name: name.into(), dtype, shape: shape.to_vec(), data: (0..n).map(|i| (i * 7 + 3) as u8).collect() }
    }

    #[test]
    fn round_trip_keeps_bytes_and_dtypes() {
        let ts = vec![t("b", DType::BF16, &[2, 3]), t("a", DType::F32, &[4]), t("c", DType::F16, &[1, 1, 2])];
        let bytes = safetensors_bytes(&ts).unwrap();
        let mut back = read_safetensors_bytes("x", &bytes).unwrap();
        back.sort_by(|x, y| x.name.cmp(&y.name));
        let mut want = ts.clone();
        want.sort_by(|x, y| x.name.cmp(&y.name));
        assert_eq!(back, want);
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = std::str::from_utf8(&bytes[8..8 + header_len]).unwrap();
        assert!(header.contains(r#""__metadata__":{"format":"pt"}"#), "{header}");
    }

    #[test]
    fn metadata_round_trips() {
        let meta = HashMap::from([("step".to_string(), "12".to_string())]);
        let bytes = safetensors_bytes_with_metadata(&[t("a", DType::F32, &[2])], &meta).unwrap();
        let (tensors, back) = read_safetensors_with_metadata("x", &bytes).unwrap();
        assert_eq!(tensors.len(), 1);
        assert_eq!(back.get("step").map(String::as_str), Some("12"));
        assert_eq!(back.get("format").map(String::as_str), Some("pt"));
        let reserved = HashMap::from([("format".to_string(), "np".to_string())]);
        assert!(safetensors_bytes_with_metadata(&[], &reserved).is_err());
    }

    #[test]
    fn write_refuses_inconsistent_tensors() {
        let mut bad = t("a", DType::BF16, &[2, 3]);
        bad.data.pop();
        assert!(matches!(safetensors_bytes(&[bad]), Err(Error::InvalidArgument(m)) if m.contains("'a'")));
        let a = t("a", DType::F32, &[1]);
        assert!(matches!(safetensors_bytes(&[a.clone(), a]), Err(Error::InvalidArgument(m)) if m.contains("twice")));
    }
}
