//! Live snapshots next to a stop-the-world copy of the same VM, in one run:
//! the guest's pause, the total time, and how fast the guest runs while a
//! live snapshot is written.

use std::fs::File;
use std::time::{Duration, Instant};

use memory::PAGE_SIZE;

use super::Bench;
use crate::snapshot::LiveReport;
use crate::vm::{Exit, Vm, VmmError};

/// The guest mode that touches its pages, then rewrites them for ever.
const REWRITE: u64 = 20;

/// An unlinked file in the temporary directory for an image.
fn scratch_image() -> Result<File, VmmError> {
    memory::open_unlinked(&std::env::temp_dir()).map_err(VmmError::Thread)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Bench {
    /// Pages the guest wrote so far.
    fn written(vm: &Vm) -> u64 {
        Self::mailbox(vm.memory(), 2)
    }

    /// Pages per second the guest writes over `window`, undisturbed.
    fn write_rate(vm: &Vm, window: Duration) -> f64 {
        let (c0, t0) = (Self::written(vm), Instant::now());
        std::thread::sleep(window);
        (Self::written(vm) - c0) as f64 / t0.elapsed().as_secs_f64()
    }

    /// A VM of `bytes` touched memory, rewriting it, snapshotted live and
    /// stopped.
    pub(super) fn snapshots(&mut self, bytes: u64, tsc: f64) -> Result<(), VmmError> {
        let pages = bytes / PAGE_SIZE;
        let mut vm = self.vm(bytes + (64 << 20), REWRITE, pages, tsc)?;
        vm.start()?;
        super::wait_touched(&vm, |vm| Self::mailbox(vm.memory(), 3) == 1)?;
        let measured = self.measure_snapshots(&vm);
        vm.stop(Exit::Code(0));
        let _ = vm.wait();
        let (undisturbed, live, during, stopped) = measured?;
        self.record_snapshots(bytes, undisturbed, &live, during, &stopped);
        Ok(())
    }

    fn measure_snapshots(&self, vm: &Vm) -> Result<(f64, LiveReport, f64, LiveReport), VmmError> {
        let window = Duration::from_millis(if self.quick { 100 } else { 300 });
        let undisturbed = Self::write_rate(vm, window);
        let c0 = Self::written(vm);
        let live = vm.snapshot_live(scratch_image()?, |_, _| {})?;
        let during = (Self::written(vm) - c0) as f64 / live.total.as_secs_f64();
        let stopped = vm.snapshot_stopped(scratch_image()?, |_, _| {})?;
        Ok((undisturbed, live, during, stopped))
    }

    fn record_snapshots(
        &mut self,
        bytes: u64,
        undisturbed: f64,
        live: &LiveReport,
        during: f64,
        stopped: &LiveReport,
    ) {
        let mib = bytes >> 20;
        self.record(
            &format!("stop-the-world snapshot, {mib} MiB touched: pause"),
            format!("{:.1} ms", ms(stopped.pause)),
            "baseline".into(),
        );
        let save = ms(live.vcpu_save);
        self.record(
            &format!("live snapshot, {mib} MiB touched: guest pause"),
            format!("{:.2} ms", ms(live.pause)),
            super::goal(
                live.pause <= live.vcpu_save * 2,
                &format!(
                    "{:.3}x stop-the-world; vCPU state save {save:.2} ms, goal pause <= 2x that",
                    ms(live.pause) / ms(stopped.pause)
                ),
            ),
        );
        self.record(
            &format!("  live snapshot arming, {mib} MiB, guest running"),
            format!("{:.1} ms", ms(live.arm)),
            format!(
                "before the pause; the pause then looked at {} pages",
                live.memory.paused_visits
            ),
        );
        self.record(
            &format!("  live snapshot total, {mib} MiB"),
            format!("{:.1} ms", ms(live.total)),
            format!(
                "{:.2}x stop-the-world; {} pages copied before a write",
                ms(live.total) / ms(stopped.total),
                live.memory.before_write
            ),
        );
        self.record(
            &format!("  guest speed during the live snapshot, {mib} MiB"),
            format!("{:.2}%", 100.0 * during / undisturbed.max(1.0)),
            format!("of undisturbed ({:.0}k pages written/s)", undisturbed / 1e3),
        );
    }
}
