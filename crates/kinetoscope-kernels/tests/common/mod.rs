//! Shared by the kernel tests: how a kernel's output is compared with the plain computation.

use candle_core::{DType, Result, Tensor};

/// ‖got − want‖ / ‖want‖, in f32.
pub fn relative_error(got: &Tensor, want: &Tensor) -> Result<f32> {
    let (got, want) = (got.to_dtype(DType::F32)?, want.to_dtype(DType::F32)?);
    let diff = (got - &want)?.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
    Ok(diff / want.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt())
}
