//! Huge mappings: fork of a touched VM on 2 MiB mappings next to the same
//! VM on 4 KiB mappings and to Linux fork() of a process on transparent
//! huge pages; a guest streaming over its memory on both.

use std::time::Duration;

use super::{Bench, LinuxArea, goal, median};
use crate::vm::VmmError;

impl Bench {
    /// Fork of a VM that touched `bytes`, huge and small, next to Linux.
    pub(super) fn huge_fork(&mut self, bytes: u64, tsc: f64) -> Result<(), VmmError> {
        let linux = Self::linux_fork(LinuxArea::new_huge(bytes as usize)?)?;
        let mib = bytes >> 20;
        let sample =
            |b: &mut Self, huge: bool| -> Result<(Duration, Duration, Duration), VmmError> {
                b.huge = huge;
                let samples = b.fork_samples(bytes, tsc);
                b.huge = false;
                let (total, pause, phases) = samples?;
                let memory = phases.iter().map(|p| p.demote + p.protect + p.copy);
                Ok((total, pause, median(memory.collect())))
            };
        let (small, small_pause, small_mem) = sample(self, false)?;
        let (huge, huge_pause, huge_mem) = sample(self, true)?;
        let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
        self.record(
            &format!("Linux fork(), {mib} MiB touched on THP"),
            ms(linux),
            "baseline".into(),
        );
        let ratio = |d: Duration| d.as_secs_f64() / linux.as_secs_f64();
        self.record(
            &format!("VM fork, {mib} MiB touched, 4 KiB mappings"),
            ms(small),
            format!("{:.2}x Linux THP (pause {})", ratio(small), ms(small_pause)),
        );
        self.record(
            &format!("VM fork, {mib} MiB touched, --huge"),
            ms(huge),
            goal(
                ratio(huge) <= 0.5,
                &format!("{:.2}x Linux THP, goal <= 0.5x", ratio(huge)),
            ),
        );
        self.record(
            &format!("  of which memory (tables, host mapping), {mib} MiB, --huge"),
            ms(huge_mem),
            format!("4 KiB mappings: {}", ms(small_mem)),
        );
        let pause_ms = huge_pause.as_secs_f64() * 1e3;
        self.record(
            &format!("  of which the guest was paused, {mib} MiB, --huge"),
            ms(huge_pause),
            if mib >= 4096 {
                goal(pause_ms <= 1.0, "goal <= 1 ms at 4 GiB")
            } else {
                "reported".into()
            },
        );
        Ok(())
    }

    /// A guest writing `bytes`: first touches, then streaming writes, on
    /// huge and small mappings.
    pub(super) fn huge_stream(&mut self, bytes: u64, tsc: f64) -> Result<(), VmmError> {
        let pages = bytes / memory::PAGE_SIZE;
        let run = |b: &mut Self, huge: bool| -> Result<(f64, f64), VmmError> {
            b.huge = huge;
            let vm = b.vm(bytes + (64 << 20), 22, pages, tsc);
            b.huge = false;
            let vm = vm?;
            let mem = vm.memory().clone();
            b.run_to_exit(vm, "streaming guest")?;
            let ms = |ticks: u64| ticks as f64 / tsc * 1e3;
            Ok((ms(Self::mailbox(&mem, 2)), ms(Self::mailbox(&mem, 3))))
        };
        let mut small = Vec::new();
        let mut huge = Vec::new();
        for _ in 0..3 {
            small.push(run(self, false)?);
            huge.push(run(self, true)?);
        }
        let med = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| {
            let mut x: Vec<f64> = v.iter().map(f).collect();
            x.sort_by(f64::total_cmp);
            x[x.len() / 2]
        };
        let mib = bytes >> 20;
        for (what, f) in [
            (
                "first touches",
                (|t: &(f64, f64)| t.0) as fn(&(f64, f64)) -> f64,
            ),
            ("4 streaming write passes", |t| t.1),
        ] {
            let (s, h) = (med(&small, f), med(&huge, f));
            self.record(
                &format!("guest {what} over {mib} MiB, 4 KiB mappings"),
                format!("{s:.1} ms"),
                "baseline".into(),
            );
            self.record(
                &format!("guest {what} over {mib} MiB, --huge"),
                format!("{h:.1} ms"),
                format!("{:.2}x 4 KiB mappings", h / s),
            );
        }
        Ok(())
    }
}
