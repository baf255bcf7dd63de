//! cuDNN's 3D convolution against PyTorch's `conv3d` semantics (cross-correlation, symmetric zero padding, strides)
//! evaluated on the CPU in f64 as a sum of candle 2D convolutions over the kernel's time taps, from the same inputs:
//! the Wan VAE's shapes (3×3×3 after the causal frames, the time downsampling's 3×1×1 of stride 2, the per-frame
//! 1×3×3, the 1×1×1 shortcut), f32 exact and in TF32, bf16 and f16, and the refusals. Needs a CUDA device and the
//! `cudnn` feature.

#![cfg(feature = "cudnn")]

mod common;

use candle_core::{DType, Device, Result, Tensor};
use common::relative_error;
use kinetoscope_kernels::{conv3d_kernel, cudnn_conv3d, ConvKernel};

/// `x` `[n, c, d, h, w]` by `kernel` `[o, c, kd, kh, kw]`, padded by `(time, space)` and moved by `(time, space)`,
/// in f64 on the CPU: output frame `j` is the sum over taps `t` of the 2D convolution of padded input frame
/// `j·stride + t` by the kernel's tap `t`.
fn reference(x: &Tensor, kernel: &Tensor, padding: (usize, usize), stride: (usize, usize)) -> Result<Tensor> {
    let f64_on_cpu = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F64);
    let (x, kernel) = (f64_on_cpu(x)?.pad_with_zeros(2, padding.0, padding.0)?, f64_on_cpu(kernel)?);
    let (frames_in, taps) = (x.dim(2)?, kernel.dim(2)?);
    let frames = (frames_in - taps) / stride.0 + 1;
    let mut out = Vec::with_capacity(frames);
    for j in 0..frames {
        let mut sum: Option<Tensor> = None;
        for t in 0..taps {
            let frame = x.narrow(2, j * stride.0 + t, 1)?.squeeze(2)?.contiguous()?;
            let tap = kernel.narrow(2, t, 1)?.squeeze(2)?.contiguous()?;
            let y = frame.conv2d(&tap, padding.1, stride.1, 1, 1)?;
            sum = Some(match sum {
                Some(sum) => (sum + y)?,
                None => y,
            });
        }
        out.push(sum.expect("at least one tap"));
    }
    Tensor::stack(&out, 2)
}

/// Input shape, kernel shape, (time, space) padding and stride: the layers of the Wan VAE's decoder, smaller.
type Case = ([usize; 5], [usize; 5], (usize, usize), (usize, usize));

const CASES: [Case; 5] = [
    // 3×3×3 over 2 frames of causal context and 4 new ones, padded in space only (diffusers pads time itself).
    ([1, 32, 6, 30, 52], [32, 32, 3, 3, 3], (0, 1), (1, 1)),
    // The time downsampling: 3×1×1 taps, stride 2 in time, on two batch items.
    ([2, 8, 7, 9, 11], [16, 8, 3, 1, 1], (0, 0), (2, 1)),
    // A per-frame 2D convolution (one tap), odd sizes.
    ([1, 12, 5, 17, 23], [24, 12, 1, 3, 3], (0, 1), (1, 1)),
    // The residual shortcut and the head: 1×1×1, channels to 3.
    ([1, 64, 3, 8, 8], [3, 64, 1, 1, 1], (0, 0), (1, 1)),
    // Padding and stride in every dimension (the op is general even where the VAE is not).
    ([1, 4, 5, 9, 10], [6, 4, 3, 3, 3], (1, 1), (2, 2)),
];

fn run(case: &Case, dtype: DType, dev: &Device) -> Result<(Tensor, Tensor)> {
    let (input, kernel, padding, stride) = *case;
    let x = Tensor::randn(0f32, 1.0, input.to_vec(), dev)?.to_dtype(dtype)?;
    let k = Tensor::randn(0f32, 0.2, kernel.to_vec(), dev)?.to_dtype(dtype)?;
    let got = cudnn_conv3d(&x, &k, [padding.0, padding.1, padding.1], [stride.0, stride.1, stride.1])?;
    Ok((got, reference(&x, &k, padding, stride)?))
}

