//! The guest ABI (v1): hypercall numbers and error values.
//!
//! A program calls the VMM with `out dx, eax`, dx = [`HYPERCALL_PORT`], eax
//! = the function; arguments in RDI, RSI, R10; the result comes back in RAX
//! (negative: `-errno`); every other register is preserved. Numbers are
//! never reused or redefined: new functions are appended.

/// The hypercall port.
pub const HYPERCALL_PORT: u16 = 0x510;

/// Hypercall functions, numbered as in DESIGN.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hypercall {
    /// End this VM with a code.
    Exit,
    /// Print guest memory on the console.
    Write,
    /// Clone the VM.
    Fork,
    /// Wait for a child VM's exit code.
    Wait,
    /// Pin a guest range for the pin-test device.
    Pin,
    /// Device reads through a pin into guest memory.
    PinRead,
    /// Device writes guest memory through a pin.
    PinWrite,
    /// Drop a pin.
    Unpin,
    /// Drop the VM's mapping of pages.
    Discard,
    /// Start a secondary vCPU.
    VcpuStart,
    /// Fuzzing: mark the reset point, receive the input.
    Snapshot,
    /// Fuzzing: end a run.
    Done,
    /// Swap pages out now.
    SwapOut,
    /// Move pages to new frames now.
    Migrate,
    /// Write-protect a range for the VM's listener.
    Wp,
    /// Drain write-protect events.
    WpEvents,
    /// Map a 2 MiB range with one huge frame.
    Collapse,
    /// Process-wide memory counters.
    Stats,
    /// Where the fuzzing coverage map is.
    CoverageMap,
}

impl Hypercall {
    /// The function for a number, if it is defined.
    pub fn from_nr(nr: u64) -> Option<Self> {
        use Hypercall::*;
        Some(match nr {
            0 => Exit,
            1 => Write,
            2 => Fork,
            3 => Wait,
            4 => Pin,
            5 => PinRead,
            6 => PinWrite,
            7 => Unpin,
            8 => Discard,
            9 => VcpuStart,
            10 => Snapshot,
            11 => Done,
            12 => SwapOut,
            13 => Migrate,
            14 => Wp,
            15 => WpEvents,
            16 => Collapse,
            17 => Stats,
            18 => CoverageMap,
            _ => return None,
        })
    }
}

/// Error values returned in RAX (negated).
pub mod errno {
    /// A VM that is not a child of the caller.
    pub const ECHILD: i64 = libc::ECHILD as i64;
    /// The call was interrupted (the VM was forked or is stopping).
    pub const EINTR: i64 = libc::EINTR as i64;
    /// Writing through a read-only pin.
    pub const EACCES: i64 = libc::EACCES as i64;
    /// A bad handle.
    pub const EBADF: i64 = libc::EBADF as i64;
    /// An address outside guest RAM.
    pub const EFAULT: i64 = libc::EFAULT as i64;
    /// A resource in use (a vCPU already running, a pinned range).
    pub const EBUSY: i64 = libc::EBUSY as i64;
    /// An argument out of range.
    pub const EINVAL: i64 = libc::EINVAL as i64;
    /// Out of memory or of some other resource.
    pub const ENOMEM: i64 = libc::ENOMEM as i64;
    /// An unknown function number.
    pub const ENOSYS: i64 = libc::ENOSYS as i64;
    /// A defined function this build does not provide yet.
    pub const EOPNOTSUPP: i64 = libc::EOPNOTSUPP as i64;
    /// The request could not be done.
    pub const EIO: i64 = libc::EIO as i64;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_stable() {
        assert_eq!(Hypercall::from_nr(0), Some(Hypercall::Exit));
        assert_eq!(Hypercall::from_nr(9), Some(Hypercall::VcpuStart));
        assert_eq!(Hypercall::from_nr(17), Some(Hypercall::Stats));
        assert_eq!(Hypercall::from_nr(18), Some(Hypercall::CoverageMap));
        assert_eq!(Hypercall::from_nr(19), None);
        assert_eq!(Hypercall::from_nr(u64::MAX), None);
    }
}
