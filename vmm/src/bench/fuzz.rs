//! Snapshot fuzzing: reset + run of a target that dirties 1, 16 and 256
//! pages, in a 256 MiB and a 4 GiB VM, next to the floor measured in the
//! same run (a bare exit round trip, the dirty harvest, copying the pages);
//! clone creation, the memory 16 clones use, and a reset next to a new
//! clone per run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Bench, copy_4k_cost, goal, median};
use crate::fuzz::Target;
use crate::fuzz::vm_target::{Limits, Snapshot};
use crate::vm::VmmError;

fn fuzz_err(e: crate::fuzz::FuzzError) -> VmmError {
    VmmError::Config(format!("fuzzing benchmark: {}", crate::error_chain(&e)))
}

fn input(pages: u32) -> [u8; 4] {
    pages.to_le_bytes()
}

impl Bench {
    fn fuzz_snapshot(&self, mem: u64) -> Result<Arc<Snapshot>, VmmError> {
        let program = crate::guests::FUZZ_BENCH.to_vec();
        let memory = memory::Config::default();
        Snapshot::of_program(
            &self.hv,
            program,
            mem,
            Vec::new(),
            crate::Sink::Discard,
            memory,
        )
        .map_err(fuzz_err)
    }

    /// Runs per second of the benchmark target dirtying `pages`, and the
    /// harvest time per run.
    fn reset_rate(&self, snap: &Arc<Snapshot>, pages: u32) -> Result<(f64, f64), VmmError> {
        let mut t = snap.target(Limits::default()).map_err(fuzz_err)?;
        let runs = match (self.quick, pages) {
            (true, _) => 200,
            (false, 256) => 2_000,
            (false, _) => 10_000,
        };
        for _ in 0..runs / 10 {
            t.run(&input(pages)).map_err(fuzz_err)?;
        }
        let h0 = t.harvest_time();
        let start = Instant::now();
        for _ in 0..runs {
            t.run(&input(pages)).map_err(fuzz_err)?;
        }
        let per_run = start.elapsed().as_secs_f64() / runs as f64;
        let harvest = (t.harvest_time() - h0).as_secs_f64() / runs as f64;
        if t.last_dirty() < pages as usize {
            return Err(VmmError::Config(format!(
                "the benchmark target dirtied {} pages, not {pages}",
                t.last_dirty()
            )));
        }
        Ok((1.0 / per_run, harvest))
    }

    pub(super) fn fuzz_resets(&mut self, tsc: f64) -> Result<(), VmmError> {
        let exit = self.bare_hypercalls(if self.quick { 2_000 } else { 10_000 }, tsc)? as f64 / tsc;
        let copy = copy_4k_cost();
        self.record(
            "fuzz floor parts: bare exit round trip / 4 KiB copy",
            format!("{:.2}/{:.3} us", exit * 1e6, copy * 1e6),
            "baseline".into(),
        );
        let sizes: &[u64] = if self.quick {
            &[256 << 20]
        } else {
            &[256 << 20, 4 << 30]
        };
        let mut at16 = Vec::new();
        for &mem in sizes {
            let snap = self.fuzz_snapshot(mem)?;
            for pages in [1u32, 16, 256] {
                let (rate, harvest) = self.reset_rate(&snap, pages)?;
                let floor = exit + harvest + pages as f64 * copy;
                let ratio = (1.0 / rate) / floor;
                let verdict = if pages == 16 {
                    at16.push(rate);
                    goal(
                        rate >= 30_000.0 && ratio <= 2.0,
                        &format!("{ratio:.2}x floor; goal >= 30000/s and <= 2x floor"),
                    )
                } else {
                    format!("{ratio:.2}x floor ({:.1} us)", floor * 1e6)
                };
                self.record(
                    &format!(
                        "fuzz reset + run, {pages} dirty pages, {} MiB VM",
                        mem >> 20
                    ),
                    format!("{rate:.0}/s"),
                    verdict,
                );
            }
        }
        if let [small, large] = at16[..] {
            self.record(
                "fuzz reset + run at 16 pages, 4 GiB vs 256 MiB",
                format!("{:.2}x", small / large),
                goal(small / large <= 1.2, "goal: equal (<= 1.2x)"),
            );
        }
        self.fuzz_clones()
    }

    /// Clone creation for a 16 MiB VM, the memory 16 clones use, and a
    /// reset next to a new clone per run as runs dirty more pages.
    fn fuzz_clones(&mut self) -> Result<(), VmmError> {
        let snap = self.fuzz_snapshot(16 << 20)?;
        let n = if self.quick { 5 } else { 30 };
        // From scratch, then with the clone made ahead (ready: the previous
        // clone's run gives the maker thread the time).
        let mut scratch = Vec::with_capacity(n);
        let mut ahead = Vec::with_capacity(n);
        for made_ahead in [false, true] {
            snap.make_clones_ahead(made_ahead);
            for _ in 0..n {
                let waited = Instant::now();
                while made_ahead && !snap.spare_ready() {
                    if waited.elapsed() > Duration::from_secs(2) {
                        return Err(VmmError::Config("no fuzzing clone made ahead".into()));
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                let t = Instant::now();
                let target = snap.target(Limits::default()).map_err(fuzz_err)?;
                let took = t.elapsed();
                if made_ahead { &mut ahead } else { &mut scratch }.push(took);
                drop(target);
            }
        }
        let (scratch, ahead) = (median(scratch), median(ahead));
        let us = |d: Duration| format!("{:.1} us", d.as_secs_f64() * 1e6);
        self.record(
            "fuzz clone creation, 16 MiB VM, from scratch (median)",
            us(scratch),
            "baseline".into(),
        );
        self.record(
            "fuzz clone creation, 16 MiB VM, made ahead (median)",
            us(ahead),
            goal(
                ahead <= Duration::from_micros(100),
                &format!(
                    "goal <= 100 us ({:.2}x from scratch)",
                    ahead.as_secs_f64() / scratch.as_secs_f64()
                ),
            ),
        );
        let ctx = snap.memory().context().clone();
        let before = ctx.stats().resident;
        let mut clones = Vec::new();
        for _ in 0..16 {
            let mut t = snap.target(Limits::default()).map_err(fuzz_err)?;
            t.run(&input(16)).map_err(fuzz_err)?;
            clones.push(t);
        }
        let per_clone = (ctx.stats().resident - before) as f64 / 16.0;
        self.record(
            "fuzz: frames per clone, 16 clones dirtying 16 pages each",
            format!("{per_clone:.0} x 4 KiB"),
            format!("vs {} frames for a whole 16 MiB VM", (16 << 20) / 4096),
        );
        drop(clones);
        // A reset against a new clone per run, for runs that dirty more and
        // more pages.
        let n = if self.quick { 3 } else { 20 };
        for pages in [16u32, 256, 1024] {
            let (reset, _) = self.reset_rate(&snap, pages)?;
            let start = Instant::now();
            for _ in 0..n {
                let mut t = snap.target(Limits::default()).map_err(fuzz_err)?;
                t.run(&input(pages)).map_err(fuzz_err)?;
            }
            let refork = n as f64 / start.elapsed().as_secs_f64();
            self.record(
                &format!("fuzz: reset vs new clone per run, {pages} dirty pages"),
                format!("{reset:.0}/{refork:.0} /s"),
                format!("reset {:.1}x faster", reset / refork),
            );
        }
        Ok(())
    }
}