/// f32 in exact arithmetic, then with TF32 allowed (candle's switch for f32 products, which the VAE of a
/// half-precision pipeline turns on): one test, since the switch is process-wide.
#[test]
fn f32_matches_the_reference_exact_and_in_tf32() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    assert_eq!(conv3d_kernel(&dev), ConvKernel::Cudnn);
    for (tf32, bound) in [(false, 1e-5), (true, 5e-3)] {
        candle_core::cuda::set_gemm_reduced_precision_f32(tf32);
        for case in &CASES {
            let (got, want) = run(case, DType::F32, &dev)?;
            assert_eq!(got.dims(), want.dims(), "{case:?}");
            let err = relative_error(&got.to_device(&Device::Cpu)?, &want)?;
            println!("cudnn_conv3d f32 (tf32 {tf32}) {case:?}: relative error {err:.2e}");
            assert!(err < bound, "{case:?}, tf32 {tf32}: relative error {err}");
        }
    }
    candle_core::cuda::set_gemm_reduced_precision_f32(false);
    Ok(())
}

#[test]
fn half_precisions_match_the_reference() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    for dtype in [DType::BF16, DType::F16] {
        for case in &CASES {
            let (got, want) = run(case, dtype, &dev)?;
            assert_eq!((got.dims(), got.dtype()), (want.dims(), dtype), "{case:?}");
            let err = relative_error(&got.to_device(&Device::Cpu)?, &want)?;
            println!("cudnn_conv3d {dtype:?} {case:?}: relative error {err:.2e}");
            assert!(err < 1e-2, "{case:?}, {dtype:?}: relative error {err}");
        }
    }
    Ok(())
}

/// The VAE hands its frames-major tensors over as transposed views: taken (copied to the packed layout first).
#[test]
fn strided_input_is_taken() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    let frames_major = Tensor::randn(0f32, 1.0, (1, 6, 16, 12, 20), &dev)?;
    let x = frames_major.transpose(1, 2)?;
    let k = Tensor::randn(0f32, 0.2, (8, 16, 3, 3, 3), &dev)?;
    let got = cudnn_conv3d(&x, &k, [0, 1, 1], [1, 1, 1])?;
    let err = relative_error(&got.to_device(&Device::Cpu)?, &reference(&x, &k, (0, 1), (1, 1))?)?;
    assert!(err < 1e-5, "relative error {err}");
    Ok(())
}

#[test]
fn what_cudnn_cannot_take_is_refused_by_name() -> Result<()> {
    let dev = Device::new_cuda(0)?;
    let x = Tensor::zeros((1, 4, 3, 8, 8), DType::F32, &dev)?;
    let k = Tensor::zeros((5, 4, 3, 3, 3), DType::F32, &dev)?;
    let refusal = |result: Result<Tensor>| result.expect_err("refused").to_string();
    let on_cpu = refusal(cudnn_conv3d(&x.to_device(&Device::Cpu)?, &k.to_device(&Device::Cpu)?, [0, 1, 1], [1; 3]));
    assert!(on_cpu.contains("expected both on one CUDA device"), "{on_cpu}");
    let mixed = refusal(cudnn_conv3d(&x, &k.to_dtype(DType::BF16)?, [0, 1, 1], [1; 3]));
    assert!(mixed.contains("of one dtype"), "{mixed}");
    let channels = refusal(cudnn_conv3d(&x, &Tensor::zeros((5, 3, 3, 3, 3), DType::F32, &dev)?, [0, 1, 1], [1; 3]));
    assert!(channels.contains("the kernel takes 3 channels, the input has 4"), "{channels}");
    let short = refusal(cudnn_conv3d(&x.narrow(2, 0, 2)?, &k, [0, 1, 1], [1; 3]));
    assert!(short.contains("larger than the padded input"), "{short}");
    let integers = refusal(cudnn_conv3d(&x.to_dtype(DType::U32)?, &k.to_dtype(DType::U32)?, [0, 1, 1], [1; 3]));
    assert!(integers.contains("expected f32, bf16 or f16"), "{integers}");
    Ok(())
}
