//! All VMs of one process: the root VM and the clones forked from it.
//!
//! The machine gives every VM an id (the root is 0, clones count up from
//! 1 and ids are never reused), remembers each clone's parent and exit, and
//! owns the clones' vCPU threads so their resources are freed once they
//! end. WAIT reads it; FORK adds to it.
//!
//! Lock order: a VM's vCPU control locks are never held while the registry
//! lock is taken, and the registry lock is never held while joining a
//! thread or stopping a VM.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use memory::VmMemory;

use crate::ahead::MadeAhead;
use crate::console::Sink;
use crate::fork::Spare;
use crate::kvm::Hypervisor;
use crate::vm::{Exit, VmShared, VmmError};

#[derive(Debug, Default)]
struct Record {
    parent: Option<u32>,
    exit: Option<Exit>,
    /// The running clone, until it ended and was reaped.
    shared: Option<Arc<VmShared>>,
    threads: Vec<JoinHandle<()>>,
}

/// Why WAIT returned without an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WaitError {
    /// Not a child of the caller (or already waited for).
    NotChild,
    /// The caller was asked to pause or stop first.
    Interrupted,
}

/// All VMs of the process.
#[derive(Debug)]
pub(crate) struct Machine {
    pub(crate) hv: Hypervisor,
    pub(crate) ctx: Arc<memory::Context>,
    pub(crate) sink: Sink,
    next_id: AtomicU32,
    /// How long the last fork kept the parent's vCPUs paused, in ns.
    last_pause_ns: AtomicU64,
    /// Pages the VMM itself keeps pinned in all VMs (not device pins).
    pub(crate) vmm_pinned: AtomicU64,
    records: Mutex<HashMap<u32, Record>>,
    changed: Condvar,
    /// The next clone, made ahead (see `fork.rs`).
    spare: Arc<MadeAhead<Spare>>,
    /// The next KVM VM and host mapping for a large VM that forks (see
    /// `fork.rs`), made ahead.
    host_spare: Arc<MadeAhead<Spare>>,
}

/// What a spare is for (see `fork.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SpareFor {
    /// The next clone.
    Clone,
    /// The forking VM itself, moved to it.
    Parent,
}

impl SpareFor {
    /// The name of the thread that makes such spares.
    fn maker(self) -> &'static str {
        match self {
            SpareFor::Clone => "clone-spare",
            SpareFor::Parent => "host-spare",
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.spare.close();
        self.host_spare.close();
    }
}

