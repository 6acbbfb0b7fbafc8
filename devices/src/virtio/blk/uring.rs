//! The block device's io_uring: reads of the image that the page cache
//! misses go to the kernel in one `io_uring_enter` per batch of requests,
//! straight into the pinned guest frames. They complete later and signal
//! an eventfd the device thread waits on, so any number of reads can wait
//! for the disk at once without a thread each.
//!
//! Every read in flight owns its request's pins in the in-flight table
//! until its completion is reaped: the kernel writes into those frames
//! until then. Dropping the ring waits for every read in flight first.

use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use io_uring::{IoUring, opcode, squeue, types};
use vmm_sys_util::eventfd::EventFd;

use crate::virtio::Buffers;
use crate::virtio::buffers::iovecs;

/// Submission entries (a read takes one, two with a test delay): room
/// for a full queue of delayed reads.
const ENTRIES: u32 = 512;
/// The user data of a delay's completion (nothing to do).
const DELAY: u64 = u64::MAX;

/// A read of the image into a request's device-writable buffers.
#[derive(Debug)]
pub struct Read {
    /// The request's queue.
    pub q: usize,
    /// The queue's generation when the request was taken.
    pub generation: u64,
    /// The request's head.
    pub head: u16,
    /// The request's pins.
    pub bufs: Buffers,
    /// Byte offset in the image.
    pub off: u64,
    /// Bytes to read into the writable buffers, from their start; the
    /// status byte follows.
    pub len: u64,
}

#[derive(Debug)]
struct InFlight {
    read: Read,
    /// The iovecs of a vectored read; the kernel may look at them until
    /// the read completes.
    _iov: Vec<libc::iovec>,
    /// The delay a test asked for; read by the kernel at submission.
    _delay: Option<Box<types::Timespec>>,
}

// SAFETY: the iovecs point into the pinned frames that `read.bufs` holds
// and are only handed to the kernel; nothing dereferences them here.
unsafe impl Send for InFlight {}

/// An io_uring with its in-flight table.
pub struct Uring {
    ring: IoUring,
    event: EventFd,
    slots: Vec<Option<InFlight>>,
    free: Vec<u32>,
    in_flight: usize,
    reaped: Vec<(u64, i32)>,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring")
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

impl Uring {
    /// A ring whose completions signal [`Uring::event_fd`]; an error where
    /// the kernel (or a seccomp filter) refuses io_uring.
    pub fn new() -> std::io::Result<Self> {
        let ring = IoUring::builder()
            .setup_cqsize(2 * ENTRIES)
            .build(ENTRIES)?;
        let event = EventFd::new(libc::EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        Ok(Self {
            ring,
            event,
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            reaped: Vec::new(),
        })
    }

    /// Signalled when reads complete (the kernel's `register_eventfd_async`
    /// would miss reads that wait for the disk). [`Uring::clear_event`]
    /// before [`Uring::reap`] consumes the signal.
    pub fn event_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    /// Consumes the eventfd's signal; completions after it signal again.
    pub fn clear_event(&self) {
        let _ = self.event.read();
    }

    /// Reads in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Queues `read` of `fd` (submitted by the next [`Uring::submit`]),
    /// after `delay` if given; the read back if the submission queue has
    /// no room even after a submission (the ring is failing: rare, so the
    /// read comes back boxed).
    pub fn push(
        &mut self,
        fd: RawFd,
        read: Read,
        delay: Option<Duration>,
    ) -> Result<(), Box<Read>> {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        let (iov, data) = {
            let slices = read
                .bufs
                .writable_slices(0, read.len)
                .expect("the caller checked the length");
            let iov = iovecs(&slices);
            let entry = match iov.as_slice() {
                [one] => opcode::Read::new(types::Fd(fd), one.iov_base.cast(), one.iov_len as u32)
                    .offset(read.off)
                    .build(),
                many => opcode::Readv::new(types::Fd(fd), many.as_ptr(), many.len() as u32)
                    .offset(read.off)
                    .build(),
            };
            (iov, entry.user_data(u64::from(slot)))
        };
        let delay = delay.map(|d| {
            Box::new(
                types::Timespec::new()
                    .sec(d.as_secs())
                    .nsec(d.subsec_nanos()),
            )
        });
        let wait = delay.as_ref().map(|d| {
            opcode::Timeout::new(&**d as *const types::Timespec)
                .build()
                .flags(squeue::Flags::IO_HARDLINK)
                .user_data(DELAY)
        });
        let both;
        let entries: &[squeue::Entry] = match wait {
            Some(w) => {
                both = [w, data];
                &both
            }
            None => std::slice::from_ref(&data),
        };
        let room = |ring: &mut IoUring| {
            let sq = ring.submission();
            sq.capacity() - sq.len() >= entries.len()
        };
        if !room(&mut self.ring) {
            self.submit();
        }
        if !room(&mut self.ring) {
            self.free.push(slot);
            return Err(Box::new(read));
        }
        self.slots[slot as usize] = Some(InFlight {
            read,
            _iov: iov,
            _delay: delay,
        });
        self.in_flight += 1;
        // SAFETY: the entries point into frames pinned by the `Buffers` of
        // the slot filled above (and at its iovecs and delay, owned by the
        // same slot); the slot is emptied only when the read's completion
        // is reaped, and dropping the ring waits for every read in flight,
        // so the memory outlives the kernel's use.
        let pushed = unsafe { self.ring.submission().push_multiple(entries) };
        pushed.expect("the submission queue has room");
        Ok(())
    }

    /// Hands the queued reads to the kernel; those the page cache holds
    /// complete meanwhile.
    pub fn submit(&mut self) {
        while !self.ring.submission().is_empty() {
            match self.ring.submit() {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // The completion queue is full: the caller reaps and
                    // the next call submits the rest.
                    log::debug!("virtio-blk: io_uring submission: {e}");
                    return;
                }
            }
        }
    }

    /// Calls `f` with each completed read and its result (bytes read, or
    /// a negative errno); the read's pins are the caller's from then on.
    pub fn reap(&mut self, mut f: impl FnMut(Read, i32)) {
        self.reaped.clear();
        self.reaped
            .extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for i in 0..self.reaped.len() {
            let (slot, result) = self.reaped[i];
            if slot == DELAY {
                continue;
            }
            let Some(done) = self.slots.get_mut(slot as usize).and_then(Option::take) else {
                continue;
            };
            self.free.push(slot as u32);
            self.in_flight -= 1;
            f(done.read, result);
        }
    }

    /// Submits what is queued and waits until at least one read
    /// completes (or was interrupted); the caller reaps. An error if the
    /// ring fails: nothing then says when the kernel is done with the
    /// frames of the reads in flight.
    pub fn wait(&mut self) -> std::io::Result<()> {
        match self.ring.submit_and_wait(1) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Drop for Uring {
    /// Waits for every read in flight: the kernel writes into their pinned
    /// frames until they complete.
    fn drop(&mut self) {
        while self.in_flight > 0 {
            if let Err(e) = self.wait() {
                // The frames stay pinned for good.
                log::error!("virtio-blk: waiting for io_uring reads: {e}");
                for s in self.slots.drain(..).flatten() {
                    std::mem::forget(s);
                }
                return;
            }
            self.reap(|r, _| drop(r));
        }
    }
}
