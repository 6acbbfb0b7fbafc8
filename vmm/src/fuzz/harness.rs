//! What the fuzzing hypercalls (SNAPSHOT, DONE, COVERAGE_MAP) do in a VM.
//!
//! - In a VM that `vmm run` runs, SNAPSHOT hands the guest the `--input`
//!   bytes (an empty input without one) and DONE ends the VM like EXIT: a
//!   saved input replays outside the fuzzer.
//! - In the root VM of a fuzzing session, SNAPSHOT takes the snapshot
//!   every run starts from, and the root VM ends there.
//! - In a fuzzing clone, DONE ends the run; SNAPSHOT called again within
//!   a run hands over the run's input again (or, when the fuzzer asks for
//!   it, takes a child snapshot there).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::abi::errno;
use crate::vm::VmShared;

use super::vm_target::Taken;

/// The fuzzing role of a VM.
#[derive(Debug)]
pub(crate) enum Harness {
    /// A VM run on its own.
    Plain {
        /// What SNAPSHOT writes into the guest's buffer.
        input: Vec<u8>,
    },
    /// The root VM of a fuzzing session: SNAPSHOT leaves its result here.
    Root(Mutex<Option<Result<Box<Taken>, String>>>),
    /// A clone that a fuzzer drives.
    Clone {
        /// The length of the current run's input.
        input_len: AtomicU64,
        /// Where the current run's input is in guest memory.
        input_at: AtomicU64,
        /// The next SNAPSHOT within a run takes a child snapshot there.
        child_wanted: std::sync::atomic::AtomicBool,
    },
}

impl Harness {
    /// Whether a fuzzer drives this VM's vCPU.
    pub(crate) fn is_fuzzing(&self) -> bool {
        matches!(self, Harness::Clone { .. })
    }

    /// The role a VM forked (FORK) from this one plays: a plain VM with
    /// the same input.
    pub(crate) fn for_clone(&self) -> Harness {
        Harness::Plain {
            input: match self {
                Harness::Plain { input } => input.clone(),
                _ => Vec::new(),
            },
        }
    }

    /// Whether a SNAPSHOT in this clone's run takes a child snapshot.
    pub(crate) fn child_wanted(&self) -> bool {
        matches!(self, Harness::Clone { child_wanted, .. } if child_wanted.load(Ordering::Relaxed))
    }

    /// Records what the root's SNAPSHOT produced.
    pub(crate) fn set_taken(&self, taken: Result<Box<Taken>, String>) {
        if let Harness::Root(slot) = self {
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(taken);
        }
    }

    /// Takes what the root's SNAPSHOT produced, if it ran.
    pub(crate) fn take_taken(&self) -> Option<Result<Box<Taken>, String>> {
        match self {
            Harness::Root(slot) => slot.lock().unwrap_or_else(PoisonError::into_inner).take(),
            _ => None,
        }
    }
}

/// SNAPSHOT in a plain VM or a clone: the input into `[buf, buf + cap)`;
/// returns its length as written (truncated to `cap`).
pub(crate) fn plain_snapshot(shared: &VmShared, buf: u64, cap: u64) -> i64 {
    match &shared.harness {
        Harness::Plain { input } => {
            let n = (input.len() as u64).min(cap);
            if n == 0 {
                return 0;
            }
            match shared.mem.write(buf, &input[..n as usize]) {
                Ok(()) => n as i64,
                Err(_) => -errno::EFAULT,
            }
        }
        // Called again within a run: the run's input, once more.
        Harness::Clone {
            input_len,
            input_at,
            ..
        } => {
            let n = input_len.load(Ordering::Relaxed).min(cap);
            let mut bytes = vec![0u8; n as usize];
            let moved = shared
                .mem
                .read(input_at.load(Ordering::Relaxed), &mut bytes)
                .and_then(|()| shared.mem.write(buf, &bytes));
            match moved {
                Ok(()) => n as i64,
                Err(_) => -errno::EFAULT,
            }
        }
        Harness::Root(_) => -errno::EINVAL,
    }
}
