//! Snapshot fuzzing: a VM runs to its reset point (SNAPSHOT), and from
//! there one input at a time, each run starting from the identical state.
//!
//! - [`Target`] is what a fuzzer drives: run one input, read the coverage
//!   map it left. The VM-backed target resets only what a run changed.
//! - The fuzzer front ends (the built-in `vmm fuzz` loop and AFL++'s
//!   forkserver, `vmm fuzz-target`) only see this trait.

use thiserror::Error;

pub mod campaign;
pub mod corpus;
pub mod forkserver;
pub(crate) mod harness;
pub mod mock;
pub mod mutate;
mod spare;
pub mod vm_target;

pub use vm_target::{TargetFactory, vm_targets};

/// Bytes in the AFL-style coverage map (one byte per edge).
pub const MAP_SIZE: usize = 1 << 16;

/// How one run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// DONE(0): the target accepted the input.
    Ok,
    /// DONE(status) with status ≠ 0: the target's own verdict of a bug.
    Fail(u64),
    /// The guest took an exception.
    Crash(Crash),
    /// The run hit the wall-clock timeout or the exit budget.
    Hang,
    /// The guest called EXIT(code) instead of DONE.
    Exit(u64),
}

impl Verdict {
    /// Whether a fuzzer keeps this input as a crash (AFL's `crashes/`).
    pub fn is_crash(&self) -> bool {
        matches!(self, Verdict::Fail(_) | Verdict::Crash(_))
    }
}

/// A guest exception that ended a run: the fault the program-mode
/// exception stubs report.
pub use crate::x86::program::GuestFault as Crash;

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Ok => write!(f, "ok"),
            Verdict::Fail(s) => write!(f, "the target reported failure {s}"),
            Verdict::Crash(c) => write!(f, "{c}"),
            Verdict::Hang => write!(f, "hang"),
            Verdict::Exit(c) => write!(f, "the guest exited with code {c}"),
        }
    }
}

/// Errors that stop fuzzing (a run's verdict is not an error).
#[derive(Debug, Error)]
pub enum FuzzError {
    /// The VM could not go on (a VMM error, not a target's bug).
    #[error("the VM failed: {0}")]
    Vm(String),
    /// The target never reached its reset point.
    #[error("the target ended before SNAPSHOT: {0}")]
    NoSnapshot(String),
    /// Host I/O failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// What the host said.
        #[source]
        source: std::io::Error,
    },
}

/// What a fuzzer drives: one input per run, every run from the same state.
pub trait Target: Send {
    /// Runs `input` from the reset point. Longer inputs than the target's
    /// buffer are truncated.
    fn run(&mut self, input: &[u8]) -> Result<Verdict, FuzzError>;
    /// The coverage map the last run left ([`MAP_SIZE`] bytes).
    fn coverage(&self) -> &[u8];
}
