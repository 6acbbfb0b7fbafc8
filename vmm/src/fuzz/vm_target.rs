//! The VM-backed [`Target`]: a clone of a VM stopped at its SNAPSHOT
//! hypercall, reset to that state after every run.

use std::time::Duration;

use super::{FuzzError, Target};

/// Makes one [`Target`] per call (one per fuzzing thread).
pub type TargetFactory = Box<dyn FnMut() -> Result<Box<dyn Target>, FuzzError> + Send>;

/// A factory of VM targets running `program` (a static ELF that calls
/// SNAPSHOT, then DONE) with `mem` bytes of RAM; a run longer than
/// `timeout` is a hang.
pub fn vm_targets(
    program: Vec<u8>,
    mem: u64,
    timeout: Duration,
) -> Result<TargetFactory, FuzzError> {
    let _ = (program, mem, timeout);
    Err(FuzzError::Vm(
        "the VM fuzzing target is not built yet".into(),
    ))
}
