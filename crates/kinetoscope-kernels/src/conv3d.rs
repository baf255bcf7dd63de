//! 3D convolution by cuDNN (`cudnnConvolutionForward` on 5-D tensors), for the Wan VAE's causal convolutions on a
//! GPU: the im2col path beside it writes every input pixel 27 times before its matrix product, and cuDNN's
//! implicit-GEMM kernels write none. cuDNN is linked from the pinned `nvidia-cudnn-cu13` wheel (the one PyTorch
//! ships, which diffusers' convolutions run on) in a build with the `cudnn` feature; scripts/build-cuda.sh turns
//! it on.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_int;
use std::sync::{Arc, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::{sys, ConvForward, Cudnn, CudnnDataType};
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::{CudaDType, CudaDevice, DeviceId};
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor, WithDType};
use half::{bf16, f16};

use crate::shapes::conv3d_output;
use crate::view;

/// The ways a 3D convolution runs, chosen per device by [`conv3d_kernel`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvKernel {
    /// [`cudnn_conv3d`]: any CUDA device, in a build with the `cudnn` feature.
    Cudnn,
    /// The caller's own unrolling into matrix products (candle's): any device.
    Im2col,
}

impl ConvKernel {
    pub fn name(self) -> &'static str {
        match self {
            ConvKernel::Cudnn => "cudnn",
            ConvKernel::Im2col => "im2col",
        }
    }
}

/// How 3D convolutions run on `device`: by cuDNN on a GPU, unless `KINETOSCOPE_CONV=im2col` (read once) keeps the
/// matrix-product path, to compare or to rule cuDNN out; by matrix products on the CPU.
pub fn conv3d_kernel(device: &Device) -> ConvKernel {
    static IM2COL: OnceLock<bool> = OnceLock::new();
    let im2col = *IM2COL.get_or_init(|| std::env::var("KINETOSCOPE_CONV").is_ok_and(|v| v == "im2col"));
    if device.is_cuda() && !im2col {
        ConvKernel::Cudnn
    } else {
        ConvKernel::Im2col
    }
}

/// The convolution of `x` `[batch, in, d, h, w]` by `kernel` `[out, in, kd, kh, kw]` (cross-correlation, as
/// PyTorch's `conv3d`), zero-padded by `padding` on both sides of d, h and w, with `stride` along them: `[batch, out,
/// d', h', w']`, contiguous. f32, bf16 or f16, both on one CUDA device; the half types accumulate in f32. An f32
/// convolution uses TF32 tensor cores where candle's f32 matrix products may
/// (`candle_core::cuda::set_gemm_reduced_precision_f32`), and exact f32 arithmetic otherwise. Inputs are made
/// contiguous first. Errors, before cuDNN runs: shapes that disagree or that cuDNN can't address, a device or
/// dtype it doesn't take.
pub fn cudnn_conv3d(x: &Tensor, kernel: &Tensor, padding: [usize; 3], stride: [usize; 3]) -> Result<Tensor> {
    let (input, weights) = (x.dims5()?, kernel.dims5()?);
    let output = conv3d_output(
        [input.0, input.1, input.2, input.3, input.4],
        [weights.0, weights.1, weights.2, weights.3, weights.4],
        padding,
        stride,
    )?;
    if ![DType::F32, DType::BF16, DType::F16].contains(&x.dtype()) {
        candle_core::bail!("cudnn_conv3d: {:?} is not supported: expected f32, bf16 or f16", x.dtype());
    }
    if !x.device().same_device(kernel.device()) || !x.device().is_cuda() || x.dtype() != kernel.dtype() {
        candle_core::bail!(
            "cudnn_conv3d: input {:?} {:?} and kernel {:?} {:?}: expected both on one CUDA device, of one dtype",
            x.dtype(),
            x.device().location(),
            kernel.dtype(),
            kernel.device().location()
        );
    }
    let op = Conv3d { padding, stride, output };
    x.contiguous()?.apply_op2_no_bwd(&kernel.contiguous()?, &op)
}

/// The most scratch memory one convolution takes (the VAE's memory estimate leaves it to its margin).
const MAX_WORKSPACE_BYTES: usize = 256 << 20;

struct Conv3d {
    padding: [usize; 3],
    stride: [usize; 3],
    output: [usize; 5],
}

