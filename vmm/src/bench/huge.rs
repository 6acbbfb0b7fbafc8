//! Huge mappings: fork of a touched VM on 2 MiB mappings next to the same
//! VM on 4 KiB mappings and to Linux fork() of a process on transparent
//! huge pages; a guest streaming over its memory on both; COLLAPSE of a
//! split block next to Linux's MADV_COLLAPSE.

use std::time::{Duration, Instant};

use super::{Bench, LinuxArea, goal, median};
use crate::vm::VmmError;

impl Bench {
    /// Fork of a VM that touched `bytes`, huge and small, next to Linux.
    pub(super) fn huge_fork(&mut self, bytes: u64, tsc: f64) -> Result<(), VmmError> {
        let linux = Self::linux_fork(LinuxArea::new_huge(bytes as usize)?)?;
        let mib = bytes >> 20;
        let sample = |b: &mut Self,
                      huge: bool|
         -> Result<(Duration, Duration, Duration, Duration), VmmError> {
            b.huge = huge;
            let samples = b.fork_samples(bytes, tsc);
            b.huge = false;
            let (total, pause, phases) = samples?;
            let memory = phases.iter().map(|p| p.demote + p.protect + p.copy);
            let demote = phases.iter().map(|p| p.demote - p.shed);
            Ok((
                total,
                pause,
                median(memory.collect()),
                median(demote.collect()),
            ))
        };
        let (small, small_pause, small_mem, _) = sample(self, false)?;
        let (huge, huge_pause, huge_mem, huge_demote) = sample(self, true)?;
        self.prepared = true;
        let prepared = sample(self, true);
        self.prepared = false;
        let (ahead, ahead_pause, _, _) = prepared?;
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
            &format!("VM fork, {mib} MiB touched, --huge, clone made ahead"),
            ms(ahead),
            goal(
                ratio(ahead) <= 0.5,
                &format!(
                    "{:.2}x Linux THP, goal <= 0.5x (pause {})",
                    ratio(ahead),
                    ms(ahead_pause)
                ),
            ),
        );
        self.record(
            &format!("  of which memory (tables, host mapping), {mib} MiB, --huge"),
            ms(huge_mem),
            format!("4 KiB mappings: {}", ms(small_mem)),
        );
        // Every fork must take write access from the parent's touched RAM;
        // on this host KVM's part of that grows with the RAM's 4 KiB pages
        // even where the host maps 2 MiB ones.
        self.record(
            &format!("  of which taking write access ahead (host + KVM), {mib} MiB, --huge"),
            ms(huge_demote),
            format!("{:.2}x Linux THP fork", ratio(huge_demote)),
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

impl Bench {
    /// COLLAPSE of `blocks` 2 MiB blocks split into 4 KiB pages, each
    /// (the cost per 2 MiB and how long the VM's faults were held), next to
    /// Linux's MADV_COLLAPSE of an anonymous area of the same size.
    pub(super) fn huge_collapse(&mut self, blocks: u64) -> Result<(), VmmError> {
        let linux = linux_collapse(blocks)?;
        let ctx = memory::Context::new(memory::Config {
            huge: true,
            ..memory::Config::default()
        });
        let bytes = blocks * memory::HUGE_SIZE;
        let layout =
            memory::Layout::new(&[(0, bytes)]).map_err(|e| VmmError::Config(e.to_string()))?;
        let vm = memory::VmMemory::new(&ctx, layout).map_err(VmmError::Memory)?;
        vm.populate(0, bytes, memory::Access::Write)
            .map_err(VmmError::Memory)?;
        let mut took = Vec::new();
        let mut held = Vec::new();
        for b in 0..blocks {
            let gpa = b * memory::HUGE_SIZE;
            // A write-protect of one page splits the block (and leaves it
            // collapsible once lifted).
            vm.write_protect(gpa, memory::PAGE_SIZE)
                .map_err(VmmError::Memory)?;
            let t = Instant::now();
            match vm.collapse(gpa).map_err(VmmError::Memory)? {
                memory::Collapse::Done { held: h, .. } => held.push(h),
                other => {
                    return Err(VmmError::Config(format!(
                        "block {b} did not collapse: {other:?}"
                    )));
                }
            }
            took.push(t.elapsed());
        }
        let worst = held.iter().max().copied().unwrap_or_default();
        let (took, held) = (median(took), median(held));
        let us = |d: Duration| format!("{:.0} us", d.as_secs_f64() * 1e6);
        self.record(
            "Linux MADV_COLLAPSE of 2 MiB (4 KiB pages, anonymous)",
            us(linux),
            "baseline".into(),
        );
        self.record(
            "COLLAPSE of 2 MiB split into 4 KiB pages",
            us(took),
            format!("{:.2}x Linux", took.as_secs_f64() / linux.as_secs_f64()),
        );
        self.record(
            "  of which the VM's faults were held (memory-map lock)",
            us(held),
            format!("worst of {blocks}: {}", us(worst)),
        );
        Ok(())
    }
}

/// Median time of MADV_COLLAPSE of one 2 MiB block of an anonymous area of
/// `blocks` blocks, each touched on 4 KiB pages first.
fn linux_collapse(blocks: u64) -> Result<Duration, VmmError> {
    const HUGE: usize = 2 << 20;
    const MADV_COLLAPSE: i32 = 25;
    let len = blocks as usize * HUGE;
    let area = LinuxArea::aligned(len)?;
    let os = |r: i32| {
        if r == 0 {
            Ok(())
        } else {
            Err(VmmError::Thread(std::io::Error::last_os_error()))
        }
    };
    // SAFETY: advice on our own mapping; it changes how Linux backs the
    // pages, not their contents.
    os(unsafe { libc::madvise(area.ptr, len, libc::MADV_NOHUGEPAGE) })?;
    area.touch();
    // SAFETY: as above.
    os(unsafe { libc::madvise(area.ptr, len, libc::MADV_HUGEPAGE) })?;
    let mut took = Vec::new();
    for b in 0..blocks as usize {
        let at = area.ptr.cast::<u8>().wrapping_add(b * HUGE).cast();
        let t = Instant::now();
        // SAFETY: as above; the block lies inside the area.
        os(unsafe { libc::madvise(at, HUGE, MADV_COLLAPSE) })?;
        took.push(t.elapsed());
    }
    Ok(median(took))
}

impl Bench {
    /// A child writing one page of each shared 2 MiB block, then every
    /// page of them, after a fork of a VM that touched `bytes` on huge
    /// mappings: per block, for each choice of what such a write copies.
    pub(super) fn huge_cow_policies(&mut self, bytes: u64, tsc: f64) -> Result<(), VmmError> {
        use memory::HugeCow;
        let pages = bytes / memory::PAGE_SIZE;
        let blocks = bytes / memory::HUGE_SIZE;
        let run = |b: &mut Self, policy: HugeCow, stride: u64| -> Result<f64, VmmError> {
            b.huge = true;
            b.huge_cow = policy;
            let vm = b.vm_with(
                bytes + (64 << 20),
                1,
                &[23, pages, 0, 0, tsc as u64, stride],
                Vec::new(),
            );
            b.huge = false;
            b.huge_cow = HugeCow::default();
            let vm = vm?;
            let mem = vm.memory().clone();
            b.run_to_exit(vm, "copy-on-write guest")?;
            Ok(Self::mailbox(&mem, 2) as f64 / tsc * 1e6 / blocks as f64)
        };
        let policies = [
            ("4 KiB", HugeCow::Page),
            ("2 MiB", HugeCow::Block),
            ("adaptive", HugeCow::Adaptive),
        ];
        for (what, stride) in [
            ("one page of each", memory::PAGES_PER_LEAF),
            ("every page of each", 1),
        ] {
            let mut us = Vec::new();
            for (_, policy) in policies {
                let mut v: Vec<f64> = (0..3)
                    .map(|_| run(self, policy, stride))
                    .collect::<Result<_, _>>()?;
                v.sort_by(f64::total_cmp);
                us.push(v[1]);
            }
            let best = us.iter().copied().fold(f64::INFINITY, f64::min);
            for ((name, _), t) in policies.iter().zip(&us) {
                self.record(
                    &format!("child writes {what} shared 2 MiB block, copies {name}"),
                    format!("{t:.0} us/block"),
                    format!("{:.2}x the best", t / best),
                );
            }
        }
        Ok(())
    }
}
