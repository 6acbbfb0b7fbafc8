//! The device thread: one per device, waiting on the device's queue
//! notifications (KVM ioeventfds, or the transport's own kicks) and on the
//! host file descriptors the device registered (a TAP, sockets), and
//! serving each under the transport's lock. Dropping the [`Worker`] stops
//! and joins the thread.

use std::os::fd::AsRawFd;
use std::sync::PoisonError;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::Shared;

/// Token of the first host file descriptor a device registers with its
/// thread's poller; queue notifications use tokens below it.
pub const HOST_TOKEN_BASE: u64 = 1 << 32;
const STOP: u64 = u64::MAX;

/// The set of file descriptors a device thread waits on.
#[derive(Debug)]
pub struct Poller {
    epoll: Epoll,
}

impl Poller {
    /// A new, empty poller.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            epoll: Epoll::new()?,
        })
    }

    /// Waits on `fd` for `events`; readiness is reported with `token`.
    pub fn add(&self, fd: i32, events: EventSet, token: u64) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    /// Changes what `fd` is waited for.
    pub fn modify(&self, fd: i32, events: EventSet, token: u64) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
    }

    /// Stops waiting on `fd` (a descriptor it does not watch is ignored).
    pub fn remove(&self, fd: i32) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }

    /// Waits up to `timeout_ms` (-1: forever) for events.
    pub fn wait(&self, timeout_ms: i32, events: &mut [EpollEvent]) -> std::io::Result<usize> {
        self.epoll.wait(timeout_ms, events)
    }
}

/// A running device thread.
#[derive(Debug)]
pub struct Worker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts the thread of `transport`, named `name`.
    pub fn spawn(transport: Shared, name: String) -> std::io::Result<Self> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let poller = {
            let t = transport.lock().unwrap_or_else(PoisonError::into_inner);
            let poller = t.poller().clone();
            for (i, q) in t.queues().iter().enumerate() {
                poller.add(q.notify_fd().as_raw_fd(), EventSet::IN, i as u64)?;
            }
            poller
        };
        poller.add(stop.as_raw_fd(), EventSet::IN, STOP)?;
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || serve(&transport, &poller))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

/// The device thread's loop.
fn serve(transport: &Shared, poller: &Poller) {
    let mut events = vec![EpollEvent::default(); 32];
    loop {
        let n = match poller.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("virtio device thread: epoll: {e}");
                return;
            }
        };
        let mut t = transport.lock().unwrap_or_else(PoisonError::into_inner);
        for ev in &events[..n] {
            match ev.data() {
                STOP => return,
                token if token < HOST_TOKEN_BASE => {
                    let q = token as usize;
                    // A reset drains the eventfd under the lock: a
                    // notification from before it is gone by now.
                    if t.queues().get(q).is_some_and(|q| q.take_notification()) {
                        t.queue_notify(q);
                    }
                }
                token => t.host_event(token, ev.events()),
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("a virtio device thread panicked");
            }
        }
    }
}