impl CustomOp2 for Conv3d {
    fn name(&self) -> &'static str {
        "cudnn-conv3d"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("cudnn_conv3d runs on a CUDA device only")
    }

    fn cuda_fwd(&self, x: &CudaStorage, x_l: &Layout, k: &CudaStorage, k_l: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = x.device();
        let out = match x.dtype() {
            // Half types read and write in their own precision and accumulate in f32 (cuDNN's "pseudo" half
            // configurations, as PyTorch runs them).
            DType::BF16 => self.launch::<bf16, f32>(dev, x, x_l, k, k_l)?,
            DType::F16 => self.launch::<f16, f32>(dev, x, x_l, k, k_l)?,
            DType::F32 => self.launch::<f32, f32>(dev, x, x_l, k, k_l)?,
            other => candle_core::bail!("cudnn_conv3d: {other:?} is not supported: expected f32, bf16 or f16"),
        };
        Ok((out, Shape::from(self.output.to_vec())))
    }
}

impl Conv3d {
    /// Runs the convolution on `T` data accumulated in `A`, into a new contiguous output.
    fn launch<T, A>(
        &self,
        dev: &CudaDevice,
        x: &CudaStorage,
        x_l: &Layout,
        k: &CudaStorage,
        k_l: &Layout,
    ) -> Result<CudaStorage>
    where
        T: CudaDType + DeviceRepr + CudnnDataType + WithDType,
        A: CudnnDataType,
    {
        let ints = |values: &[usize]| values.iter().map(|&v| v as c_int).collect::<Vec<_>>();
        // Both tensors are contiguous, described by their packed strides: candle lets a dimension of size 1 carry
        // any stride, which changes no address but would make cuDNN see an unpacked tensor.
        let packed = |dims: &[usize]| Layout::contiguous(dims.to_vec());
        let (x_packed, y_packed) = (packed(x_l.dims()), packed(&self.output));
        let cudnn = handle(dev)?;
        let x_desc = cudnn.create_nd_tensor::<T>(&ints(x_packed.dims()), &ints(x_packed.stride()))?;
        let k_desc = cudnn.create_nd_filter::<T>(sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW, &ints(k_l.dims()))?;
        let y_desc = cudnn.create_nd_tensor::<T>(&ints(y_packed.dims()), &ints(y_packed.stride()))?;
        let mut conv = cudnn.create_convnd::<A>(
            &ints(&self.padding),
            &ints(&self.stride),
            &[1; 3],
            sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
        )?;
        // f32 data: TF32 tensor cores only where candle's f32 products take them too, else FMA arithmetic, as
        // PyTorch maps its `allow_tf32`; half data: tensor cores.
        let math = match T::DATA_TYPE {
            sys::cudnnDataType_t::CUDNN_DATA_FLOAT if !candle_core::cuda::gemm_reduced_precision_f32() => {
                sys::cudnnMathType_t::CUDNN_FMA_MATH
            }
            sys::cudnnDataType_t::CUDNN_DATA_FLOAT => sys::cudnnMathType_t::CUDNN_DEFAULT_MATH,
            _ => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
        };
        conv.set_math_type(math)?;
        let forward = ConvForward { conv: &conv, x: &x_desc, w: &k_desc, y: &y_desc };
        // cuDNN's heuristics, without timing trial runs: the choice PyTorch makes with `cudnn.benchmark` off.
        // Where they name nothing usable, or an algorithm that wants more scratch memory than the budget leaves,
        // implicit GEMM, which takes every shape and no workspace.
        let picked = forward.pick_algorithm().ok().and_then(|algorithm| {
            let bytes = forward.get_workspace_size(algorithm).ok()?;
            (bytes <= MAX_WORKSPACE_BYTES).then_some((algorithm, bytes))
        });
        let (algorithm, workspace_bytes) = match picked {
            Some(picked) => picked,
            None => {
                let implicit_gemm = sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM;
                (implicit_gemm, forward.get_workspace_size(implicit_gemm)?)
            }
        };
        let mut workspace = match workspace_bytes {
            0 => None,
            bytes => Some(unsafe { dev.alloc::<u8>(bytes)? }),
        };
        let mut y = unsafe { dev.alloc::<T>(y_packed.shape().elem_count())? };
        let (one, zero) = (T::from_f64(1.0), T::from_f64(0.0));
        // Safety: the descriptors were made from these very layouts and dtypes, and `y` is the output's size.
        unsafe {
            forward.launch(algorithm, workspace.as_mut(), (one, zero), &view::<T>(x, x_l)?, &view::<T>(k, k_l)?, &mut y)
        }?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }
}

thread_local! {
    /// One cuDNN handle per device and thread, bound to the device's stream: handles may not cross threads.
    static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
}

fn handle(dev: &CudaDevice) -> Result<Arc<Cudnn>> {
    HANDLES.with(|handles| {
        if let Some(cudnn) = handles.borrow().get(&dev.id()) {
            return Ok(cudnn.clone());
        }
        let cudnn = Cudnn::new(dev.cuda_stream())?;
        handles.borrow_mut().insert(dev.id(), cudnn.clone());
        Ok(cudnn)
    })
}
