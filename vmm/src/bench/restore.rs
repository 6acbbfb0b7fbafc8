//! Snapshot files and lazy restore: the time to save a VM to files, and
//! from the start of a restore to the restored guest's first instruction,
//! for a mostly empty and a densely written VM.

use std::path::Path;
use std::time::{Duration, Instant};

use memory::PAGE_SIZE;

use super::{Bench, median};
use crate::console::Sink;
use crate::vm::{Exit, Vm, VmmError};

/// The guest mode that touches its pages, then waits for mailbox word 5.
const WAIT: u64 = 21;
/// Where the benchmark guest's touched area starts.
const AREA: u64 = 16 << 20;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// What one restore took.
struct Restored {
    /// `Vm::restore` alone.
    call: Duration,
    /// From the start of the restore to the exit of the guest's first
    /// instruction (its fetch faults: the code page is still in the file).
    first: Duration,
    /// From the start of the restore to the guest's EXIT, through the
    /// VMM's exit loop (the faults that bring its code, stack and mailbox
    /// back, and the hypercall).
    exit: Duration,
}

/// What one VM's save and restores measured.
struct Measured {
    save: Duration,
    /// Pages the memory file holds.
    pages: u64,
    restores: Vec<Restored>,
    /// The guest's time to read its pages back, and the faults meanwhile.
    read_back: Option<(Duration, u64)>,
}

impl Bench {
    /// Saves a `mem`-byte VM whose guest wrote `pages` pages, restores it
    /// several times, and records the figures.
    pub(super) fn restore(&mut self, tsc: f64) -> Result<(), VmmError> {
        let mem: u64 = if self.quick { 64 << 20 } else { 256 << 20 };
        let dense = (mem - AREA - (4 << 20)) / PAGE_SIZE;
        for (what, pages) in [("mostly empty", 0), ("dense", dense)] {
            let dir =
                std::env::temp_dir().join(format!("vmm-bench-restore-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).map_err(VmmError::Thread)?;
            let measured = self.save_and_restore(&dir, mem, pages, tsc);
            let _ = std::fs::remove_dir_all(&dir);
            let m = measured?;
            self.record_restore(mem, what, m.pages, m.save, &m.restores);
            if let Some((took, faults)) = m.read_back {
                self.record(
                    &format!("  restored guest reads its {pages} pages back, {mib} MiB", mib = mem >> 20),
                    format!("{:.1} ms", ms(took)),
                    format!(
                        "reported: {:.2} us a page, {faults} faults (one per run of up to 64 pages)",
                        took.as_secs_f64() * 1e6 / pages.max(1) as f64
                    ),
                );
            }
        }
        Ok(())
    }

    fn save_and_restore(
        &mut self,
        dir: &Path,
        mem: u64,
        pages: u64,
        tsc: f64,
    ) -> Result<Measured, VmmError> {
        let (image, state) = (dir.join("vm.mem"), dir.join("vm.state"));
        let mut vm = self.vm(mem, WAIT, pages, tsc)?;
        vm.start()?;
        super::wait_touched(&vm, |vm| Self::mailbox(vm.memory(), 3) == 1)?;
        let file = std::fs::File::create_new(&image).map_err(VmmError::Thread)?;
        let saved = vm.snapshot_to_files(file, &state, true, |_, _| {});
        vm.stop(Exit::Code(0));
        let _ = vm.wait();
        let saved = saved?;
        let runs = if self.quick { 3 } else { 10 };
        let mut out = Vec::with_capacity(runs);
        for _ in 0..runs {
            out.push(self.restore_once(&image, &state)?);
        }
        let read_back = match pages {
            0 => None,
            _ => Some(self.read_back(&image, &state, tsc)?),
        };
        Ok(Measured {
            save: saved.total,
            pages: saved.pages,
            restores: out,
            read_back,
        })
    }

    /// Restores once and lets the guest read every page it wrote: the
    /// guest's time for that, and the faults the VMM resolved meanwhile.
    fn read_back(&self, image: &Path, state: &Path, tsc: f64) -> Result<(Duration, u64), VmmError> {
        let ctx = memory::Context::new(memory::Config::default());
        let vm = Vm::restore(&self.hv, &ctx, state, image, Sink::capture().0)?;
        let mem = vm.memory().clone();
        mem.write(
            super::MAILBOX + 5 * 8,
            &[1u64, 1].map(u64::to_le_bytes).concat(),
        )?;
        let before = ctx.stats().host_faults;
        let outcome = vm.run()?;
        if outcome.exit != Exit::Code(0) {
            return Err(VmmError::Config(format!(
                "the restored guest ended {:?}",
                outcome.exit
            )));
        }
        let ticks = Self::mailbox(&mem, 2);
        let faults = outcome.stats.host_faults - before;
        Ok((Duration::from_secs_f64(ticks as f64 / tsc), faults))
    }

    fn restore_once(&self, image: &Path, state: &Path) -> Result<Restored, VmmError> {
        let ctx = memory::Context::new(memory::Config::default());
        let t = Instant::now();
        let mut vm = Vm::restore(&self.hv, &ctx, state, image, Sink::capture().0)?;
        let call = t.elapsed();
        super::first_exit(&mut vm)?;
        let first = t.elapsed();
        drop(vm);

        let ctx = memory::Context::new(memory::Config::default());
        let t = Instant::now();
        let vm = Vm::restore(&self.hv, &ctx, state, image, Sink::capture().0)?;
        vm.memory()
            .write(super::MAILBOX + 5 * 8, &1u64.to_le_bytes())?;
        let outcome = vm.run()?;
        let exit = t.elapsed();
        if outcome.exit != Exit::Code(0) {
            return Err(VmmError::Config(format!(
                "the restored guest ended {:?}",
                outcome.exit
            )));
        }
        Ok(Restored { call, first, exit })
    }

    fn record_restore(
        &mut self,
        mem: u64,
        what: &str,
        pages: u64,
        save: Duration,
        restored: &[Restored],
    ) {
        let mib = mem >> 20;
        let pick = |f: fn(&Restored) -> Duration| median(restored.iter().map(f).collect());
        let (call, first, exit) = (pick(|r| r.call), pick(|r| r.first), pick(|r| r.exit));
        self.record(
            &format!("save to snapshot files, {mib} MiB {what} ({pages} pages)"),
            format!("{:.2} ms", ms(save)),
            "reported (live snapshot, index, state file)".into(),
        );
        self.record(
            &format!("  restore to first guest instruction, {mib} MiB {what}"),
            format!("{:.2} ms", ms(first)),
            super::goal(
                ms(first) <= 2.0,
                &format!(
                    "goal <= 2 ms; Vm::restore {:.2} ms; Firecracker: < 8 ms for 512 MiB on bare metal",
                    ms(call)
                ),
            ),
        );
        self.record(
            &format!("  restore to the guest's first hypercall (EXIT), {mib} MiB {what}"),
            format!("{:.2} ms", ms(exit)),
            "reported (median)".into(),
        );
    }
}
