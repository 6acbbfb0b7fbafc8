//! virtio-blk (virtio 1.2, section 5.2) over a disk image.
//!
//! The device thread takes every available request off the queue at once
//! and pins their buffers: each buffer that lies in one page through pins
//! of whole pages the device keeps across requests ([`PinCache`]), since
//! drivers reuse their headers, status bytes and data pages. A read whose
//! data the page cache holds is served at once, `preadv2(RWF_NOWAIT)`
//! straight into the pinned guest frames. The other reads go to an io_uring
//! ([`uring`]), submitted once per batch; they complete later and wake the
//! device thread through an eventfd, so any number of them can wait for the
//! disk without a thread each. Every other request (writes, which first
//! preserve what a fork's clone must keep seeing, flushes, discards, a
//! clone's reads of its overlay) goes with its pins to the I/O threads
//! ([`pool`]), which serve it, write the status byte, drop the pins and
//! complete it. What completed during a pass over the queue goes back in
//! one pass over the used ring, with at most one interrupt. So a slow
//! request never holds up the queue.
//!
//! Where the kernel refuses io_uring, the reads the page cache misses go
//! to the I/O threads too. A clone made by fork gets a copy-on-write view
//! of the disk ([`disk`]): its writes never reach the file.

pub mod disk;
pub mod pool;
pub mod request;
pub mod uring;

use std::any::Any;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR,
};

use self::disk::{Disk, SECTOR};
use self::pool::{Completion, Handoff, Pool};
use self::request::{Env, ID_BYTES, MAX_SEGMENTS, MAX_ZERO_SECTORS};
use self::uring::Uring;
use super::buffers::PinCache;
use super::device::{Ctx, DeviceError, VirtioDevice};
use super::queue::{Desc, Popped};
use super::worker::HOST_TOKEN_BASE;
use super::{Buffers, id};

/// Entries of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes one request may move.
pub const MAX_REQUEST: u64 = 4 << 20;
/// I/O threads per device.
const IO_THREADS: usize = 2;
/// How long the device thread keeps looking at the available ring after
/// a batch before it asks for notifications again: a driver that submits
/// again at once (a deep queue) then needs no notification, which costs an
/// exit of tens of microseconds on this kind of host.
const POLL: Duration = Duration::from_micros(25);
/// The poller token of the io_uring's completion eventfd.
const URING_TOKEN: u64 = HOST_TOKEN_BASE;
/// The poller token of the I/O threads' completion eventfd.
const POOL_TOKEN: u64 = HOST_TOKEN_BASE + 1;

/// How a block device is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// The image file.
    pub path: PathBuf,
    /// Refuse writes (VIRTIO_BLK_F_RO).
    pub read_only: bool,
    /// Serve requests asynchronously (true) or on the device thread.
    pub threaded: bool,
    /// Send the reads the page cache misses to an io_uring where the
    /// kernel allows it (with `threaded`); false sends them to the I/O
    /// threads, as where it does not.
    pub io_uring: bool,
    /// Added before every request of this device (not of its clones'):
    /// a slow disk, for tests and benchmarks of requests in flight.
    pub latency: Option<Duration>,
}

impl BlockConfig {
    /// A writable, threaded device over `path`.
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            read_only: false,
            threaded: true,
            io_uring: true,
            latency: None,
        }
    }
}

/// A virtio-blk device.
#[derive(Debug)]
pub struct Block {
    config: BlockConfig,
    disk: Arc<Disk>,
    id: [u8; ID_BYTES],
    pool: Option<Pool>,
    uring: Option<Uring>,
    /// Whether the completion eventfds are in the device thread's poller.
    polled: bool,
    /// Requests completed during the current pass, for one used-ring update.
    done: Vec<(u16, u32)>,
    /// Page pins kept across requests.
    pins: PinCache,
    /// How the I/O threads hand requests back.
    handoff: Arc<Handoff>,
    /// Completions taken from the handoff (kept for their allocation).
    finished: Vec<Completion>,
}

