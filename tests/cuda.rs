//! The CUDA driver layer (`seerattn::cuda`) and the C API's CUDA edges.
//!
//! Two kinds of tests:
//! - CPU-only (run by `cargo test` everywhere): the build embeds real fatbins,
//!   a missing driver is an error and never a panic, and CUDA descriptors
//!   through the C API are refused with a status.
//! - GPU (`#[ignore]`d, run on a GPU machine by `scripts/gpu-test.sh run`):
//!   module loading and caching, launches on caller streams from several
//!   threads, context handling, pointer checks, device buffers.

use seerattn::cuda::{self, testing, testing::Stream, Ctx};
use seerattn::ffi::args::{SeerBatch, SeerBlockMask, SeerTensor};
use seerattn::ffi::attention::{seer_prefill_params_default, seer_sparse_prefill, SeerPrefillParams};
use seerattn::ffi::cuda::seer_cuda_device_info;
use seerattn::ffi::mask::{seer_mask_to_dense, seer_prefill_workspace_size};
use seerattn::ffi::status::{seer_last_error_message, SeerStatus};
use seerattn::Error;
use std::ffi::{c_void, CStr};

fn last_error() -> String {
    unsafe { CStr::from_ptr(seer_last_error_message()) }.to_string_lossy().into_owned()
}

/// The smoke kernel's fatbin (through `ALL`, which exists in every build).
fn smoke_fatbin() -> &'static [u8] {
    cuda::kernels::ALL.iter().find(|(name, _)| *name == "smoke").map(|(_, bytes)| *bytes).expect(
        "this build has no smoke kernel: it was built without nvcc (run scripts/setup-cuda.sh, or scripts/test.sh)",
    )
}

// ---------------------------------------------------------------- CPU-only

#[test]
fn kernels_are_real_fatbins() {
    // scripts/test.sh sets this: there, a build without kernels is a failure.
    if std::env::var_os("SEERATTN_REQUIRE_KERNELS").is_some() {
        assert!(cuda::cuda_enabled(), "SEERATTN_REQUIRE_KERNELS is set but the build has no CUDA kernels");
    }
    assert_eq!(cuda::cuda_enabled(), !cuda::kernels::ALL.is_empty());
    if !cuda::cuda_enabled() {
        return;
    }
    assert!(!smoke_fatbin().is_empty());
    for (name, bytes) in cuda::kernels::ALL {
        assert!(bytes.len() > 16, "{name}: {} bytes", bytes.len());
        // The fatbin container's magic, 0xBA55ED50, little-endian.
        assert_eq!(&bytes[..4], &0xBA55ED50u32.to_le_bytes(), "{name} is not a fatbin");
        assert_eq!(bytes.as_ptr() as usize % 64, 0, "{name} is not 64-byte aligned");
    }
}

