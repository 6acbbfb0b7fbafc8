//! Background threads that do some work on a context now and then (the
//! compactor, the collapse scanner).

use std::sync::{Arc, Condvar, Mutex, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::Context;

/// A thread running a job on a context every interval until dropped (or
/// until the context is gone).
#[derive(Debug)]
pub(crate) struct Periodic {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Periodic {
    /// Starts the thread `name`, running `job` every `interval`.
    pub(crate) fn start(
        name: &str,
        ctx: &Arc<Context>,
        interval: Duration,
        job: impl Fn(&Context) + Send + 'static,
    ) -> std::io::Result<Self> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let thread = {
            let (stop, ctx) = (stop.clone(), Arc::downgrade(ctx));
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || run(&stop, &ctx, interval, job))?
        };
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

fn run(
    stop: &(Mutex<bool>, Condvar),
    ctx: &Weak<Context>,
    interval: Duration,
    job: impl Fn(&Context),
) {
    let (lock, cond) = stop;
    let mut stopped = lock.lock().unwrap_or_else(PoisonError::into_inner);
    while !*stopped {
        stopped = cond
            .wait_timeout(stopped, interval)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
        if *stopped {
            break;
        }
        let Some(ctx) = ctx.upgrade() else { break };
        drop(stopped);
        job(&ctx);
        drop(ctx);
        stopped = lock.lock().unwrap_or_else(PoisonError::into_inner);
    }
}

impl Drop for Periodic {
    fn drop(&mut self) {
        let (lock, cond) = &*self.stop;
        *lock.lock().unwrap_or_else(PoisonError::into_inner) = true;
        cond.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