impl Block {
    /// Opens the image.
    pub fn new(config: BlockConfig) -> Result<Self, DeviceError> {
        let disk = Disk::open(&config.path, config.read_only)?;
        Self::with_disk(config, Arc::new(disk))
    }

    fn with_disk(config: BlockConfig, disk: Arc<Disk>) -> Result<Self, DeviceError> {
        let mut id = [0u8; ID_BYTES];
        let name = config
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = name.len().min(ID_BYTES);
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        let pool = match config.threaded {
            true => Some(Pool::new(IO_THREADS, "virtio-blk")?),
            false => None,
        };
        let uring = match config.threaded && config.io_uring {
            true => Uring::new()
                .map_err(|e| log::info!("virtio-blk: no io_uring ({e}): reads use the I/O threads"))
                .ok(),
            false => None,
        };
        Ok(Self {
            config,
            disk,
            id,
            pool,
            uring,
            polled: false,
            done: Vec::new(),
            pins: PinCache::default(),
            handoff: Arc::new(Handoff::new()?),
            finished: Vec::new(),
        })
    }

    /// Serves the requests `popped` off queue `q`, or hands them on; what
    /// completed meanwhile goes back in one pass over the used ring.
    fn pass(&mut self, ctx: &mut Ctx<'_>, q: usize, popped: Vec<Popped>) {
        let mut done = std::mem::take(&mut self.done);
        for p in popped {
            self.submit(ctx, q, p, &mut done);
        }
        if let Some(u) = &mut self.uring {
            u.submit();
        }
        self.reap(ctx, q, &mut done);
        self.take_finished(ctx, q, &mut done);
        ctx.complete_all(q, &done);
        done.clear();
        self.done = done;
    }

    /// Whether reads go through io_uring.
    pub fn uses_io_uring(&self) -> bool {
        self.uring.is_some()
    }

    /// Puts the completion eventfds (the io_uring's, the I/O threads')
    /// into the device thread's poller (once).
    fn watch(&mut self, ctx: &Ctx<'_>) {
        if self.polled {
            return;
        }
        let uring = self.uring.as_ref().map(|u| (u.event_fd(), URING_TOKEN));
        let pool = Some((self.handoff.event_fd(), POOL_TOKEN));
        for (fd, token) in uring.into_iter().chain(pool) {
            if let Err(e) = ctx.poller.add(fd, vmm_sys_util::epoll::EventSet::IN, token) {
                log::error!("virtio-blk: cannot wait for completions: {e}");
                return;
            }
        }
        self.polled = true;
    }

    /// Takes what the I/O threads finished: those of queue `q`'s current
    /// generation join `done`.
    fn take_finished(&mut self, ctx: &Ctx<'_>, q: usize, done: &mut Vec<(u16, u32)>) {
        self.handoff.take(&mut self.finished);
        for c in self.finished.drain(..) {
            let current = ctx
                .queues
                .get(c.q)
                .is_some_and(|queue| queue.is_active() && queue.generation() == c.generation);
            if c.q == q && current {
                done.push((c.head, c.len));
            }
        }
    }

    /// Ends the reads the io_uring completed: each gets its status byte
    /// and drops its pins; those of the queue's current generation join
    /// `done` (the device has one queue: every read is of queue `q`).
    fn reap(&mut self, ctx: &Ctx<'_>, q: usize, done: &mut Vec<(u16, u32)>) {
        let Some(u) = &mut self.uring else {
            return;
        };
        let disk = &self.disk;
        u.reap(|r, result| {
            let ok = match u64::try_from(result) {
                Ok(n) if n == r.len => true,
                Ok(_) => {
                    // A short read (the kernel's choice): read it all again.
                    r.bufs
                        .writable_slices(0, r.len)
                        .is_ok_and(|s| disk.read(r.off, &s).is_ok())
                }
                Err(_) => {
                    log::warn!("virtio-blk: {}", std::io::Error::from_raw_os_error(-result));
                    false
                }
            };
            let len = request::end_read(&r.bufs, r.len, ok);
            drop(r.bufs);
            let current = ctx
                .queues
                .get(r.q)
                .is_some_and(|queue| queue.is_active() && queue.generation() == r.generation);
            if r.q == q && current {
                done.push((r.head, len));
            }
        });
    }

