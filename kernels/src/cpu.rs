//! The host reducer. (Placeholder: delegates to the reference until the
//! vectorized kernels land.)

use crate::{DType, KernelError, ReduceOp, Reducer, reference::ReferenceReducer};

/// Vectorized host reducer.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuReducer;

impl Reducer for CpuReducer {
    fn name(&self) -> &'static str {
        "cpu"
    }
    fn reduce(
        &self,
        dtype: DType,
        op: ReduceOp,
        dst: &mut [u8],
        src: &[u8],
    ) -> Result<(), KernelError> {
        ReferenceReducer.reduce(dtype, op, dst, src)
    }
    fn finish_avg(
        &self,
        dtype: DType,
        dst: &mut [u8],
        contributions: usize,
    ) -> Result<(), KernelError> {
        ReferenceReducer.finish_avg(dtype, dst, contributions)
    }
}
