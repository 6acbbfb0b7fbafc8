//! Dropping, on a thread of its own, what a VM moved to a new KVM VM left
//! behind (see `fork.rs`): the old KVM VM and vCPUs, whose teardown drops
//! every mapping KVM made (tens of nanoseconds a page: as much as a fork
//! of the VM would cost), and the spare memory it moved from. None of it
//! may stand in the way of the VM or its fork, so the thread waits while
//! a fork runs ([`hold`]). (The old host mapping goes to memory's reaper,
//! which unmaps it a piece at a time: unmapped at once, it would hold the
//! host's mapping lock for tens of milliseconds.)

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};

type Item = Box<dyn Send>;

#[derive(Default)]
struct State {
    queue: VecDeque<Item>,
    /// Forks running: the thread waits until there are none.
    holds: usize,
    /// Items taken off the queue and not yet dropped.
    dropping: usize,
    /// The thread runs (or could not be started: false).
    started: bool,
}

struct Retire {
    state: Mutex<State>,
    changed: Condvar,
}

fn retire() -> &'static Retire {
    static RETIRE: OnceLock<Retire> = OnceLock::new();
    RETIRE.get_or_init(|| Retire {
        state: Mutex::new(State::default()),
        changed: Condvar::new(),
    })
}

impl Retire {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, s: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(s).unwrap_or_else(PoisonError::into_inner)
    }

    fn run(&self) {
        lower_priority();
        let mut s = self.lock();
        loop {
            while s.holds > 0 || s.queue.is_empty() {
                s = self.wait(s);
            }
            let batch: Vec<Item> = s.queue.drain(..).collect();
            s.dropping = batch.len();
            drop(s);
            drop(batch);
            s = self.lock();
            s.dropping = 0;
            self.changed.notify_all();
        }
    }
}

/// Drops `thing` later, on the retiring thread (at once, here, if that
/// thread cannot be started).
pub(crate) fn later(thing: impl Send + 'static) {
    let r = retire();
    let mut s = r.lock();
    if !s.started {
        let spawned = std::thread::Builder::new()
            .name("retire".into())
            .spawn(|| retire().run());
        match spawned {
            Ok(_) => s.started = true,
            Err(e) => {
                drop(s);
                log::debug!("no retiring thread ({e}): dropped in place");
                return drop(thing);
            }
        }
    }
    s.queue.push_back(Box::new(thing));
    r.changed.notify_all();
}

/// Keeps the retiring thread from dropping anything until the guard goes.
pub(crate) struct Hold(());

/// Holds the retiring thread back while a fork runs.
pub(crate) fn hold() -> Hold {
    retire().lock().holds += 1;
    Hold(())
}

impl Drop for Hold {
    fn drop(&mut self) {
        let r = retire();
        r.lock().holds -= 1;
        r.changed.notify_all();
    }
}

/// Waits until everything handed over so far is dropped (benchmarks start
/// each sample on a quiet machine).
pub(crate) fn wait_idle() {
    let r = retire();
    let mut s = r.lock();
    while s.started && (!s.queue.is_empty() || s.dropping > 0) && s.holds == 0 {
        s = r.wait(s);
    }
}

/// Lowers the calling thread's scheduling priority (SCHED_BATCH, nice 10):
/// for threads that work ahead or behind (making spares, retiring old
/// VMs), which must not take a CPU from a vCPU or a fork that wakes them.
/// Batch matters as much as nice: Linux lets a thread that wakes after a
/// long sleep preempt the thread that woke it, and a fork that asks for
/// the next spare would then wait out the making of it (about 1 ms).
/// A batch thread never preempts on waking; it runs on the next tick or
/// free CPU.
pub(crate) fn lower_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler on the calling thread (pid 0) reads
    // `param`, which lives across the call.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
        log::debug!(
            "cannot make a helper thread a batch thread: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    // SAFETY: setpriority on this thread (Linux takes a thread id for
    // PRIO_PROCESS); it touches no memory of ours.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10) };
    if r != 0 {
        log::debug!(
            "cannot lower a helper thread's priority: {}",
            std::io::Error::last_os_error()
        );
    }
}
