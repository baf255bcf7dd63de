//! Choosing where the networks run and in what precision, from a user's words: `cpu`, `cuda` (the first
//! GPU) or `cuda:N`; `f32`, `bf16` or `f16`.

use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// The precisions the networks run in (the VAE always in f32).
const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

/// The precision `name` names, if the networks can run in it.
pub fn parse_dtype(name: &str) -> Result<DType> {
    match name.parse::<DType>() {
        Ok(dtype) if DTYPES.contains(&dtype) => Ok(dtype),
        _ => Err(unsupported_dtype(name)),
    }
}

/// Checks that the networks can run in `dtype`.
pub(crate) fn check_dtype(dtype: DType) -> Result<()> {
    if DTYPES.contains(&dtype) {
        Ok(())
    } else {
        Err(unsupported_dtype(dtype.as_str()))
    }
}

fn unsupported_dtype(name: &str) -> Error {
    Error::InvalidRequest { field: "dtype", reason: format!("{name:?} is not supported: expected f32, bf16 or f16") }
}

/// Opens the device `spec` names. A GPU that can't be had is an error that says why and what to do; it
/// never falls back to the CPU silently (a video that takes hours instead of minutes is a failure too).
pub fn open_device(spec: &str) -> Result<Device> {
    let ordinal = match spec {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => spec
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| Error::Device { spec: spec.to_string(), reason: "expected cpu, cuda or cuda:N".into() })?,
    };
    if !cfg!(feature = "cuda") {
        let reason =
            "this build has no CUDA support: build the GPU binary with scripts/build-cuda.sh, or use --device cpu";
        return Err(Error::Device { spec: spec.to_string(), reason: reason.into() });
    }
    Device::new_cuda(ordinal).map_err(|e| Error::Device {
        spec: spec.to_string(),
        reason: format!("no usable CUDA device {ordinal} ({e}); check the NVIDIA driver, or use --device cpu"),
    })
}

/// Bytes of memory in use on `device`'s GPU (by every process, as `nvidia-smi` counts it); `None` on the
/// CPU or when the driver can't say.
pub fn gpu_memory_used(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        let (free, total) = cuda.cuda_stream().context().mem_get_info().ok()?;
        return Some(total.saturating_sub(free) as u64);
    }
    let _ = device;
    None
}

/// `f` with the f32 matrix products on a GPU allowed to use the tensor cores in TF32 (10-bit mantissa
/// products, f32 sums) when `allowed`: for the VAE of a half-precision pipeline, whose convolutions are such
/// products, as PyTorch runs diffusers' (cuDNN's default allows TF32 in convolutions). Many times faster than
/// full f32 on Hopper. candle's switch is process-wide and read when a product is launched, so it is set for
/// the launches inside `f` and put back after (a concurrent f32 product elsewhere may run either way).
pub(crate) fn with_tf32<T>(device: &Device, allowed: bool, f: impl FnOnce() -> T) -> T {
    if !device.is_cuda() || !allowed {
        return f();
    }
    let before = candle_core::cuda::gemm_reduced_precision_f32();
    candle_core::cuda::set_gemm_reduced_precision_f32(true);
    let out = f();
    candle_core::cuda::set_gemm_reduced_precision_f32(before);
    out
}

/// Bytes free on `device`'s GPU; `None` on the CPU or when the driver can't say.
pub(crate) fn gpu_memory_free(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        let (free, _total) = cuda.cuda_stream().context().mem_get_info().ok()?;
        return Some(free as u64);
    }
    let _ = device;
    None
}

/// candle allocates with `cuMemAllocAsync` from the device's memory pool, whose high watermark of memory in
/// use is the peak of what tensors held at once (cuBLAS's workspaces and the CUDA context are outside it).
/// `None` without a pool: drivers without stream-ordered allocation, or the CPU.
#[cfg(feature = "cuda")]
fn memory_pool(device: &Device) -> Option<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool> {
    use candle_core::cuda_backend::cudarc::driver::result;
    let Device::Cuda(cuda) = device else { return None };
    let context = cuda.cuda_stream().context().clone();
    if !context.has_async_alloc() {
        return None;
    }
    context.bind_to_thread().ok()?;
    // SAFETY: the device handle comes from a live context.
    unsafe { result::device::get_mem_pool(context.cu_device()) }.ok()
}

/// Starts a new peak for [`peak_gpu_memory`]: from what is in use now.
pub fn reset_peak_gpu_memory(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Some(pool) = memory_pool(device) {
        use candle_core::cuda_backend::cudarc::driver::{result::mem_pool, sys};
        let mut zero = 0u64;
        // SAFETY: the pool is live and the attribute is a cuuint64_t, which setting to 0 resets.
        let reset = unsafe {
            mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut zero as *mut u64).cast(),
            )
        };
        if let Err(e) = reset {
            tracing::debug!(error = %e, "could not reset the GPU memory peak");
        }
    }
    let _ = device;
}

/// The most bytes `device`'s tensors held at once since [`reset_peak_gpu_memory`]; `None` on the CPU or
/// when the driver can't say.
pub fn peak_gpu_memory(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Some(pool) = memory_pool(device) {
        use candle_core::cuda_backend::cudarc::driver::{result::mem_pool, sys};
        let mut peak = 0u64;
        // SAFETY: the pool is live and the attribute is a cuuint64_t.
        unsafe {
            mem_pool::get_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut peak as *mut u64).cast(),
            )
        }
        .ok()?;
        return Some(peak);
    }
    let _ = device;
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtypes_are_parsed_and_bad_ones_explained() {
        assert_eq!(parse_dtype("bf16").unwrap(), DType::BF16);
        for bad in ["f64", "u8", "half"] {
            let err = parse_dtype(bad).unwrap_err().to_string();
            assert!(err.contains(bad) && err.contains("expected f32, bf16 or f16"), "{err}");
        }
        assert!(check_dtype(DType::F64).is_err());
    }

    #[test]
    fn names_are_parsed_and_bad_ones_explained() {
        assert!(open_device("cpu").unwrap().is_cpu());
        let err = open_device("gpu0").unwrap_err().to_string();
        assert!(err.contains("gpu0") && err.contains("cuda:N"), "{err}");
        if !cfg!(feature = "cuda") {
            let err = open_device("cuda:1").unwrap_err().to_string();
            assert!(err.contains("no CUDA support"), "{err}");
        }
    }
}
