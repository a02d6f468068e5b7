//! CUDA queries of the C API.

use super::args;
use super::status::SeerStatus;

/// The GPU seerattn would use for the calling thread: that of the current
/// CUDA context, or else device 0 (its primary context, as the CUDA runtime
/// would pick). Writes the compute capability as `major * 10 + minor` (80 for
/// A100, 90 for H100) and the number of SMs. `SEER_NO_DEVICE` (with the
/// reason) without a CUDA driver or GPU; `SEER_UNSUPPORTED` for a build
/// without CUDA kernels. Both pointers are required.
#[no_mangle]
pub unsafe extern "C" fn seer_cuda_device_info(out_compute_capability: *mut i32, out_sm_count: *mut i32) -> SeerStatus {
    ffi_call!("seer_cuda_device_info", {
        let cc_out = args::out_ptr("out_compute_capability", out_compute_capability)?;
        let sm_out = args::out_ptr("out_sm_count", out_sm_count)?;
        let ctx = crate::cuda::current_context()?;
        let (major, minor) = ctx.compute_capability();
        cc_out.write(major * 10 + minor);
        sm_out.write(ctx.sm_count());
        Ok(())
    })
}
