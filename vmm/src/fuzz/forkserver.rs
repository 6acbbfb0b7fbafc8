//! AFL++'s forkserver protocol, so that afl-fuzz drives a [`Target`]:
//! `afl-fuzz -i IN -o OUT -- vmm fuzz-target --program T.elf`.
//!
//! afl-fuzz starts the target with a control pipe on fd 198 (it writes) and
//! a status pipe on fd 199 (it reads), and the coverage map's SysV
//! shared-memory id in `__AFL_SHM_ID`. The exchange (AFL++ 4.x):
//!
//! 1. Hello: we write `FS_OPT_ENABLED | FS_OPT_MAPSIZE | FS_OPT_SET_MAPSIZE(65536)`
//!    (`0xc001ffff`), with `FS_OPT_SHDMEM_FUZZ` (`0xc101ffff`) when afl-fuzz
//!    offers test cases in shared memory (`__AFL_SHM_FUZZ_ID`); afl-fuzz
//!    then answers `FS_OPT_ENABLED | FS_OPT_SHDMEM_FUZZ` (`0x81000001`).
//! 2. Per run: afl-fuzz writes 4 bytes (whether the last run timed out);
//!    we write a "child pid", run the input from the reset point, copy our
//!    map into the shared map, and write a wait status: `0` for DONE(0),
//!    `code << 8` for EXIT(code), killed by `SIGABRT` (6) for a failure
//!    verdict, by `SIGSEGV` (11) for a guest exception.
//!
//! Runs happen in this process, but afl-fuzz kills the pid it was given
//! when a run outlasts its `-t`, and only a run it timed out itself counts
//! as a hang. So the pid is that of a sentinel: a child process that only
//! waits to be killed. A run our target reports as a hang is answered when
//! afl-fuzz has killed the sentinel (with the sentinel's wait status), so
//! afl-fuzz sees its own timeout and counts a hang; the next run gets a
//! new sentinel. A run that afl-fuzz times out while it is still going
//! (our target's timeout above `-t`) ends the same way. The target's own
//! timeout should be below afl-fuzz's `-t`.
//!
//! The input comes from afl-fuzz's shared memory when it offers it (it
//! does unless told otherwise, and then ignores `@@` and `-f`), else from
//! the file named on our command line (`@@`), else from stdin (a file
//! afl-fuzz rewrites before each run; read from offset 0 every time).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use thiserror::Error;

use super::mutate::MAX_INPUT;
use super::{FuzzError, MAP_SIZE, Target, Verdict};

/// afl-fuzz's control pipe; the status pipe is the next fd.
pub const FORKSRV_FD: i32 = 198;
const FS_OPT_ENABLED: u32 = 0x8000_0001;
const FS_OPT_MAPSIZE: u32 = 0x4000_0000;
const FS_OPT_SHDMEM_FUZZ: u32 = 0x0100_0000;
const FS_OPT_ERROR: u32 = 0xf800_008f;
const FS_ERROR_SHMAT: u32 = 8;
/// The hello we send (without shared-memory test cases).
pub const HELLO: u32 = FS_OPT_ENABLED | FS_OPT_MAPSIZE | ((MAP_SIZE as u32 - 1) << 1);
/// The hello when afl-fuzz offers test cases in shared memory.
pub const HELLO_SHM_INPUT: u32 = HELLO | FS_OPT_SHDMEM_FUZZ;
/// afl-fuzz's answer that it will pass test cases in shared memory.
pub const SHM_INPUT_ACK: u32 = FS_OPT_ENABLED | FS_OPT_SHDMEM_FUZZ;
/// Wait status of a process killed by SIGABRT: a failure verdict.
pub const STATUS_FAIL: u32 = libc::SIGABRT as u32;
/// Wait status of a process killed by SIGSEGV: a guest exception.
pub const STATUS_CRASH: u32 = libc::SIGSEGV as u32;

/// The map's shared-memory id variable, with the NUL that afl-fuzz looks
/// for in a target's binary to tell that it is instrumented.
#[used]
static SHM_ENV: [u8; 13] = *b"__AFL_SHM_ID\0";
const SHM_FUZZ_ENV: &str = "__AFL_SHM_FUZZ_ID";

/// Errors of the forkserver (a run's verdict is not an error).
#[derive(Debug, Error)]
pub enum ForkserverError {
    /// A pipe, file or shared-memory segment failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// What the host said.
        #[source]
        source: std::io::Error,
    },
    /// afl-fuzz said something unexpected.
    #[error("afl-fuzz {0}")]
    Protocol(String),
    /// The target failed (not a verdict: the VM itself).
    #[error(transparent)]
    Target(#[from] FuzzError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ForkserverError {
    let what = what.into();
    move |source| ForkserverError::Io { what, source }
}

