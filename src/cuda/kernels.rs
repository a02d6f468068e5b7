//! The compiled kernels: one `<STEM>_FATBIN` per `kernels/<stem>.cu`, built
//! by `build.rs` (sm_80 and sm_90a SASS, compute_90 PTX), plus [`ALL`].
//! Empty in a build without nvcc.

/// Storage of an embedded fatbin, aligned beyond anything the driver's
/// loader could ask of an image (`include_bytes!` alone guarantees 1 byte).
#[repr(C, align(64))]
pub struct Aligned<B: ?Sized>(pub B);

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The fatbin of `kernels/<stem>.cu`; `Unsupported` in a build without it.
pub fn fatbin(stem: &str) -> crate::error::Result<&'static [u8]> {
    ALL.iter().find(|(name, _)| *name == stem).map(|(_, bytes)| *bytes).ok_or_else(|| {
        crate::error::Error::unsupported(format!(
            "this build of seerattn has no kernels/{stem}.cu (built without nvcc?)"
        ))
    })
}
