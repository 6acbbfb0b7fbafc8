//! The block device's I/O threads: a fixed pool that runs requests off the
//! device thread, so a slow request never holds up the queue (nor the
//! vCPUs, which never wait for the device thread).
//!
//! A job carries its request's long-term pins, drops them when its I/O is
//! done and hands the completion back to the device thread ([`Handoff`]);
//! it never takes the transport's lock.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

/// A request done by an I/O thread, for the device thread to return to
/// the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The request's queue.
    pub q: usize,
    /// The queue's generation when the request was taken (a completion
    /// that outlived a reset is dropped).
    pub generation: u64,
    /// The request's head.
    pub head: u16,
    /// Bytes written into the request's buffers.
    pub len: u32,
}

#[derive(Debug, Default)]
struct HandoffState {
    /// Jobs whose ticket is live: they may still hold pins.
    running: usize,
    done: Vec<Completion>,
}

/// How the I/O threads hand requests back. A job never takes the
/// transport's lock (the device thread may hold it while it waits for the
/// jobs, see [`Handoff::wait_idle`]): it drops its pins, leaves its
/// completion here and signals [`Handoff::event_fd`], which the device
/// thread waits on. From submission until then the job is counted.
#[derive(Debug)]
pub struct Handoff {
    state: Mutex<HandoffState>,
    idle: Condvar,
    event: EventFd,
}

impl Handoff {
    /// An empty handoff.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            state: Mutex::default(),
            idle: Condvar::new(),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    fn lock(&self) -> MutexGuard<'_, HandoffState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one more job until its ticket is finished or dropped.
    pub fn enter(self: &Arc<Self>) -> Ticket {
        self.lock().running += 1;
        Ticket(Some(self.clone()))
    }

    /// Signalled when a job finishes.
    pub fn event_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    /// Moves the completions handed over so far into `out`, and consumes
    /// the signal.
    pub fn take(&self, out: &mut Vec<Completion>) {
        let _ = self.event.read();
        out.append(&mut self.lock().done);
    }

    /// Waits until no job is running: none holds a pin any more, and each
    /// one's completion is here.
    pub fn wait_idle(&self) {
        let mut s = self.lock();
        while s.running > 0 {
            s = self.idle.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn leave(&self, done: Option<Completion>) {
        {
            let mut s = self.lock();
            s.done.extend(done);
            s.running -= 1;
            if s.running == 0 {
                self.idle.notify_all();
            }
        }
        if done.is_some() {
            if let Err(e) = self.event.write(1) {
                log::error!("virtio-blk: cannot signal a completion: {e}");
            }
        }
    }
}

/// One job counted in a [`Handoff`]; dropped unfinished (a job that never
/// ran), it just stops counting.
#[derive(Debug)]
pub struct Ticket(Option<Arc<Handoff>>);

impl Ticket {
    /// Hands `done` over; the job must have dropped its pins.
    pub fn finish(mut self, done: Completion) {
        if let Some(h) = self.0.take() {
            h.leave(Some(done));
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.leave(None);
        }
    }
}

/// One unit of work.
pub type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Jobs {
    queue: VecDeque<Job>,
    stop: bool,
}

#[derive(Default)]
struct Inner {
    jobs: Mutex<Jobs>,
    ready: Condvar,
}

/// A pool of I/O threads.
pub struct Pool {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.threads.len())
            .finish()
    }
}

impl Pool {
    /// Starts `n` threads named `name-ioN`.
    pub fn new(n: usize, name: &str) -> std::io::Result<Self> {
        let inner = Arc::new(Inner::default());
        let threads = (0..n)
            .map(|i| {
                let inner = inner.clone();
                std::thread::Builder::new()
                    .name(format!("{name}-io{i}"))
                    .spawn(move || run(&inner))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self { inner, threads })
    }

    /// Queues `job`.
    pub fn submit(&self, job: Job) {
        self.inner
            .jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .queue
            .push_back(job);
        self.inner.ready.notify_one();
    }
}

fn run(inner: &Inner) {
    loop {
        let job = {
            let mut jobs = inner.jobs.lock().unwrap_or_else(PoisonError::into_inner);
            loop {
                if let Some(job) = jobs.queue.pop_front() {
                    break job;
                }
                if jobs.stop {
                    return;
                }
                jobs = inner
                    .ready
                    .wait(jobs)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        };
        job();
    }
}

impl Drop for Pool {
    /// Drops the jobs not started (their device is gone: nothing would
    /// see them complete), waits for those running, and stops the
    /// threads. A pool dropped by one of its own jobs (the last reference
    /// to its device went with the job) does not wait for itself.
    fn drop(&mut self) {
        let queued = {
            let mut jobs = self
                .inner
                .jobs
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            jobs.stop = true;
            std::mem::take(&mut jobs.queue)
        };
        drop(queued);
        self.inner.ready.notify_all();
        let me = std::thread::current().id();
        for t in self.threads.drain(..) {
            if t.thread().id() != me && t.join().is_err() {
                log::error!("a block I/O thread panicked");
            }
        }
    }
}
