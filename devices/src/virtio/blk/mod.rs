//! virtio-blk (virtio 1.2, section 5.2) over a disk image.
//!
//! The device thread takes requests off the queue and pins their buffers.
//! A read whose data the page cache holds is served at once
//! (`preadv2(RWF_NOWAIT)` straight into the pinned guest frames); every
//! other request is handed to the I/O threads ([`pool`]) with its pins,
//! which read or write the image, write the status byte, drop the pins
//! and complete the request. So a slow request never holds up the queue. A clone made
//! by fork gets a copy-on-write view of the disk ([`disk`]): its writes
//! never reach the file.

pub mod disk;
pub mod pool;
pub mod request;

use std::any::Any;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR,
};

use self::disk::{Disk, SECTOR};
use self::pool::Pool;
use self::request::{Env, ID_BYTES, MAX_SEGMENTS, MAX_ZERO_SECTORS};
use super::device::{Ctx, DeviceError, VirtioDevice};
use super::queue::{Desc, QueueError};
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

/// How a block device is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// The image file.
    pub path: PathBuf,
    /// Refuse writes (VIRTIO_BLK_F_RO).
    pub read_only: bool,
    /// Serve requests on I/O threads (true) or on the device thread.
    pub threaded: bool,
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
        Ok(Self {
            config,
            disk,
            id,
            pool,
        })
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
    /// the page cache holds (or the device has no I/O threads), on an I/O
    /// thread otherwise; a chain that cannot be served fails with IOERR.
    /// What completed at once is added to `done` (head, bytes written),
    /// for the caller to return in one pass over the used ring.
    fn submit(
        &self,
        ctx: &mut Ctx<'_>,
        q: usize,
        (head, chain): (u16, Result<Vec<Desc>, QueueError>),
        done: &mut Vec<(u16, u32)>,
    ) {
        let threaded = self.pool.is_some();
        let bufs = chain.as_ref().map_err(|e| e.to_string()).and_then(|c| {
            Buffers::pin(ctx.mem, c, threaded, MAX_REQUEST).map_err(|e| e.to_string())
        });
        let bufs = match bufs {
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
        let Some(pool) = &self.pool else {
            return;
        };
        let (disk, id, latency) = (self.disk.clone(), self.id, self.config.latency);
        let transport = ctx.this.clone();
        let generation = ctx.queues[q].generation();
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
            if let Some(t) = transport.upgrade() {
                t.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .complete_async(q, generation, head, len);
            }
        }));
    }
}

/// Whether chains arrive on queue `q` within [`POLL`].
fn poll_available(ctx: &Ctx<'_>, q: usize) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < POLL {
        if ctx.queues[q].has_available().unwrap_or(false) {
            return true;
        }
        std::hint::spin_loop();
    }
    false
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

    fn queue_notify(&mut self, ctx: &mut Ctx<'_>, q: usize) {
        loop {
            ctx.queues[q].disable_notification();
            let mut done = Vec::new();
            for popped in ctx.pop_all(q) {
                self.submit(ctx, q, popped, &mut done);
            }
            ctx.complete_all(q, &done);
            if ctx.is_broken() {
                return;
            }
            if poll_available(ctx, q) {
                continue;
            }
            match ctx.queues[q].enable_notification() {
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => {
                    ctx.fail(format!("queue {q}: {e}"));
                    return;
                }
            }
        }
    }

    fn reset(&mut self, _ctx: &mut Ctx<'_>) {
        // Requests still on the I/O threads complete into their pins; the
        // queues' new generation drops their completions.
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
        for q in 0..ctx.queues.len() {
            let held: Vec<u16> = ctx.queues[q].held.iter().copied().collect();
            let mut done = Vec::new();
            for head in held {
                let chain = ctx.queues[q].chain_of(head);
                self.submit(ctx, q, (head, chain), &mut done);
            }
            ctx.complete_all(q, &done);
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