    /// Returns to the driver what the io_uring and the I/O threads
    /// finished, in one used-ring update per queue.
    fn deliver(&mut self, ctx: &mut Ctx<'_>) {
        let mut done = std::mem::take(&mut self.done);
        for q in 0..ctx.queues.len() {
            self.reap(ctx, q, &mut done);
            if let Some(u) = &mut self.uring {
                // Entries a full completion queue held back.
                u.submit();
            }
            self.take_finished(ctx, q, &mut done);
            ctx.complete_all(q, &done);
            done.clear();
        }
        self.done = done;
    }

    /// This VM's view of the disk.
    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }

    fn config_space(&self) -> [u8; 64] {
        let mut c = [0u8; 64];
        c[0..8].copy_from_slice(&self.disk.sectors().to_le_bytes());
        // seg_max: data descriptors besides the header and the status.
        c[12..16].copy_from_slice(&(u32::from(QUEUE_SIZE) - 2).to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        c[34..36].copy_from_slice(&1u16.to_le_bytes());
        for at in [36, 48] {
            c[at..at + 4].copy_from_slice(&MAX_ZERO_SECTORS.to_le_bytes());
            c[at + 4..at + 8].copy_from_slice(&MAX_SEGMENTS.to_le_bytes());
        }
        c[44..48].copy_from_slice(&1u32.to_le_bytes());
        c[56] = 1; // write_zeroes_may_unmap
        c
    }

    /// Pins one request's buffers and serves it: at once if it is a read
    /// the page cache holds (or the device has no I/O threads), through
    /// the io_uring (submitted with the batch) if it is another read, on
    /// an I/O thread otherwise; a chain that cannot be served fails with
    /// IOERR.
    /// What completed at once is added to `done` (head, bytes written),
    /// for the caller to return in one pass over the used ring.
    fn submit(
        &mut self,
        ctx: &mut Ctx<'_>,
        q: usize,
        (head, chain): Popped,
        done: &mut Vec<(u16, u32)>,
    ) {
        let threaded = self.pool.is_some();
        let bufs = chain.as_ref().map_err(|e| e.to_string()).and_then(|c| {
            Buffers::pin_with(ctx.mem, c, threaded, MAX_REQUEST, Some(&mut self.pins))
                .map_err(|e| e.to_string())
        });
        let mut bufs = match bufs {
            Ok(b) => b,
            Err(why) => {
                log::debug!("virtio-blk: bad request: {why}");
                done.push((head, chain.map_or(0, |c| fail_status(ctx, &c))));
                return;
            }
        };
        let features = ctx.features;
        let env = Env {
            disk: &self.disk,
            id: &self.id,
            features,
        };
        let now = match &self.pool {
            None => Some(request::serve(env, &bufs)),
            Some(_) if self.config.latency.is_none() => request::serve_cached(env, &bufs),
            Some(_) => None,
        };
        if let Some(len) = now {
            drop(bufs);
            done.push((head, len));
            return;
        }
        if let (Some(u), Some(fd)) = (&mut self.uring, self.disk.direct_fd()) {
            if let Some((off, len)) = request::read_of(env, &bufs) {
                let read = uring::Read {
                    q,
                    generation: ctx.queues[q].generation(),
                    head,
                    bufs,
                    off,
                    len,
                };
                match u.push(fd, read, self.config.latency) {
                    Ok(()) => return,
                    // The ring is failing: the I/O threads read it.
                    Err(read) => bufs = read.bufs,
                }
            }
        }
        let Some(pool) = &self.pool else {
            return;
        };
        let (disk, id, latency) = (self.disk.clone(), self.id, self.config.latency);
        let generation = ctx.queues[q].generation();
        let ticket = self.handoff.enter();
        pool.submit(Box::new(move || {
            if let Some(l) = latency {
                std::thread::sleep(l);
            }
            let env = Env {
                disk: &disk,
                id: &id,
                features,
            };
            let len = request::serve(env, &bufs);
            drop(bufs);
            ticket.finish(Completion {
                q,
                generation,
                head,
                len,
            });
        }));
    }
}