/// Memory shared with afl-fuzz: the coverage map, the test cases.
pub trait SharedMemory {
    /// Its size in bytes.
    fn size(&self) -> usize;
    /// Copies bytes from `offset` into `dst`; returns how many there were.
    fn read_at(&self, offset: usize, dst: &mut [u8]) -> usize;
    /// Copies `src` to `offset`; returns how many bytes fitted.
    fn write_at(&mut self, offset: usize, src: &[u8]) -> usize;
}

/// A System V shared-memory segment attached to this process.
#[derive(Debug)]
pub struct ShmSegment {
    ptr: NonNull<u8>,
    size: usize,
}

impl ShmSegment {
    /// Attaches segment `id` (read-write).
    pub fn attach(id: i32) -> std::io::Result<Self> {
        // SAFETY: shmid_ds is plain data, for which all zeros is a value.
        let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
        // SAFETY: IPC_STAT writes only into `ds`, which we own.
        if unsafe { libc::shmctl(id, libc::IPC_STAT, &mut ds) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the kernel maps the segment at an address of its choice,
        // where nothing else of ours lives.
        let p = unsafe { libc::shmat(id, std::ptr::null(), 0) };
        if p as isize == -1 {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(std::io::Error::last_os_error)?;
        Ok(ShmSegment {
            ptr,
            size: ds.shm_segsz,
        })
    }
}

impl SharedMemory for ShmSegment {
    fn size(&self) -> usize {
        self.size
    }

    fn read_at(&self, offset: usize, dst: &mut [u8]) -> usize {
        let n = dst.len().min(self.size.saturating_sub(offset));
        if n > 0 {
            // SAFETY: [offset, offset + n) lies inside the attached segment,
            // and afl-fuzz writes it only between runs, not while we read.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.ptr.as_ptr().wrapping_add(offset),
                    dst.as_mut_ptr(),
                    n,
                )
            };
        }
        n
    }

    fn write_at(&mut self, offset: usize, src: &[u8]) -> usize {
        let n = src.len().min(self.size.saturating_sub(offset));
        if n > 0 {
            // SAFETY: [offset, offset + n) lies inside the attached segment,
            // and afl-fuzz reads it only after the run's status.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    src.as_ptr(),
                    self.ptr.as_ptr().wrapping_add(offset),
                    n,
                )
            };
        }
        n
    }
}

impl Drop for ShmSegment {
    fn drop(&mut self) {
        // SAFETY: detaches the segment attached in `attach`; no reference
        // into it outlives `self`.
        unsafe { libc::shmdt(self.ptr.as_ptr().cast()) };
    }
}

/// Where each run's input comes from.
pub enum Input {
    /// afl-fuzz's shared memory: a 4-byte length, then the bytes.
    Shared(Box<dyn SharedMemory>),
    /// A file named on the command line (`@@`), read anew for each run.
    File(PathBuf),
    /// A file descriptor (stdin), read from offset 0 for each run.
    Fd(File),
}

impl Input {
    /// This process's stdin.
    pub fn stdin() -> Result<Self, ForkserverError> {
        let fd = std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map_err(io("cannot duplicate stdin"))?;
        Ok(Input::Fd(File::from(fd)))
    }

    /// Reads the current input into `buf`.
    fn read(&mut self, buf: &mut Vec<u8>) -> Result<(), ForkserverError> {
        buf.clear();
        match self {
            Input::Shared(shm) => {
                let mut len = [0u8; 4];
                shm.read_at(0, &mut len);
                let len = (u32::from_ne_bytes(len) as usize)
                    .min(MAX_INPUT)
                    .min(shm.size().saturating_sub(4));
                buf.resize(len, 0);
                shm.read_at(4, buf);
            }
            Input::File(path) => {
                let mut f =
                    File::open(&*path).map_err(io(format!("cannot read {}", path.display())))?;
                f.read_to_end(buf)
                    .map_err(io(format!("cannot read {}", path.display())))?;
            }
            Input::Fd(f) => {
                let mut chunk = [0u8; 16 * 1024];
                loop {
                    match f.read_at(&mut chunk, buf.len() as u64) {
                        Ok(0) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        // A pipe cannot be read at an offset: take what comes.
                        Err(e) if e.raw_os_error() == Some(libc::ESPIPE) => {
                            f.read_to_end(buf).map_err(io("cannot read stdin"))?;
                            break;
                        }
                        Err(e) => return Err(io("cannot read stdin")(e)),
                    }
                }
            }
        }
        buf.truncate(MAX_INPUT);
        Ok(())
    }
}

