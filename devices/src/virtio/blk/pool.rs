//! The block device's I/O threads: a fixed pool that runs requests off the
//! device thread, so a slow request never holds up the queue (nor the
//! vCPUs, which never wait for the device thread).
//!
//! A job carries its request's long-term pins and completes the request
//! itself, taking the transport's lock only after the I/O is done.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

/// The requests handed to the I/O threads whose pins are still held (a
/// count that a job's [`Ticket`] keeps raised until the job drops it,
/// before the job waits for its transport): a device waits for none
/// before guest memory or the disk may change under them.
#[derive(Debug, Default)]
pub struct Outstanding {
    n: Mutex<usize>,
    idle: Condvar,
}

impl Outstanding {
    /// Counts one more request until the ticket is dropped.
    pub fn enter(self: &Arc<Self>) -> Ticket {
        *self.n.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        Ticket(self.clone())
    }

    /// Waits until every ticket is dropped.
    pub fn wait_idle(&self) {
        let mut n = self.n.lock().unwrap_or_else(PoisonError::into_inner);
        while *n > 0 {
            n = self.idle.wait(n).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// One request counted in an [`Outstanding`].
#[derive(Debug)]
pub struct Ticket(Arc<Outstanding>);

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut n = self.0.n.lock().unwrap_or_else(PoisonError::into_inner);
        *n -= 1;
        if *n == 0 {
            self.0.idle.notify_all();
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