/// Whether chains arrive on queue `q` within [`POLL`] (the clock is read
/// every few looks: a look is much cheaper).
fn poll_available(ctx: &Ctx<'_>, q: usize) -> bool {
    let start = std::time::Instant::now();
    loop {
        for _ in 0..16 {
            if ctx.queues[q].has_available().unwrap_or(false) {
                return true;
            }
            std::hint::spin_loop();
        }
        if start.elapsed() >= POLL {
            return false;
        }
    }
}

/// Writes IOERR into the last byte of a chain whose buffers cannot all be
/// pinned, if that byte is device-writable RAM; the bytes written. A last
/// buffer that runs past the end of the address space has no last byte.
fn fail_status(ctx: &Ctx<'_>, chain: &[Desc]) -> u32 {
    let Some(last) = chain.last().filter(|d| d.write && d.len > 0) else {
        return 0;
    };
    let Some(addr) = last.addr.checked_add(u64::from(last.len) - 1) else {
        return 0;
    };
    let status = Desc {
        addr,
        len: 1,
        write: true,
        indirect: false,
    };
    match Buffers::pin(ctx.mem, &[status], false, 1) {
        Ok(b) if b.write(0, &[VIRTIO_BLK_S_IOERR as u8]).is_ok() => 1,
        _ => 0,
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        id::BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f =
            1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_BLK_SIZE;
        if self.disk.read_only() {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f | super::features::RING_EVENT_IDX
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_space(), offset, data);
    }

    fn activate(&mut self, ctx: &mut Ctx<'_>) -> Result<(), DeviceError> {
        self.watch(ctx);
        Ok(())
    }

    fn queue_notify(&mut self, ctx: &mut Ctx<'_>, q: usize) {
        loop {
            ctx.queues[q].disable_notification();
            let popped = ctx.pop_all(q);
            self.pass(ctx, q, popped);
            if ctx.is_broken() {
                break;
            }
            if poll_available(ctx, q) {
                continue;
            }
            match ctx.queues[q].enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    ctx.fail(format!("queue {q}: {e}"));
                    break;
                }
            }
        }
    }

    fn host_event(&mut self, ctx: &mut Ctx<'_>, token: u64, _events: u32) {
        match token {
            URING_TOKEN => {
                if let Some(u) = &self.uring {
                    u.clear_event();
                }
            }
            POOL_TOKEN => {}
            _ => return,
        }
        self.deliver(ctx);
    }

    fn reset(&mut self, _ctx: &mut Ctx<'_>) {
        // Requests still on the I/O threads or in the io_uring complete
        // into their pins; the queues' new generation drops their
        // completions.
        self.pins.clear();
    }

    fn drop_cached_pins(&mut self) {
        self.pins.clear();
    }

    fn quiesce(&mut self, ctx: &mut Ctx<'_>) {
        while let Some(u) = self.uring.as_mut().filter(|u| u.in_flight() > 0) {
            if let Err(e) = u.wait() {
                log::error!("virtio-blk: cannot wait for io_uring reads: {e}");
                break;
            }
            self.deliver(ctx);
        }
        self.handoff.wait_idle();
        self.deliver(ctx);
    }

    fn rewind(&mut self) -> Result<(), DeviceError> {
        if !self.disk.is_overlay() {
            return Err(DeviceError::Unsupported(
                "it writes its image file directly".into(),
            ));
        }
        self.disk.reset();
        self.pins.clear();
        Ok(())
    }

    fn fork(&self) -> Result<Box<dyn VirtioDevice>, DeviceError> {
        let config = BlockConfig {
            latency: None,
            ..self.config.clone()
        };
        Ok(Box::new(Self::with_disk(
            config,
            Arc::new(self.disk.fork()),
        )?))
    }

    fn resume(&mut self, ctx: &mut Ctx<'_>) {
        self.watch(ctx);
        for q in 0..ctx.queues.len() {
            let held: Vec<u16> = ctx.queues[q].held.iter().copied().collect();
            let popped = held
                .into_iter()
                .map(|head| (head, ctx.queues[q].chain_of(head)))
                .collect();
            self.pass(ctx, q, popped);
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;
    use crate::virtio::testutil::{Driver, Rings, memory};

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    /// Sector s of the image `name` holds bytes s ^ i.
    fn image(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("vmm-blk-{name}-{}.img", std::process::id()));
        let bytes: Vec<u8> = (0..1u64 << 20)
            .map(|o| ((o / SECTOR) as u8) ^ (o as u8))
            .collect();
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn uncache(p: &std::path::Path) {
        let f = std::fs::File::open(p).unwrap();
        f.sync_all().unwrap();
        // SAFETY: posix_fadvise on a descriptor we own; no memory involved.
        let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(r, 0);
    }

    /// Makes request k (descriptors 3k..3k+2, its buffers in page k + 1)
    /// a read of 4 KiB at `sector`, available as entry k.
    fn read_request(d: &Driver, r: Rings, k: u16, sector: u64) {
        let base = 0x1000 * (u64::from(k) + 1);
        let mut hdr = [0u8; 16];
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        d.mem.write(base, &hdr).unwrap();
        d.mem.write(base + 0x10, &[0xff]).unwrap();
        let first = 3 * k;
        d.desc(r, first, base, 16, F_NEXT, first + 1);
        d.desc(
            r,
            first + 1,
            0x20000 + 0x1000 * u64::from(k),
            4096,
            F_NEXT | F_WRITE,
            first + 2,
        );
        d.desc(r, first + 2, base + 0x10, 1, F_WRITE, 0);
        d.publish(r, k, first);
    }

    /// When `quiesce` returns, every request in flight has written its
    /// buffers and its status byte, whether it waited on an I/O thread or
    /// in the io_uring (both slowed down here), so guest memory can be
    /// reset under a locked transport.
    #[test]
    fn quiesce_waits_for_the_requests_in_flight() {
        let path = image("quiesce");
        for io_uring in [true, false] {
            let config = BlockConfig {
                latency: Some(Duration::from_millis(100)),
                io_uring,
                ..BlockConfig::new(path.clone())
            };
            let d = Driver::new(Box::new(Block::new(config).unwrap()), &memory());
            d.standard(1, 16);
            let r = Rings::standard(0, 16);
            let sectors = [8u64, 16, 24];
            for (k, s) in sectors.iter().enumerate() {
                read_request(&d, r, k as u16, *s);
            }
            d.notify(0);
            let status = |k: usize| {
                let mut b = [0u8];
                d.mem.read(0x1000 * (k as u64 + 1) + 0x10, &mut b).unwrap();
                b[0]
            };
            let mut t = d.lock();
            assert!(
                (0..3).any(|k| status(k) == 0xff),
                "the requests were meant to be in flight (io_uring: {io_uring})"
            );
            t.quiesce();
            for (k, s) in sectors.iter().enumerate() {
                assert_eq!(status(k), 0, "request {k} (io_uring: {io_uring})");
                let mut data = vec![0u8; 4096];
                d.mem.read(0x20000 + 0x1000 * k as u64, &mut data).unwrap();
                assert!(
                    data.iter()
                        .enumerate()
                        .all(|(i, &b)| b == ((s + i as u64 / SECTOR) as u8) ^ (i as u8)),
                    "request {k} (io_uring: {io_uring})"
                );
            }
        }
        let _ = std::fs::remove_file(&path);
    }

    /// Reads the image misses in the page cache go to the io_uring and
    /// complete through its eventfd, each into its own buffers; a cached
    /// read completes at once.
    #[test]
    fn reads_the_cache_misses_complete_through_the_io_uring() {
        let path = image("uring");
        let block = Block::new(BlockConfig::new(path.clone())).unwrap();
        if !block.uses_io_uring() {
            eprintln!("io_uring is refused here: nothing to test");
            let _ = std::fs::remove_file(&path);
            return;
        }
        let d = Driver::new(Box::new(block), &memory());
        d.standard(1, 16);
        let r = Rings::standard(0, 16);
        uncache(&path);
        let sectors = [8u64, 800, 1600];
        for (k, s) in sectors.iter().enumerate() {
            read_request(&d, r, k as u16, *s);
        }
        d.notify(0);
        let (fd, in_flight) = {
            let t = d.lock();
            let b = t.device().as_any().downcast_ref::<Block>().unwrap();
            let u = b.uring.as_ref().unwrap();
            (u.event_fd(), u.in_flight())
        };
        if in_flight == 0 {
            eprintln!("the page cache kept the image: no read went to the io_uring");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while d.used_idx(r) < sectors.len() as u16 {
            assert!(
                std::time::Instant::now() < deadline,
                "reads never completed"
            );
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll on one pollfd we own.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            d.lock().host_event(URING_TOKEN, libc::EPOLLIN as u32);
        }
        for (k, s) in sectors.iter().enumerate() {
            let mut data = vec![0u8; 4096];
            d.mem.read(0x20000 + 0x1000 * k as u64, &mut data).unwrap();
            let want: Vec<u8> = (0..4096u64)
                .map(|i| ((s + i / SECTOR) as u8) ^ (i as u8))
                .collect();
            assert!(data == want, "request {k} read the wrong bytes");
            let mut status = [0xffu8];
            d.mem
                .read(0x1000 * (k as u64 + 1) + 0x10, &mut status)
                .unwrap();
            assert_eq!(status[0], 0, "request {k}");
        }
        // The same sectors again: cached now, served during the notification.
        read_request(&d, r, 3, 8);
        d.notify(0);
        assert_eq!(d.used_idx(r), 4);
        drop(d);
        let _ = std::fs::remove_file(&path);
    }

    /// CPU time of this thread.
    fn cpu() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec, which `ts` is.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    /// The device thread's CPU time per random 4 KiB read of a cached
    /// image, in passes of 32 requests, with no VM around it: what a
    /// request costs the device, free of the scheduling that moves the
    /// benchmark's figures. `cargo test --release -p devices -- --ignored
    /// --nocapture device_cost`.
    #[test]
    #[ignore]
    fn device_cost_per_cached_read() {
        let path = std::env::temp_dir().join(format!("vmm-blk-mb-{}.img", std::process::id()));
        let bytes: Vec<u8> = (0..64u64 << 20).map(|o| o as u8).collect();
        std::fs::write(&path, bytes).unwrap();
        let _ = std::fs::read(&path).unwrap();
        let block = Block::new(BlockConfig::new(path.clone())).unwrap();
        let d = Driver::new(Box::new(block), &memory());
        d.standard(1, 128);
        let r = Rings::standard(0, 128);
        for k in 0..32u16 {
            let hdr = 0x1000 + 32 * u64::from(k);
            let first = 3 * k;
            let data = 0x20000 + 0x1000 * u64::from(k);
            d.desc(r, first, hdr, 16, F_NEXT, first + 1);
            d.desc(r, first + 1, data, 4096, F_NEXT | F_WRITE, first + 2);
            d.desc(r, first + 2, hdr + 16, 1, F_WRITE, 0);
        }
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut avail = 0u16;
        let rounds = 20_000u64;
        let mut total = Duration::ZERO;
        for _ in 0..rounds {
            for k in 0..32u16 {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                let sector = (x.wrapping_mul(0x2545_f491_4f6c_dd1d) % 16384) * 8;
                let mut h = [0u8; 16];
                h[8..].copy_from_slice(&sector.to_le_bytes());
                d.mem.write(0x1000 + 32 * u64::from(k), &h).unwrap();
                d.publish(r, avail, 3 * k);
                avail = avail.wrapping_add(1);
            }
            let t = cpu();
            d.lock().with_device(|dev, ctx| {
                let b = dev.as_any_mut().downcast_mut::<Block>().unwrap();
                let popped = ctx.pop_all(0);
                b.pass(ctx, 0, popped);
            });
            total += cpu() - t;
        }
        assert_eq!(d.used_idx(r), avail);
        eprintln!(
            "device CPU time per cached read: {:.0} ns",
            total.as_nanos() as f64 / (rounds * 32) as f64
        );
        let _ = std::fs::remove_file(&path);
    }
}