/// A child process that waits to be killed: the pid afl-fuzz kills when
/// a run times out.
#[derive(Debug)]
struct Sentinel {
    pid: libc::pid_t,
    reaped: bool,
}

impl Sentinel {
    fn spawn() -> std::io::Result<Self> {
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the child only makes system calls that are safe after
        // fork in a threaded process (see `sentinel_main`).
        let pid = unsafe { libc::fork() };
        match pid {
            -1 => Err(std::io::Error::last_os_error()),
            0 => sentinel_main(parent),
            pid => Ok(Sentinel { pid, reaped: false }),
        }
    }

    /// Its wait status once it is dead (without waiting unless `block`).
    fn status(&mut self, block: bool) -> std::io::Result<Option<u32>> {
        let mut status = 0;
        let flags = if block { 0 } else { libc::WNOHANG };
        loop {
            // SAFETY: waits for our own child and writes into `status`.
            let r = unsafe { libc::waitpid(self.pid, &mut status, flags) };
            match r {
                0 => return Ok(None),
                -1 if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {
                }
                -1 => return Err(std::io::Error::last_os_error()),
                _ => {
                    self.reaped = true;
                    return Ok(Some(status as u32));
                }
            }
        }
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        if !self.reaped {
            // SAFETY: signals our own child, which has not been reaped, so
            // its pid is still ours.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            let _ = self.status(true);
        }
    }
}

/// The sentinel's life: die with the parent, hold no descriptors, wait.
fn sentinel_main(parent: libc::pid_t) -> ! {
    // SAFETY: sets this process's parent-death signal; async-signal-safe.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } != parent {
        // SAFETY: ends this process at once, running nothing of the parent's.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: closes this process's copies of every descriptor above
    // stderr (pipes, VM descriptors); nothing here uses them.
    unsafe { libc::close_range(3, u32::MAX, 0) };
    loop {
        // SAFETY: waits for a signal; async-signal-safe.
        unsafe { libc::pause() };
    }
}

/// Reads a 4-byte message; None when the pipe is closed.
fn read_u32(r: &mut impl Read) -> Result<Option<u32>, ForkserverError> {
    let mut b = [0u8; 4];
    match r.read_exact(&mut b) {
        Ok(()) => Ok(Some(u32::from_ne_bytes(b))),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(io("cannot read afl-fuzz's control pipe")(e)),
    }
}

fn write_u32(w: &mut impl Write, v: u32) -> Result<(), ForkserverError> {
    w.write_all(&v.to_ne_bytes())
        .and_then(|()| w.flush())
        .map_err(io("cannot write afl-fuzz's status pipe"))
}

/// Serves afl-fuzz over one target.
pub struct Forkserver {
    map: Option<Box<dyn SharedMemory>>,
    input: Input,
    sentinel: Option<Sentinel>,
    buf: Vec<u8>,
    /// Our parent (afl-fuzz) when we started: if it dies, no one kills a hang.
    parent: u32,
}

impl Forkserver {
    /// A forkserver copying coverage into `map` (none: afl-fuzz runs
    /// without a map) and reading inputs from `input`.
    pub fn new(map: Option<Box<dyn SharedMemory>>, input: Input) -> Self {
        Forkserver {
            map,
            input,
            sentinel: None,
            buf: Vec::new(),
            parent: std::os::unix::process::parent_id(),
        }
    }

    /// Speaks the protocol on `ctl` (from afl-fuzz) and `st` (to it) until
    /// afl-fuzz closes the control pipe; returns the number of runs.
    pub fn serve(
        &mut self,
        target: &mut dyn Target,
        ctl: &mut impl Read,
        st: &mut impl Write,
    ) -> Result<u64, ForkserverError> {
        let shm_input = matches!(self.input, Input::Shared(_));
        write_u32(st, if shm_input { HELLO_SHM_INPUT } else { HELLO })?;
        if shm_input {
            match read_u32(ctl)? {
                Some(SHM_INPUT_ACK) => {}
                Some(v) => {
                    return Err(ForkserverError::Protocol(format!(
                        "answered {v:#x} to the offer of shared-memory test cases"
                    )));
                }
                None => {
                    return Err(ForkserverError::Protocol(
                        "left during the handshake".into(),
                    ));
                }
            }
        }
        let mut runs = 0;
        while read_u32(ctl)?.is_some() {
            let pid = match &mut self.sentinel {
                Some(s) if !s.reaped => s.pid,
                _ => {
                    let s = Sentinel::spawn().map_err(io("cannot fork the sentinel process"))?;
                    self.sentinel.insert(s).pid
                }
            };
            write_u32(st, pid as u32)?;
            self.input.read(&mut self.buf)?;
            let verdict = target.run(&self.buf)?;
            if let Some(map) = &mut self.map {
                let cov = target.coverage();
                map.write_at(0, &cov[..cov.len().min(MAP_SIZE)]);
            }
            let status = self.status(&verdict)?;
            write_u32(st, status)?;
            runs += 1;
        }
        Ok(runs)
    }

