//! virtio-vsock (virtio 1.2, section 5.10) whose host side is a Unix
//! socket, Firecracker's convention:
//!
//! - a host process connects to the Unix socket `uds` and writes
//!   `CONNECT <port>\n`; the device asks the guest (REQUEST) and, once the
//!   guest accepts, answers `OK <host port>\n`; bytes then flow both ways;
//! - a guest connection to host port `P` connects to the Unix socket
//!   `uds_P`.
//!
//! Queue 0 carries packets to the guest, queue 1 from it; the event queue
//! (2) is never used. Guest payloads go from the pinned guest buffers to
//! the host socket with `writev`; host data is read straight into a pinned
//! receive buffer with `readv`, within the credit the guest announced.
//! A fork's clone gets the device without a host side: its connections
//! are gone (the peer is one process, which talks to the parent).

mod conn;
pub mod packet;

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::EventSet;

use self::conn::{Conn, State};
use self::packet::{HDR_LEN, HOST_CID, Header, TYPE_STREAM, op, shutdown};
use super::device::{Ctx, DeviceError, VirtioDevice};
use super::queue::{Chain, QueueError};
use super::worker::HOST_TOKEN_BASE;
use super::{Buffers, id, read_config_bytes};

/// Entries per queue.
pub const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const LISTENER: u64 = HOST_TOKEN_BASE;
/// Most payload bytes in one packet to the guest.
const MAX_PAYLOAD: u64 = 64 << 10;
/// Most connections (and host sockets waiting for their CONNECT line).
const MAX_CONNS: usize = 1024;
/// Host ports given to host-initiated connections start here.
const FIRST_HOST_PORT: u32 = 1 << 30;
/// Longest `CONNECT <port>\n` line.
const MAX_LINE: usize = 32;

type Key = (u32, u32);

/// A virtio-vsock device.
#[derive(Debug)]
pub struct Vsock {
    cid: u64,
    /// The host side: None for a fork's clone.
    uds: Option<PathBuf>,
    listener: Option<UnixListener>,
    /// Host sockets accepted, their CONNECT line not read yet.
    waiting: HashMap<u64, UnixStream>,
    conns: HashMap<Key, Conn>,
    tokens: HashMap<u64, Key>,
    /// Connections whose host socket has data (or EOF) for the guest.
    ready: VecDeque<Key>,
    /// Packets without payload for the guest.
    control: VecDeque<Header>,
    next_token: u64,
    next_port: u32,
}

