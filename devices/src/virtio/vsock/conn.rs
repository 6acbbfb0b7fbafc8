//! One stream connection between a guest port and a host Unix socket.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use vm_memory::VolatileSlice;

use super::packet::{Header, TYPE_STREAM};
use crate::virtio::buffers::iovecs;

/// The receive buffer the device announces for each connection: guest data
/// the host socket has not taken yet waits in it.
pub const BUF_ALLOC: u32 = 256 << 10;

/// Where a connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    /// Data flows.
    Established,
    /// The host side closed; SHUTDOWN sent, waiting for the guest's RST.
    Closing,
}

/// A connection.
#[derive(Debug)]
pub struct Conn {
    /// The host side.
    pub stream: UnixStream,
    /// The host-side port.
    pub local_port: u32,
    /// The guest-side port.
    pub peer_port: u32,
    /// Where it is.
    pub state: State,
    /// The guest's receive buffer.
    pub peer_buf_alloc: u32,
    /// Bytes the guest has consumed.
    pub peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    pub rx_cnt: u32,
    /// Guest bytes handed to the host socket.
    pub fwd_cnt: u32,
    /// `fwd_cnt` when the guest last heard of it.
    pub fwd_reported: u32,
    /// Guest bytes the host socket did not take yet.
    pub pending_out: Vec<u8>,
    /// Its poller token.
    pub token: u64,
}

impl Conn {
    /// A connection over `stream`.
    pub fn new(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        state: State,
        token: u64,
    ) -> Self {
        Self {
            stream,
            local_port,
            peer_port,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_reported: 0,
            pending_out: Vec::new(),
            token,
        }
    }

    /// A header from the host side of this connection to guest `cid`.
    pub fn header(&mut self, cid: u64, op: u16, len: u32, flags: u32) -> Header {
        self.fwd_reported = self.fwd_cnt;
        Header {
            src_cid: super::packet::HOST_CID,
            dst_cid: cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Bytes the guest can take now.
    pub fn credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Takes the guest's view of its buffer from a packet it sent.
    pub fn update_credit(&mut self, h: &Header) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
    }

    /// Whether the guest should hear about consumed bytes now.
    pub fn owes_credit_update(&self) -> bool {
        self.fwd_cnt.wrapping_sub(self.fwd_reported) >= BUF_ALLOC / 2
    }

    /// Bytes the host socket holds for the guest (FIONREAD).
    pub fn readable(&self) -> io::Result<usize> {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int.
        let r = unsafe { libc::ioctl(self.stream.as_raw_fd(), libc::FIONREAD, &mut n) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n.max(0) as usize)
    }

    /// Whether the host closed its side (a read would return 0).
    pub fn at_eof(&self) -> bool {
        let mut b = 0u8;
        // SAFETY: recv of at most one byte into `b`, without consuming it.
        let n = unsafe {
            libc::recv(
                self.stream.as_raw_fd(),
                (&raw mut b).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n == 0
    }

    /// Reads host data into `slices` (pinned guest buffers).
    pub fn read_into(&self, slices: &[VolatileSlice<'_>]) -> io::Result<usize> {
        let iov = iovecs(slices);
        // SAFETY: the iovecs point into pinned, device-writable guest
        // buffers that `slices` keeps alive for the call.
        let n = unsafe { libc::readv(self.stream.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Hands guest data (pinned guest buffers) to the host socket; what it
    /// does not take now waits in `pending_out`.
    pub fn write_from(&mut self, slices: &[VolatileSlice<'_>]) -> io::Result<()> {
        let total: usize = slices.iter().map(|s| s.len()).sum();
        let mut sent = 0;
        if self.pending_out.is_empty() {
            let iov = iovecs(slices);
            // SAFETY: the iovecs point into pinned guest buffers that
            // `slices` keeps alive for the call; writev only reads them.
            let n =
                unsafe { libc::writev(self.stream.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
            if n >= 0 {
                sent = n as usize;
            } else {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::WouldBlock {
                    return Err(e);
                }
            }
        }
        self.fwd_cnt = self.fwd_cnt.wrapping_add(sent as u32);
        let mut skip = sent;
        for s in slices {
            if skip >= s.len() {
                skip -= s.len();
                continue;
            }
            let mut rest = vec![0u8; s.len() - skip];
            s.offset(skip)
                .map_err(io::Error::other)?
                .copy_to(&mut rest[..]);
            self.pending_out.extend_from_slice(&rest);
            skip = 0;
        }
        if self.pending_out.len() > BUF_ALLOC as usize {
            return Err(io::Error::other(format!(
                "the guest sent {total} bytes past the {BUF_ALLOC} bytes of credit it had"
            )));
        }
        Ok(())
    }

    /// Writes what waits in `pending_out`.
    pub fn flush(&mut self) -> io::Result<()> {
        while !self.pending_out.is_empty() {
            match self.stream.write(&self.pending_out) {
                Ok(n) => {
                    self.pending_out.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
