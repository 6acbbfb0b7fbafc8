//! One thing made ahead on a thread of its own: the next clone of a VM
//! (`fork.rs`) or of a fuzzing snapshot (`fuzz/spare.rs`), whose KVM VM
//! and vCPUs cost more to create here than the rest of a fork.
//!
//! A [`MadeAhead`] holds at most one thing ready. Asking for one
//! ([`MadeAhead::want`]) when none is ready or on its way wakes the maker
//! thread, started at the first ask with a recipe (what it needs to make
//! one, never its owner: a thread holding a VM or a snapshot would keep its
//! frames alive). Whether one is wanted and whether the maker runs change
//! under the same lock as the slot, so no ask is lost between a maker
//! publishing and going back to wait. [`MadeAhead::close`] ends the maker
//! and waits until it has dropped all it made and held; the owner calls it
//! when it goes.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

/// The slot, the maker's state, and the condition they change under.
#[derive(Debug)]
pub(crate) struct MadeAhead<T> {
    state: Mutex<State<T>>,
    changed: Condvar,
}

#[derive(Debug)]
struct State<T> {
    ready: Option<T>,
    /// One is wanted and not made yet.
    wanted: bool,
    /// The maker thread runs (it clears this last, having dropped all it
    /// held).
    maker: bool,
    /// Making ahead is turned off.
    off: bool,
    /// The owner is gone: the maker ends.
    closed: bool,
}

impl<T> Default for MadeAhead<T> {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                ready: None,
                wanted: false,
                maker: false,
                off: false,
                closed: false,
            }),
            changed: Condvar::new(),
        }
    }
}

impl<T: Send + 'static> MadeAhead<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, s: MutexGuard<'a, State<T>>) -> MutexGuard<'a, State<T>> {
        self.changed.wait(s).unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether one is ready and `fits`.
    pub(crate) fn ready(&self, fits: impl FnOnce(&T) -> bool) -> bool {
        self.lock().ready.as_ref().is_some_and(fits)
    }

    /// The one ready, if it `fits`.
    pub(crate) fn take(&self, fits: impl FnOnce(&T) -> bool) -> Option<T> {
        self.lock().ready.take_if(|t| fits(t))
    }

    /// Puts `made` (made by the caller now) in the slot.
    pub(crate) fn put(&self, made: T) {
        let old = self.lock().ready.replace(made);
        drop(old);
    }

    /// Turns making ahead on or off (off drops the one ready).
    pub(crate) fn set_on(&self, on: bool) {
        let old = {
            let mut s = self.lock();
            s.off = !on;
            if on { None } else { s.ready.take() }
        };
        drop(old);
    }

    /// Asks for one unless one is ready or on its way; the first time,
    /// starts the maker thread `name`, which calls the closure `recipe`
    /// gives each time one is wanted.
    pub(crate) fn want<M, E>(self: &Arc<Self>, name: &str, recipe: impl FnOnce() -> M)
    where
        M: FnMut() -> Result<T, E> + Send + 'static,
        E: std::fmt::Display,
    {
        let mut s = self.lock();
        if s.off || s.closed || s.ready.is_some() || s.wanted {
            return;
        }
        s.wanted = true;
        self.changed.notify_all();
        self.start_locked(&mut s, name, recipe);
    }

    /// Starts the maker thread like [`MadeAhead::want`] without asking for
    /// one yet: starting a thread can cost milliseconds while other threads
    /// change the process's mappings, better spent before a fork than in
    /// it.
    pub(crate) fn start<M, E>(self: &Arc<Self>, name: &str, recipe: impl FnOnce() -> M)
    where
        M: FnMut() -> Result<T, E> + Send + 'static,
        E: std::fmt::Display,
    {
        let mut s = self.lock();
        if !s.off && !s.closed {
            self.start_locked(&mut s, name, recipe);
        }
    }

    fn start_locked<M, E>(
        self: &Arc<Self>,
        s: &mut MutexGuard<'_, State<T>>,
        name: &str,
        recipe: impl FnOnce() -> M,
    ) where
        M: FnMut() -> Result<T, E> + Send + 'static,
        E: std::fmt::Display,
    {
        if s.maker {
            return;
        }
        let (me, make) = (self.clone(), recipe());
        let started = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || me.make_while_open(make));
        match started {
            Ok(_) => s.maker = true,
            Err(e) => {
                log::debug!("nothing made ahead ({name}): {e}");
                s.wanted = false;
            }
        }
    }

    /// The maker: makes one whenever one is wanted, until closed.
    fn make_while_open<E: std::fmt::Display>(&self, mut make: impl FnMut() -> Result<T, E>) {
        crate::retire::lower_priority();
        loop {
            {
                let mut s = self.lock();
                while !s.wanted && !s.closed {
                    s = self.wait(s);
                }
                if s.closed {
                    break;
                }
            }
            let made = make();
            let mut s = self.lock();
            s.wanted = false;
            match made {
                Ok(t) if !s.off && !s.closed => s.ready = Some(t),
                Ok(_) => {}
                Err(e) => log::debug!("nothing made ahead: {e}"),
            }
        }
        drop(make);
        self.lock().maker = false;
        self.changed.notify_all();
    }

    /// Ends the maker, waiting until it has dropped all it made and held,
    /// and drops the one ready (the owner is gone).
    pub(crate) fn close(&self) {
        let ready = {
            let mut s = self.lock();
            s.closed = true;
            self.changed.notify_all();
            while s.maker {
                s = self.wait(s);
            }
            s.ready.take()
        };
        drop(ready);
    }
}