#[test]
fn driver_is_an_error_not_a_panic() {
    let result = std::panic::catch_unwind(cuda::driver).expect("cuda::driver panicked");
    let libcuda = unsafe { cudarc::driver::sys::is_culib_present() };
    match &result {
        Ok(()) => assert!(libcuda && cuda::cuda_enabled()),
        Err(Error::Unsupported(msg)) => {
            assert!(!cuda::cuda_enabled());
            assert!(msg.contains("no CUDA kernels"), "{msg}");
        }
        Err(Error::NoDevice(msg)) => {
            assert!(cuda::cuda_enabled());
            if !libcuda {
                assert!(msg.contains("libcuda"), "{msg}");
            }
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
    // Remembered, and every entry point answers the same way.
    let again = cuda::driver();
    assert_eq!(format!("{:?}", result.err()), format!("{:?}", again.err()));
}

#[test]
fn entry_points_without_a_device_return_errors() {
    if cuda::driver().is_ok() {
        return; // a GPU machine: the GPU tests cover these
    }
    let expected = |e: Error| matches!(e, Error::NoDevice(_) | Error::Unsupported(_));
    assert!(expected(cuda::current_context().unwrap_err()));
    assert!(expected(cuda::context_of(0x7f00_0000_0000).unwrap_err()));
    assert!(expected(cuda::check_device_pointer("q", 0x7f00_0000_0000, 64).unwrap_err()));
    let r = unsafe { cuda::launch(std::ptr::null_mut(), [1; 3], [1; 3], 0, std::ptr::null_mut(), &mut []) };
    assert!(expected(r.unwrap_err()));
}

#[test]
fn c_device_info_without_a_device() {
    let (mut cc, mut sms) = (-1i32, -1i32);
    let status = unsafe { seer_cuda_device_info(&mut cc, &mut sms) };
    if cuda::driver().is_ok() {
        assert_eq!(status, SeerStatus::SEER_OK);
        return;
    }
    let want = if cuda::cuda_enabled() { SeerStatus::SEER_NO_DEVICE } else { SeerStatus::SEER_UNSUPPORTED };
    assert_eq!(status, want, "{}", last_error());
    assert!(last_error().starts_with("seer_cuda_device_info: "), "{}", last_error());
    assert_eq!((cc, sms), (-1, -1), "out-parameters written on failure");
    let status = unsafe { seer_cuda_device_info(std::ptr::null_mut(), &mut sms) };
    assert_eq!(status, SeerStatus::SEER_NULL_POINTER);
}

#[test]
fn c_api_refuses_cuda_descriptors_with_a_status() {
    // Fake device addresses: they must be refused before anything reads them.
    let fake = 0x7f00_0000_0000usize as *mut c_void;
    let cu = [0i32, 64];
    let batch = SeerBatch { num_seqs: 1, cu_seqlens_q: cu.as_ptr(), cu_seqlens_k: cu.as_ptr() };
    let t = SeerTensor { data: fake, dtype: 0, device: 1, shape: [64, 1, 64], strides: [64, 64, 1] };
    let mask = SeerBlockMask {
        counts: fake.cast(),
        counts_len: 1,
        indices: fake.cast(),
        indices_len: 1,
        row_offsets: fake.cast(),
        row_offsets_len: 2,
        device: 1,
    };
    let mut params = std::mem::MaybeUninit::<SeerPrefillParams>::uninit();
    assert_eq!(unsafe { seer_prefill_params_default(params.as_mut_ptr()) }, SeerStatus::SEER_OK);
    let params = unsafe { params.assume_init() };
    // Distinct fake addresses (q, k, v, out must not overlap): refused by
    // the build (no kernels), the driver (none) or the pointer check (not
    // device memory), never read.
    let at = |i: usize| SeerTensor { data: (0x7f00_0000_0000usize + i * 0x10_0000) as *mut c_void, ..t };
    let (q, k, v, o) = (at(1), at(2), at(3), at(4));
    let status = unsafe { seer_sparse_prefill(&params, &batch, &q, &k, &v, &mask, &o, std::ptr::null_mut(), 0) };
    let want = if !cuda::cuda_enabled() {
        SeerStatus::SEER_UNSUPPORTED
    } else if cuda::driver().is_err() {
        SeerStatus::SEER_NO_DEVICE
    } else {
        SeerStatus::SEER_INVALID_ARGUMENT
    };
    assert_eq!(status, want, "{}", last_error());
    let status = unsafe { seer_sparse_prefill(&params, &batch, &t, &t, &t, &mask, &t, std::ptr::null_mut(), 0) };
    assert_eq!(status, SeerStatus::SEER_INVALID_ARGUMENT, "out overlapping q: {}", last_error());

    let mut dense = [0u8; 1];
    let status = unsafe { seer_mask_to_dense(&batch, 1, 64, &mask, dense.as_mut_ptr(), 1) };
    assert!(matches!(status, SeerStatus::SEER_UNSUPPORTED | SeerStatus::SEER_NO_DEVICE), "{status:?}");

    // The CUDA prefill of an unsplit batch asks for its 256 bytes of
    // work-item counters; a build without kernels says it has no CUDA path.
    let mut bytes = 7usize;
    let status = unsafe { seer_prefill_workspace_size(&batch, 1, 64, 1, &mut bytes) };
    if cuda::cuda_enabled() {
        assert_eq!((status, bytes), (SeerStatus::SEER_OK, 256), "{}", last_error());
        let status = unsafe { seer_prefill_workspace_size(&batch, 1, 256, 1, &mut bytes) };
        assert_eq!(status, SeerStatus::SEER_UNSUPPORTED, "head_dim 256 on CUDA");
    } else {
        assert_eq!(status, SeerStatus::SEER_UNSUPPORTED);
    }
}

// ---------------------------------------------------------------- GPU

fn ctx() -> Ctx {
    cuda::current_context().expect("a CUDA device")
}

/// Launch `seer_smoke_fill(out, v, n)` on `stream`.
fn smoke_fill(ctx: &Ctx, out: u64, v: f32, n: u32, smem: u32, stream: &Stream) -> seerattn::Result<()> {
    let f = cuda::function(ctx, smoke_fatbin(), "seer_smoke_fill")?;
    let (mut out, mut v, mut n_arg) = (out, v, n);
    let mut params: [*mut c_void; 3] =
        [(&mut out as *mut u64).cast(), (&mut v as *mut f32).cast(), (&mut n_arg as *mut u32).cast()];
    let block = 256u32;
    unsafe { cuda::launch(f, [n.div_ceil(block), 1, 1], [block, 1, 1], smem, stream.raw(), &mut params) }
}

fn read_f32(ctx: &Ctx, ptr: u64, n: usize) -> Vec<f32> {
    let mut bytes = vec![0u8; n * 4];
    testing::copy_to_host(ctx, &mut bytes, ptr).unwrap();
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn assert_filled(values: &[f32], v: f32) {
    for (i, &x) in values.iter().enumerate() {
        assert_eq!(x, v + i as f32, "element {i}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_smoke_kernel_fills_a_buffer_on_a_non_default_stream() {
    let ctx = ctx();
    let n = 100_003u32; // not a multiple of the block: the bounds check matters
    let buf = testing::alloc_zeroed(&ctx, n as usize * 4).unwrap();
    let stream = Stream::new(&ctx).unwrap();
    smoke_fill(&ctx, buf.ptr(), 1.5, n, 0, &stream).unwrap();
    stream.synchronize().unwrap();
    assert_filled(&read_f32(&ctx, buf.ptr(), n as usize), 1.5);
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_launch_with_more_than_48k_of_dynamic_shared_memory() {
    let ctx = ctx();
    let buf = testing::alloc_zeroed(&ctx, 1024 * 4).unwrap();
    let stream = Stream::new(&ctx).unwrap();
    // The smoke kernel ignores shared memory; the launch must still succeed,
    // which needs the function's limit raised first.
    smoke_fill(&ctx, buf.ptr(), -3.0, 1024, 96 * 1024, &stream).unwrap();
    smoke_fill(&ctx, buf.ptr(), -3.0, 1024, 64 * 1024, &stream).unwrap();
    stream.synchronize().unwrap();
    assert_filled(&read_f32(&ctx, buf.ptr(), 1024), -3.0);
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_module_cache_returns_the_same_function() {
    let ctx = ctx();
    let a = cuda::function(&ctx, smoke_fatbin(), "seer_smoke_fill").unwrap();
    let b = cuda::function(&ctx, smoke_fatbin(), "seer_smoke_fill").unwrap();
    assert_eq!(a, b);
    let c = std::thread::spawn(move || cuda::function(&ctx, smoke_fatbin(), "seer_smoke_fill").unwrap() as usize)
        .join()
        .unwrap();
    assert_eq!(a as usize, c);
    let missing = cuda::function(&ctx, smoke_fatbin(), "no_such_kernel").unwrap_err();
    assert!(
        matches!(missing, Error::Cuda(ref m) if m.contains("no_such_kernel") && m.contains("CUDA_ERROR_NOT_FOUND"))
    );
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_host_pointer_is_refused_and_ranges_are_checked() {
    let ctx = ctx();
    let host = vec![0f32; 1024];
    let err = cuda::check_device_pointer("out", host.as_ptr() as u64, 4096).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(ref m) if m.contains("out is not device memory")), "{err}");
    assert!(matches!(cuda::context_of(host.as_ptr() as u64), Err(Error::InvalidArgument(_))));

    let len = 2 << 20;
    let buf = testing::alloc_zeroed(&ctx, len).unwrap();
    cuda::check_device_pointer("q", buf.ptr(), len).unwrap();
    cuda::check_device_pointer("q", buf.ptr() + 512, len - 512).unwrap();
    let err = cuda::check_device_pointer("q", buf.ptr() + 512, len).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(ref m) if m.contains("past its allocation")), "{err}");
    cuda::check_device_pointer("empty", 0, 0).unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_two_threads_launch_concurrently_on_two_streams() {
    let ctx = ctx();
    let n = 1 << 20;
    let workers: Vec<_> = [10.0f32, -20.0]
        .into_iter()
        .map(|v| {
            std::thread::spawn(move || {
                let buf = testing::alloc_zeroed(&ctx, n * 4).unwrap();
                let stream = Stream::new(&ctx).unwrap();
                for round in 0..50 {
                    smoke_fill(&ctx, buf.ptr(), v + round as f32, n as u32, 0, &stream).unwrap();
                }
                stream.synchronize().unwrap();
                read_f32(&ctx, buf.ptr(), n)
            })
        })
        .collect();
    let results: Vec<Vec<f32>> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    assert_filled(&results[0], 10.0 + 49.0);
    assert_filled(&results[1], -20.0 + 49.0);
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_context_of_a_pointer_and_the_current_context_is_restored() {
    let ctx = ctx();
    let buf = testing::alloc_zeroed(&ctx, 4096).unwrap();
    let owner = cuda::context_of(buf.ptr() + 100).unwrap();
    assert_eq!(owner.id(), ctx.id());
    assert_eq!(owner.device(), ctx.device());
    assert!(owner.compute_capability().0 >= 8 && owner.sm_count() > 0);

    // On a fresh thread no context is current; after make_current and a
    // launch, none is current again.
    std::thread::spawn(move || {
        let current = || {
            let mut c = std::ptr::null_mut();
            let r = unsafe { cudarc::driver::sys::cuCtxGetCurrent(&mut c) };
            assert_eq!(r, cudarc::driver::sys::CUresult::CUDA_SUCCESS);
            c
        };
        assert!(current().is_null());
        {
            let _guard = ctx.make_current().unwrap();
            assert_eq!(current(), ctx.raw());
        }
        assert!(current().is_null());
        let stream = Stream::new(&ctx).unwrap();
        let buf = testing::alloc_zeroed(&ctx, 64 * 4).unwrap();
        smoke_fill(&ctx, buf.ptr(), 0.0, 64, 0, &stream).unwrap();
        stream.synchronize().unwrap();
        assert!(current().is_null());
    })
    .join()
    .unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_device_buffer_upload_round_trips() {
    let ctx = ctx();
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let buf = cuda::DeviceBuffer::upload(&ctx, &data).unwrap();
    assert_eq!(buf.len(), data.len());
    let mut back = vec![0u8; data.len()];
    testing::copy_to_host(&ctx, &mut back, buf.ptr()).unwrap();
    assert_eq!(back, data);
    let empty = cuda::DeviceBuffer::upload(&ctx, &[]).unwrap();
    assert!(empty.is_empty() && empty.ptr() == 0);
}

#[test]
#[ignore = "needs a CUDA GPU; run with scripts/gpu-test.sh"]
fn gpu_c_device_info_and_foreign_functions() {
    let (mut cc, mut sms) = (0i32, 0i32);
    let status = unsafe { seer_cuda_device_info(&mut cc, &mut sms) };
    assert_eq!(status, SeerStatus::SEER_OK, "{}", last_error());
    assert!(cc >= 80 && sms > 0, "cc {cc}, {sms} SMs");
    let (major, minor) = ctx().compute_capability();
    assert_eq!(cc, major * 10 + minor);
    // A function handle the module cache did not hand out is refused.
    let err = unsafe { cuda::launch(std::ptr::null_mut(), [1; 3], [1; 3], 0, std::ptr::null_mut(), &mut []) };
    assert!(matches!(err, Err(Error::InvalidArgument(_))));
}
