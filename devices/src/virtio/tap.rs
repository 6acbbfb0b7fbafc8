//! A TAP device (`/dev/net/tun`) with the virtio-net header in front of
//! every frame (`IFF_VNET_HDR`), non-blocking.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use thiserror::Error;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// Offloads the TAP may hand us (TUNSETOFFLOAD bits).
pub mod offload {
    /// Partial checksums.
    pub const CSUM: u32 = 0x01;
    /// TCP segmentation over IPv4.
    pub const TSO4: u32 = 0x02;
    /// TCP segmentation over IPv6.
    pub const TSO6: u32 = 0x04;
}

/// Errors opening a TAP device.
#[derive(Debug, Error)]
pub enum TapError {
    /// The name does not fit `IFNAMSIZ`.
    #[error("`{0}` is not a TAP device name (1 to 15 bytes)")]
    Name(String),
    /// /dev/net/tun could not be opened.
    #[error("cannot open /dev/net/tun")]
    Open(#[source] io::Error),
    /// The kernel refused an ioctl.
    #[error("cannot {what} on TAP device {name}")]
    Ioctl {
        /// What was asked.
        what: &'static str,
        /// The device.
        name: String,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open TAP device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to (or creates) the TAP device `name`, with a virtio-net
    /// header of `hdr_len` bytes in front of each frame.
    pub fn open(name: &str, hdr_len: i32) -> Result<Self, TapError> {
        if name.is_empty() || name.len() > 15 || name.contains('\0') {
            return Err(TapError::Name(name.into()));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        let tap = Self {
            file,
            name: name.into(),
        };
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an `ifreq`, which `IfReq`
        // lays out (name, then the flags of the union, 40 bytes in all).
        let r = unsafe { libc::ioctl(tap.fd(), TUNSETIFF, &mut req) };
        tap.check(r, "attach")?;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        let r = unsafe { libc::ioctl(tap.fd(), TUNSETVNETHDRSZ, &hdr_len) };
        tap.check(r, "set the virtio-net header size")?;
        tap.set_offload(0)?;
        Ok(tap)
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn check(&self, r: i32, what: &'static str) -> Result<(), TapError> {
        if r < 0 {
            return Err(TapError::Ioctl {
                what,
                name: self.name.clone(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Tells the kernel which offloads the guest accepts ([`offload`]).
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let r = unsafe { libc::ioctl(self.fd(), TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
        self.check(r, "set offloads")
    }

    /// The descriptor to poll.
    pub fn raw_fd(&self) -> RawFd {
        self.fd()
    }

    /// Reads one frame (header first) into `iov`; `Ok(None)` when none is
    /// waiting.
    pub fn readv(&self, iov: &[libc::iovec]) -> io::Result<Option<usize>> {
        // SAFETY: each iovec points into a pinned, device-writable guest
        // buffer that the caller keeps alive for the call.
        let n = unsafe { libc::readv(self.fd(), iov.as_ptr(), iov.len() as i32) };
        would_block(n)
    }

    /// Writes one frame (header first) from `iov`; `Ok(None)` when the
    /// TAP's queue is full.
    pub fn writev(&self, iov: &[libc::iovec]) -> io::Result<Option<usize>> {
        // SAFETY: each iovec points into a pinned guest buffer that the
        // caller keeps alive for the call; writev only reads it.
        let n = unsafe { libc::writev(self.fd(), iov.as_ptr(), iov.len() as i32) };
        would_block(n)
    }
}

fn would_block(n: isize) -> io::Result<Option<usize>> {
    if n >= 0 {
        return Ok(Some(n as usize));
    }
    let e = io::Error::last_os_error();
    match e.kind() {
        io::ErrorKind::WouldBlock => Ok(None),
        _ => Err(e),
    }
}

use std::os::unix::fs::OpenOptionsExt;