impl Machine {
    pub(crate) fn new(hv: Hypervisor, ctx: Arc<memory::Context>, sink: Sink) -> Arc<Self> {
        let m = Arc::new(Self {
            hv,
            ctx,
            sink,
            next_id: AtomicU32::new(1),
            last_pause_ns: AtomicU64::new(0),
            vmm_pinned: AtomicU64::new(0),
            records: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
            spare: Arc::default(),
            host_spare: Arc::default(),
        });
        m.lock().insert(0, Record::default());
        m
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u32, Record>> {
        self.records.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn set_last_pause(&self, pause: Duration) {
        self.last_pause_ns
            .store(pause.as_nanos() as u64, Ordering::Relaxed);
    }

    pub(crate) fn last_pause(&self) -> Duration {
        Duration::from_nanos(self.last_pause_ns.load(Ordering::Relaxed))
    }

    /// The memory counters as guests and users see them: pins are the
    /// devices' pins, without the VMM's own.
    pub(crate) fn stats(&self) -> memory::StatsSnapshot {
        let mut s = self.ctx.stats();
        s.pins = s
            .pins
            .saturating_sub(self.vmm_pinned.load(Ordering::Relaxed));
        s
    }

    /// A fresh clone id.
    pub(crate) fn next_id(&self) -> u32 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Records a clone before its vCPUs start.
    pub(crate) fn add_clone(&self, id: u32, parent: u32, shared: Arc<VmShared>) {
        self.lock().insert(
            id,
            Record {
                parent: Some(parent),
                exit: None,
                shared: Some(shared),
                threads: Vec::new(),
            },
        );
    }

    /// Hands a clone's vCPU threads to the machine.
    pub(crate) fn set_threads(&self, id: u32, threads: Vec<JoinHandle<()>>) {
        if let Some(r) = self.lock().get_mut(&id) {
            r.threads = threads;
        }
        self.changed.notify_all();
    }

    /// Records how VM `id` ended.
    pub(crate) fn record_exit(&self, id: u32, exit: &Exit) {
        if let Some(r) = self.lock().get_mut(&id) {
            r.exit.get_or_insert_with(|| exit.clone());
        }
        self.changed.notify_all();
    }

    /// Wakes every waiter so it re-checks its own VM's state.
    pub(crate) fn wake_waiters(&self) {
        self.changed.notify_all();
    }

    /// WAIT: blocks until clone `child` of `parent` ends, then forgets it
    /// and frees its resources. Returns early if `interrupted` says so.
    pub(crate) fn wait_child(
        &self,
        parent: u32,
        child: u32,
        interrupted: impl Fn() -> bool,
    ) -> Result<Exit, WaitError> {
        let mut records = self.lock();
        loop {
            match records.get(&child) {
                Some(r) if r.parent == Some(parent) => {
                    if let Some(exit) = r.exit.clone() {
                        let r = records.remove(&child).expect("present above");
                        drop(records);
                        Self::release(r);
                        return Ok(exit);
                    }
                }
                _ => return Err(WaitError::NotChild),
            }
            if interrupted() {
                return Err(WaitError::Interrupted);
            }
            records = self
                .changed
                .wait_timeout(records, Duration::from_millis(100))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Joins a clone's threads and drops its state (and so its memory).
    fn release(mut r: Record) {
        for t in r.threads.drain(..) {
            if t.join().is_err() {
                log::error!("a vCPU thread of a clone panicked");
            }
        }
        drop(r.shared.take());
    }

    fn spare(&self, what: SpareFor) -> &Arc<MadeAhead<Spare>> {
        match what {
            SpareFor::Clone => &self.spare,
            SpareFor::Parent => &self.host_spare,
        }
    }

    /// The spare for `what` made ahead, if it fits a fork of `parent` with
    /// `vcpus` vCPUs.
    pub(crate) fn take_spare(
        &self,
        what: SpareFor,
        parent: &VmMemory,
        vcpus: usize,
    ) -> Option<Spare> {
        self.spare(what).take(|s| s.fits(parent, vcpus))
    }

    /// Makes a spare for `what` in forks of `parent` now, unless one fits
    /// already.
    pub(crate) fn make_spare(
        &self,
        what: SpareFor,
        parent: &VmMemory,
        vcpus: usize,
    ) -> Result<(), VmmError> {
        let slot = self.spare(what);
        if !slot.ready(|s| s.fits(parent, vcpus)) {
            slot.put(self.spare_now(parent, vcpus)?);
        }
        Ok(())
    }

    /// A spare for forks of `parent`, made now by the caller.
    pub(crate) fn spare_now(&self, parent: &VmMemory, vcpus: usize) -> Result<Spare, VmmError> {
        Spare::make(&self.hv, parent.context(), parent.layout().clone(), vcpus)
    }

    /// Has the next spare for `what` in forks of `parent` made on a maker
    /// thread, unless one is there or on its way. The maker holds neither
    /// the parent nor the machine: either would keep the parent's frames
    /// past its end.
    pub(crate) fn refill_spare(&self, what: SpareFor, parent: &VmMemory, vcpus: usize) {
        self.spare(what)
            .want(what.maker(), self.spare_recipe(parent, vcpus));
    }

    /// Starts the maker of spares for `what` in forks of `parent` (see
    /// [`MadeAhead::start`]).
    pub(crate) fn start_spare_maker(&self, what: SpareFor, parent: &VmMemory, vcpus: usize) {
        self.spare(what)
            .start(what.maker(), self.spare_recipe(parent, vcpus));
    }

    fn spare_recipe(
        &self,
        parent: &VmMemory,
        vcpus: usize,
    ) -> impl FnOnce() -> Box<dyn FnMut() -> Result<Spare, VmmError> + Send> {
        let (hv, ctx, layout) = (
            self.hv.clone(),
            parent.context().clone(),
            parent.layout().clone(),
        );
        move || Box::new(move || Spare::make(&hv, &ctx, layout.clone(), vcpus))
    }

    /// Frees the resources of clones that have ended; their exits stay
    /// for WAIT.
    pub(crate) fn reap(&self) {
        let done: Vec<Record> = {
            let mut records = self.lock();
            records
                .values_mut()
                .filter(|r| r.exit.is_some() && r.threads.iter().all(JoinHandle::is_finished))
                .filter(|r| r.shared.is_some() || !r.threads.is_empty())
                .map(|r| Record {
                    parent: r.parent,
                    exit: None,
                    shared: r.shared.take(),
                    threads: std::mem::take(&mut r.threads),
                })
                .collect()
        };
        done.into_iter().for_each(Self::release);
    }

    /// Stops every clone still running and frees them all.
    pub(crate) fn stop_clones(&self) {
        let running: Vec<Arc<VmShared>> = self
            .lock()
            .values()
            .filter_map(|r| r.shared.clone())
            .collect();
        for vm in &running {
            vm.finish(Exit::Error("stopped: the root VM ended".into()));
        }
        drop(running);
        let all: Vec<Record> = self.lock().drain().map(|(_, r)| r).collect();
        all.into_iter().for_each(Self::release);
    }

    /// Takes the threads and state of clone `id` (for a library handle
    /// that waits for it).
    pub(crate) fn wait_clone(&self, id: u32) -> Option<Exit> {
        let mut records = self.lock();
        loop {
            let r = records.get(&id)?;
            if let Some(exit) = r.exit.clone() {
                let r = records.remove(&id).expect("present above");
                drop(records);
                Self::release(r);
                return Some(exit);
            }
            records = self
                .changed
                .wait(records)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// The state of running clone `id`.
    pub(crate) fn clone_shared(&self, id: u32) -> Option<Arc<VmShared>> {
        self.lock().get(&id).and_then(|r| r.shared.clone())
    }
}
