//! Benchmarks of swap and migration, each next to its baseline: SWAP_OUT
//! of a touched range and the guest reading it back next to `pwrite` and
//! `pread` of as many 4 KiB pages on a file in the swap file's directory,
//! one swap-in fault as the guest sees it next to one `pread`, and
//! MIGRATE's pages per second with the longest wait of a vCPU writing to
//! the pages being moved.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use memory::PAGE_SIZE;

use super::virtio::{Scratch, io};
use super::{Bench, median_u64, rdtsc};
use crate::vm::VmmError;

/// Where the guest's touched range starts (bench.c's AREA).
const AREA: u64 = 0x100_0000;
/// Guest RAM besides the range: the program, its stack, the mailbox.
const BASE_MEM: u64 = 64 << 20;

/// Host file I/O of as many pages as a swap run moves.
struct FileIo {
    /// Pages per second written with `pwrite` to a new file.
    write: f64,
    /// Pages per second read back with `pread` (from the page cache).
    read: f64,
    /// Seconds of one `pread` (the median).
    pread: f64,
}

/// `pwrite` of `pages` sequential 4 KiB pages to a new file in the
/// temporary directory (where the swap file lives, as swap slots are
/// written), then `pread` of each of them back, timed one by one.
fn file_io(pages: u64, tsc: f64) -> Result<FileIo, VmmError> {
    let path = std::env::temp_dir().join(format!("vmm-bench-swap-{}", std::process::id()));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io)?;
    let _scratch = Scratch(path);
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let t = Instant::now();
    for i in 0..pages {
        page[0] = (i + 1) as u8;
        file.write_all_at(&page, i * PAGE_SIZE).map_err(io)?;
    }
    let write = pages as f64 / t.elapsed().as_secs_f64();
    let mut each = Vec::with_capacity(pages as usize);
    let t = Instant::now();
    for i in 0..pages {
        let t0 = rdtsc();
        file.read_exact_at(&mut page, i * PAGE_SIZE).map_err(io)?;
        each.push(rdtsc() - t0);
    }
    let read = pages as f64 / t.elapsed().as_secs_f64();
    Ok(FileIo {
        write,
        read,
        pread: median_u64(each) as f64 / tsc,
    })
}

/// What one swap run measured in the guest.
struct SwapRun {
    /// Pages per second of SWAP_OUT.
    out: f64,
    /// Pages per second of reading them back, a fault each.
    back: f64,
    /// Seconds of one swap-in fault (the median).
    fault: f64,
    /// Seconds of a plain port exit the VMM ignores, in the same guest.
    exit: f64,
}

/// What one migration run measured.
struct MigrateRun {
    /// Pages per second of MIGRATE with no other vCPU running.
    alone: f64,
    /// Pages per second of MIGRATE while vCPU 1 writes to those pages.
    contended: f64,
    /// The longest any access waited for a page under migration, seconds.
    wait: f64,
    /// vCPU 1's slowest write, seconds.
    slowest: f64,
}

impl Bench {
    /// One guest that touches `pages` pages, swaps them out and reads them
    /// back.
    fn swap_run(&mut self, pages: u64, tsc: f64) -> Result<SwapRun, VmmError> {
        let vm = self.vm_with(
            pages * PAGE_SIZE + BASE_MEM,
            1,
            &[9, pages, 0, 0, tsc as u64],
            Vec::new(),
        )?;
        let mem = vm.memory().clone();
        self.run_to_exit(vm, "swap")?;
        let went = Self::mailbox(&mem, 5);
        if went != pages {
            return Err(VmmError::Config(format!(
                "SWAP_OUT wrote {went} of {pages} pages"
            )));
        }
        let mut raw = vec![0u8; pages as usize * 8];
        mem.read(AREA + pages * PAGE_SIZE, &mut raw)?;
        let each = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        let rate = |ticks: u64| pages as f64 * tsc / ticks.max(1) as f64;
        Ok(SwapRun {
            out: rate(Self::mailbox(&mem, 2)),
            back: rate(Self::mailbox(&mem, 3)),
            fault: median_u64(each) as f64 / tsc,
            exit: Self::mailbox(&mem, 6) as f64 / tsc,
        })
    }

    /// One two-vCPU guest that migrates `pages` touched pages, then
    /// migrates the first `hot` of them `rounds` times while vCPU 1 writes
    /// to them.
    fn migrate_run(
        &mut self,
        pages: u64,
        hot: u64,
        rounds: u64,
        tsc: f64,
    ) -> Result<MigrateRun, VmmError> {
        let vm = self.vm_with(
            pages * PAGE_SIZE + BASE_MEM,
            2,
            &[10, pages, 0, 0, tsc as u64, hot, rounds],
            Vec::new(),
        )?;
        let mem = vm.memory().clone();
        self.run_to_exit(vm, "migration")?;
        let ticks = |i| Self::mailbox(&mem, i).max(1) as f64;
        Ok(MigrateRun {
            alone: pages as f64 * tsc / ticks(2),
            contended: Self::mailbox(&mem, 7) as f64 * tsc / ticks(3),
            wait: mem.context().stats().migration_wait_max_ns as f64 / 1e9,
            slowest: Self::mailbox(&mem, 8) as f64 / tsc,
        })
    }