impl Vsock {
    /// A device for guest context `cid`, listening on the Unix socket
    /// `uds` (a stale socket file there is replaced).
    pub fn new(cid: u64, uds: PathBuf) -> Result<Self, DeviceError> {
        if std::fs::symlink_metadata(&uds).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_socket()
        }) {
            std::fs::remove_file(&uds)?;
        }
        let listener = UnixListener::bind(&uds)?;
        listener.set_nonblocking(true)?;
        let mut v = Self::unplugged(cid);
        v.uds = Some(uds);
        v.listener = Some(listener);
        Ok(v)
    }

    /// A device without a host side: guest connections are refused (a
    /// fork's clone, tests).
    pub fn unplugged(cid: u64) -> Self {
        Self {
            cid,
            uds: None,
            listener: None,
            waiting: HashMap::new(),
            conns: HashMap::new(),
            tokens: HashMap::new(),
            ready: VecDeque::new(),
            control: VecDeque::new(),
            next_token: LISTENER + 1,
            next_port: FIRST_HOST_PORT,
        }
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    fn watch(ctx: &Ctx<'_>, fd: i32, events: EventSet, token: u64) {
        let r = ctx
            .poller
            .modify(fd, events, token)
            .or_else(|_| ctx.poller.add(fd, events, token));
        if let Err(e) = r {
            log::warn!("virtio-vsock: cannot poll a host socket: {e}");
        }
    }

    /// What a connection waits for on its host socket.
    fn arm(&self, ctx: &Ctx<'_>, key: Key) {
        let Some(c) = self.conns.get(&key) else {
            return;
        };
        let mut ev = EventSet::empty();
        // Without credit the guest cannot take data: wait for its update.
        if c.state == State::Established && c.credit() > 0 && !self.ready.contains(&key) {
            ev |= EventSet::IN;
        }
        if !c.pending_out.is_empty() {
            ev |= EventSet::OUT;
        }
        if ev.is_empty() {
            // A hung-up socket reports HUP even when nothing is asked.
            ctx.poller.remove(c.stream.as_raw_fd());
        } else {
            Self::watch(ctx, c.stream.as_raw_fd(), ev, c.token);
        }
    }

    fn add_conn(&mut self, ctx: &Ctx<'_>, c: Conn) {
        let key = (c.local_port, c.peer_port);
        self.tokens.insert(c.token, key);
        self.conns.insert(key, c);
        self.arm(ctx, key);
    }

    fn drop_conn(&mut self, ctx: &Ctx<'_>, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            ctx.poller.remove(c.stream.as_raw_fd());
            self.tokens.remove(&c.token);
        }
        self.ready.retain(|k| *k != key);
    }

    /// A reply to a guest packet that names no connection (or a refused
    /// one).
    fn reset_reply(&self, h: &Header) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            kind: TYPE_STREAM,
            op: op::RST,
            ..Header::default()
        }
    }

    fn send_control(&mut self, key: Key, op: u16, flags: u32) {
        if let Some(c) = self.conns.get_mut(&key) {
            let h = c.header(self.cid, op, 0, flags);
            self.control.push_back(h);
        }
    }

    // ---- the host side ---------------------------------------------------

    fn accept(&mut self, ctx: &Ctx<'_>) {
        while let Some(Ok((s, _))) = self.listener.as_ref().map(UnixListener::accept) {
            if self.waiting.len() + self.conns.len() >= MAX_CONNS
                || s.set_nonblocking(true).is_err()
            {
                continue;
            }
            let token = self.token();
            Self::watch(ctx, s.as_raw_fd(), EventSet::IN, token);
            self.waiting.insert(token, s);
        }
    }

    /// Reads a waiting socket's `CONNECT <port>\n` (only up to the newline:
    /// what follows is the connection's data).
    fn connect_line(&mut self, ctx: &Ctx<'_>, token: u64) {
        let Some(s) = self.waiting.get(&token) else {
            return;
        };
        let mut peek = [0u8; MAX_LINE];
        // SAFETY: recv into `peek`, at most its length, without consuming.
        let n = unsafe {
            libc::recv(
                s.as_raw_fd(),
                peek.as_mut_ptr().cast(),
                peek.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        let n = match n {
            n if n > 0 => n as usize,
            _ if n == 0
                || std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock =>
            {
                return self.drop_waiting(ctx, token);
            }
            _ => return,
        };
        let Some(end) = peek[..n].iter().position(|b| *b == b'\n') else {
            if n == MAX_LINE {
                self.drop_waiting(ctx, token);
            }
            return;
        };
        let mut line = vec![0u8; end + 1];
        let Some(mut s) = self.waiting.remove(&token) else {
            return;
        };
        let port = s
            .read_exact(&mut line)
            .ok()
            .and_then(|()| std::str::from_utf8(&line[..end]).ok().map(str::to_owned))
            .and_then(|l| l.strip_prefix("CONNECT ").map(|p| p.trim().parse::<u32>()))
            .and_then(Result::ok);
        let Some(port) = port else {
            ctx.poller.remove(s.as_raw_fd());
            return;
        };
        let local = self.next_port;
        self.next_port = self.next_port.wrapping_add(1).max(FIRST_HOST_PORT);
        let c = Conn::new(s, local, port, State::Connecting, token);
        self.add_conn(ctx, c);
        self.send_control((local, port), op::REQUEST, 0);
    }

    fn drop_waiting(&mut self, ctx: &Ctx<'_>, token: u64) {
        if let Some(s) = self.waiting.remove(&token) {
            ctx.poller.remove(s.as_raw_fd());
        }
    }

    fn conn_event(&mut self, ctx: &Ctx<'_>, key: Key, events: u32) {
        let out = events & EventSet::OUT.bits() != 0;
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if out && c.flush().is_err() {
            self.send_control(key, op::RST, 0);
            return self.drop_conn(ctx, key);
        }
        if events & !EventSet::OUT.bits() != 0 && !self.ready.contains(&key) {
            self.ready.push_back(key);
        }
        self.arm(ctx, key);
    }

    // ---- packets from the guest -----------------------------------------

    fn transmit(&mut self, ctx: &mut Ctx<'_>) {
        for (head, chain) in ctx.pop_all(TX) {
            if let Err(e) = self.packet(ctx, chain) {
                log::debug!("virtio-vsock: bad packet: {e}");
            }
            ctx.complete(TX, head, 0);
        }
        ctx.notify_used(TX);
    }

    fn packet(
        &mut self,
        ctx: &Ctx<'_>,
        chain: Result<Chain, QueueError>,
    ) -> Result<(), QueueError> {
        let bufs = Buffers::pin(ctx.mem, &chain?, false, HDR_LEN + MAX_PAYLOAD)?;
        let mut raw = [0u8; HDR_LEN as usize];
        bufs.read(0, &mut raw)?;
        let h = Header::parse(&raw);
        if h.src_cid != self.cid || h.dst_cid != HOST_CID {
            return Ok(());
        }
        if h.kind != TYPE_STREAM {
            self.control.push_back(self.reset_reply(&h));
            return Ok(());
        }
        let key = (h.dst_port, h.src_port);
        if h.op == op::REQUEST {
            self.guest_connect(ctx, &h);
            return Ok(());
        }
        let Some(c) = self.conns.get_mut(&key) else {
            if h.op != op::RST {
                self.control.push_back(self.reset_reply(&h));
            }
            return Ok(());
        };
        c.update_credit(&h);
        self.arm(ctx, key);
        let Some(c) = self.conns.get_mut(&key) else {
            return Ok(());
        };
        match h.op {
            op::RESPONSE if c.state == State::Connecting => {
                c.state = State::Established;
                let ok = format!("OK {}\n", c.local_port);
                let s = std::io::IoSlice::new(ok.as_bytes());
                let _ = std::io::Write::write_vectored(&mut c.stream, &[s]);
                self.arm(ctx, key);
            }
            op::RW if c.state == State::Established => {
                let len = u64::from(h.len).min(bufs.readable_len() - HDR_LEN);
                let slices = bufs.readable_slices(HDR_LEN, len)?;
                if c.write_from(&slices).is_err() {
                    self.send_control(key, op::RST, 0);
                    self.drop_conn(ctx, key);
                    return Ok(());
                }
                if c.owes_credit_update() {
                    self.send_control(key, op::CREDIT_UPDATE, 0);
                }
                self.arm(ctx, key);
            }
            op::CREDIT_REQUEST => self.send_control(key, op::CREDIT_UPDATE, 0),
            op::CREDIT_UPDATE => {
                if !self.ready.contains(&key) {
                    self.ready.push_back(key);
                }
            }
            op::SHUTDOWN
                if h.flags & (shutdown::RCV | shutdown::SEND) != shutdown::RCV | shutdown::SEND
                    && c.state == State::Established =>
            {
                if h.flags & shutdown::SEND != 0 {
                    let _ = c.stream.shutdown(std::net::Shutdown::Write);
                }
            }
            op::RST => self.drop_conn(ctx, key),
            _ => {
                self.send_control(key, op::RST, 0);
                self.drop_conn(ctx, key);
            }
        }
        Ok(())
    }

    /// The guest connects to host port `h.dst_port`: the Unix socket
    /// `uds_<port>`.
    fn guest_connect(&mut self, ctx: &Ctx<'_>, h: &Header) {
        let key = (h.dst_port, h.src_port);
        let stream = self
            .uds
            .as_deref()
            .filter(|_| self.conns.len() < MAX_CONNS && !self.conns.contains_key(&key))
            .map(|uds| host_path(uds, h.dst_port))
            .and_then(|p| UnixStream::connect(p).ok())
            .filter(|s| s.set_nonblocking(true).is_ok());
        let Some(stream) = stream else {
            self.control.push_back(self.reset_reply(h));
            return;
        };
        let token = self.token();
        let mut c = Conn::new(stream, h.dst_port, h.src_port, State::Established, token);
        c.update_credit(h);
        self.add_conn(ctx, c);
        self.send_control(key, op::RESPONSE, 0);
    }

    // ---- packets to the guest -------------------------------------------

    /// Fills receive buffers with control packets, then host data, while
    /// there are buffers.
    fn deliver(&mut self, ctx: &mut Ctx<'_>) {
        let mut any = false;
        while !ctx.is_broken() && ctx.queues[RX].has_available().unwrap_or(false) {
            let Some(next) = self.next_packet(ctx) else {
                break;
            };
            let (head, chain) = match ctx.queues[RX].pop() {
                Ok(Some(p)) => p,
                r => {
                    if let Next::Control(h) = next {
                        self.control.push_front(h);
                    }
                    if let Err(e) = r {
                        ctx.fail(format!("queue {RX}: {}", crate::error_chain(&e)));
                    }
                    break;
                }
            };
            let len = self.fill(ctx, next, chain).unwrap_or_else(|e| {
                log::debug!("virtio-vsock: bad receive buffer: {e}");
                0
            });
            ctx.complete(RX, head, len);
            any = true;
        }
        if any {
            ctx.notify_used(RX);
        }
    }

    /// What goes into the next receive buffer: a control packet, or data
    /// of a ready connection (its key).
    fn next_packet(&mut self, ctx: &Ctx<'_>) -> Option<Next> {
        if let Some(h) = self.control.pop_front() {
            return Some(Next::Control(h));
        }
        while let Some(&key) = self.ready.front() {
            let Some(c) = self.conns.get(&key) else {
                self.ready.pop_front();
                continue;
            };
            let avail = c.readable().unwrap_or(0);
            if c.state == State::Established && avail > 0 && c.credit() > 0 {
                return Some(Next::Data(key, avail));
            }
            self.ready.pop_front();
            if c.state == State::Established && avail == 0 && c.at_eof() {
                let flags = shutdown::RCV | shutdown::SEND;
                if let Some(c) = self.conns.get_mut(&key) {
                    c.state = State::Closing;
                    let h = c.header(self.cid, op::SHUTDOWN, 0, flags);
                    self.control.push_back(h);
                }
            }
            self.arm(ctx, key);
            if let Some(h) = self.control.pop_front() {
                return Some(Next::Control(h));
            }
        }
        None
    }

    fn fill(
        &mut self,
        ctx: &Ctx<'_>,
        next: Next,
        chain: Result<Chain, QueueError>,
    ) -> Result<u32, QueueError> {
        let bufs = Buffers::pin(ctx.mem, &chain?, false, HDR_LEN + MAX_PAYLOAD)?;
        if bufs.writable_len() < HDR_LEN {
            return Err(QueueError::Bounds);
        }
        let (key, avail) = match next {
            Next::Control(h) => {
                bufs.write(0, &h.bytes())?;
                return Ok(HDR_LEN as u32);
            }
            Next::Data(key, avail) => (key, avail),
        };
        let Some(c) = self.conns.get_mut(&key) else {
            return Ok(0);
        };
        let room = (bufs.writable_len() - HDR_LEN).min(MAX_PAYLOAD);
        let want = (avail as u64).min(u64::from(c.credit())).min(room);
        let n = c
            .read_into(&bufs.writable_slices(HDR_LEN, want)?)
            .unwrap_or(0) as u32;
        c.rx_cnt = c.rx_cnt.wrapping_add(n);
        let h = c.header(self.cid, op::RW, n, 0);
        if n as usize >= avail {
            self.ready.retain(|k| *k != key);
            self.arm(ctx, key);
        }
        bufs.write(0, &h.bytes())?;
        Ok(HDR_LEN as u32 + n)
    }
}

/// What the next receive buffer gets.
enum Next {
    Control(Header),
    Data(Key, usize),
}

/// The Unix socket a guest connection to host port `port` reaches.
fn host_path(uds: &Path, port: u32) -> PathBuf {
    let mut p = uds.as_os_str().to_owned();
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        id::VSOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, ctx: &mut Ctx<'_>) -> Result<(), DeviceError> {
        if let Some(l) = &self.listener {
            Self::watch(ctx, l.as_raw_fd(), EventSet::IN, LISTENER);
        }
        Ok(())
    }

    fn queue_notify(&mut self, ctx: &mut Ctx<'_>, queue: usize) {
        if queue == TX {
            self.transmit(ctx);
        }
        self.deliver(ctx);
    }

    fn host_event(&mut self, ctx: &mut Ctx<'_>, token: u64, events: u32) {
        if token == LISTENER {
            self.accept(ctx);
        } else if self.waiting.contains_key(&token) {
            self.connect_line(ctx, token);
        } else if let Some(&key) = self.tokens.get(&token) {
            self.conn_event(ctx, key, events);
        }
        if ctx.queues[RX].is_active() {
            self.deliver(ctx);
        }
    }

    fn reset(&mut self, ctx: &mut Ctx<'_>) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            self.drop_conn(ctx, key);
        }
        self.control.clear();
    }

    fn fork(&self) -> Result<Box<dyn VirtioDevice>, DeviceError> {
        Ok(Box::new(Self::unplugged(self.cid)))
    }

    fn resume(&mut self, _ctx: &mut Ctx<'_>) {
        // Packets are completed as they are handled: none is in flight.
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        if let (Some(uds), Some(_)) = (&self.uds, &self.listener) {
            let _ = std::fs::remove_file(uds);
        }
    }
}