    /// The wait status afl-fuzz gets for a run.
    fn status(&mut self, verdict: &Verdict) -> Result<u32, ForkserverError> {
        let sentinel = self
            .sentinel
            .as_mut()
            .ok_or_else(|| ForkserverError::Protocol("ran without a sentinel".into()))?;
        let wait = |e| io("cannot wait for the sentinel process")(e);
        // A hang is answered once afl-fuzz has timed it out and killed the
        // sentinel; any run it timed out meanwhile ends the same way.
        let mut dead = sentinel.status(false).map_err(wait)?;
        while dead.is_none() && *verdict == Verdict::Hang {
            if std::os::unix::process::parent_id() != self.parent {
                return Err(ForkserverError::Protocol(
                    "went away while a run waited for its timeout".into(),
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
            dead = sentinel.status(false).map_err(wait)?;
        }
        Ok(dead.unwrap_or(match verdict {
            Verdict::Ok | Verdict::Hang => 0,
            Verdict::Exit(code) => ((code & 0xff) as u32) << 8,
            Verdict::Fail(_) => STATUS_FAIL,
            Verdict::Crash(_) => STATUS_CRASH,
        }))
    }
}

/// What [`run`] did.
#[derive(Debug)]
pub enum Outcome {
    /// Served afl-fuzz until it left, this many runs.
    Served(u64),
    /// Not started by afl-fuzz: ran the one input, with this verdict.
    Ran(Verdict),
}

/// afl-fuzz's pipes, when it started this process.
fn afl_pipes() -> Option<(File, File)> {
    // SAFETY: F_GETFD only asks whether the descriptor is open.
    let ctl_open = unsafe { libc::fcntl(FORKSRV_FD, libc::F_GETFD) } != -1;
    // SAFETY: as above.
    let st_open = unsafe { libc::fcntl(FORKSRV_FD + 1, libc::F_GETFD) } != -1;
    if !(ctl_open && st_open) {
        return None;
    }
    // SAFETY: fd 198 is open (checked above) and, as afl-fuzz's control
    // pipe, is owned by nothing else in this process.
    let ctl = unsafe { File::from_raw_fd(FORKSRV_FD) };
    // SAFETY: likewise for afl-fuzz's status pipe, fd 199.
    let st = unsafe { File::from_raw_fd(FORKSRV_FD + 1) };
    Some((ctl, st))
}

/// Attaches the segment whose id is in environment variable `var`.
fn attach_env(var: &str) -> Option<Result<ShmSegment, ForkserverError>> {
    let value = std::env::var(var).ok()?;
    Some(
        value
            .trim()
            .parse::<i32>()
            .map_err(|_| ForkserverError::Protocol(format!("set {var} to `{value}`, not an id")))
            .and_then(|id| ShmSegment::attach(id).map_err(io(format!("cannot attach {var} {id}")))),
    )
}

/// Runs `target` for afl-fuzz when it started this process, else once on
/// `file` (or stdin) to reproduce a finding.
pub fn run(target: &mut dyn Target, file: Option<&Path>) -> Result<Outcome, ForkserverError> {
    let Some((mut ctl, mut st)) = afl_pipes() else {
        let mut input = match file {
            Some(p) => Input::File(p.to_path_buf()),
            None => Input::stdin()?,
        };
        let mut buf = Vec::new();
        input.read(&mut buf)?;
        return Ok(Outcome::Ran(target.run(&buf)?));
    };
    let shm_env = std::str::from_utf8(&std::hint::black_box(&SHM_ENV)[..12]).unwrap_or_default();
    let shared = attach_env(shm_env)
        .transpose()
        .and_then(|map| Ok((map, attach_env(SHM_FUZZ_ENV).transpose()?)));
    let (map, input) = match shared {
        Ok(m) => m,
        Err(e) => {
            // Tell afl-fuzz why, in its own terms, before giving up.
            let _ = write_u32(&mut st, FS_OPT_ERROR | (FS_ERROR_SHMAT << 8));
            return Err(e);
        }
    };
    let input = match (input, file) {
        (Some(shm), _) => Input::Shared(Box::new(shm)),
        (None, Some(p)) => Input::File(p.to_path_buf()),
        (None, None) => Input::stdin()?,
    };
    let map = map.map(|m| Box::new(m) as Box<dyn SharedMemory>);
    Forkserver::new(map, input)
        .serve(target, &mut ctl, &mut st)
        .map(Outcome::Served)
}

#[cfg(test)]
mod tests;