    /// Swap-out and swap-in throughput next to `pwrite` and `pread`, and
    /// one swap-in fault next to one `pread`; each run does the file I/O
    /// and the guest side by side, and ratios are taken within a run.
    pub(super) fn swap(&mut self, tsc: f64) -> Result<(), VmmError> {
        let (pages, runs) = if self.quick { (4096, 1) } else { (16384, 3) };
        let mut rows = Vec::new();
        for _ in 0..runs {
            let file = file_io(pages, tsc)?;
            rows.push((file, self.swap_run(pages, tsc)?));
        }
        let m = |f: fn(&(FileIo, SwapRun)) -> f64| median_of(&rows, f);
        let mib = (pages * PAGE_SIZE) >> 20;
        let of = |what: String| format!("{what} ({}), reported", over(runs));
        self.record(
            &format!("host pwrite, {mib} MiB of 4 KiB pages to a new file"),
            format!("{:.0} pages/s", m(|(f, _)| f.write)),
            "baseline".into(),
        );
        self.record(
            &format!("SWAP_OUT of {mib} MiB touched, guest-timed"),
            format!("{:.0} pages/s", m(|(_, g)| g.out)),
            of(format!("{:.2}x pwrite", m(|(f, g)| g.out / f.write))),
        );
        self.record(
            "host pread of those pages back (page cache)",
            format!("{:.0} pages/s", m(|(f, _)| f.read)),
            "baseline".into(),
        );
        self.record(
            "swap-in, the guest reads them back (a fault each)",
            format!("{:.0} pages/s", m(|(_, g)| g.back)),
            of(format!("{:.3}x pread", m(|(f, g)| g.back / f.read))),
        );
        self.record(
            "one 4 KiB pread (median)",
            format!("{:.2} us", m(|(f, _)| f.pread) * 1e6),
            "baseline".into(),
        );
        self.record(
            "one swap-in fault as the guest sees it (median)",
            format!("{:.2} us", m(|(_, g)| g.fault) * 1e6),
            of(format!(
                "{:.1}x one pread; a plain exit {:.2} us",
                m(|(f, g)| g.fault / f.pread),
                m(|(_, g)| g.exit) * 1e6
            )),
        );
        Ok(())
    }

    /// MIGRATE throughput next to `pwrite`, and the longest time a vCPU
    /// waited for a page another vCPU was migrating, next to one `pread`.
    pub(super) fn migration(&mut self, tsc: f64) -> Result<(), VmmError> {
        let (pages, hot, rounds, runs) = if self.quick {
            (4096, 256, 32, 1)
        } else {
            (16384, 256, 128, 3)
        };
        let mut rows = Vec::new();
        for _ in 0..runs {
            let file = file_io(pages, tsc)?;
            rows.push((file, self.migrate_run(pages, hot, rounds, tsc)?));
        }
        let m = |f: fn(&(FileIo, MigrateRun)) -> f64| median_of(&rows, f);
        let worst = rows.iter().map(|(_, r)| r.wait).fold(0.0, f64::max);
        let mib = (pages * PAGE_SIZE) >> 20;
        let of = |what: String| format!("{what} ({}), reported", over(runs));
        self.record(
            &format!("MIGRATE of {mib} MiB touched, guest-timed"),
            format!("{:.0} pages/s", m(|(_, r)| r.alone)),
            of(format!("{:.2}x pwrite", m(|(f, r)| r.alone / f.write))),
        );
        self.record(
            &format!("MIGRATE of {hot} pages while vCPU 1 writes to them"),
            format!("{:.0} pages/s", m(|(_, r)| r.contended)),
            of(format!(
                "{:.2}x without vCPU 1",
                m(|(_, r)| r.contended / r.alone)
            )),
        );
        self.record(
            "longest wait of an access for a page under migration",
            format!("{:.1} us", m(|(_, r)| r.wait) * 1e6),
            if worst == 0.0 {
                "no access met a page under migration".into()
            } else {
                let worst = if runs > 1 {
                    format!("; worst {:.1} us", worst * 1e6)
                } else {
                    String::new()
                };
                of(format!(
                    "{:.0}x one pread{worst}",
                    m(|(f, r)| r.wait / f.pread)
                ))
            },
        );
        self.record(
            "  vCPU 1's slowest write meanwhile, as it sees it",
            format!("{:.1} us", m(|(_, r)| r.slowest) * 1e6),
            of("exits and waits included".into()),
        );
        Ok(())
    }
}

/// The median over runs of one figure of each.
fn median_of<T>(runs: &[T], f: fn(&T) -> f64) -> f64 {
    let mut v: Vec<f64> = runs.iter().map(f).collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// How a figure was taken from `runs` runs.
fn over(runs: u32) -> String {
    if runs == 1 {
        "one run".into()
    } else {
        format!("median of {runs} runs")
    }
}
