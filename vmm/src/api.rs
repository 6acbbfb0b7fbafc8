//! The API socket (`vmm run --api-sock PATH`): a Unix stream socket on which
//! other processes (`vmm snapshot`) ask a running VM for work.
//!
//! One request per connection, one line of text; the answer is zero or
//! more `progress DONE TOTAL` lines, then one `ok ...` or `error MESSAGE`
//! line, after which the VMM closes the connection.
//!
//! | request | answer |
//! |---|---|
//! | `snapshot-live PATH` | a live snapshot of the VM's memory into the new file PATH (absolute); `ok pause_us=.. total_ms=.. pages=.. at_start=.. before_write=.. background=.. zero=..` |
//! | `snapshot-files MEM<TAB>STATE` | the same into MEM, then the state file STATE (both new, absolute; see [`crate::snapfile`]); the same `ok` line, then `state_pages=.. runs=.. index_ms=.. files_ms=..` |

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::snapshot::LiveReport;
use crate::vm::StopHandle;

/// A running API socket; the socket file is removed on drop.
#[derive(Debug)]
pub struct ApiSocket {
    path: PathBuf,
}

impl ApiSocket {
    /// Listens on `path` (which must not exist) for requests to `vm`, on a
    /// thread of its own.
    pub fn serve(path: &Path, vm: StopHandle) -> io::Result<Self> {
        let listener = UnixListener::bind(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on the API socket {}: {e}", path.display()),
            )
        })?;
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                for conn in listener.incoming().flatten() {
                    if let Err(e) = answer(conn, &vm) {
                        log::warn!("API socket: {e}");
                    }
                }
            })?;
        Ok(Self { path: path.into() })
    }
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn answer(conn: UnixStream, vm: &StopHandle) -> io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = String::new();
    BufReader::new((&conn).take(4096)).read_line(&mut line)?;
    let mut out = &conn;
    let reply = match line.trim_end().split_once(' ') {
        Some(("snapshot-live", path)) => snapshot_live(Path::new(path), vm, &mut out),
        Some(("snapshot-files", paths)) => match paths.split_once('\t') {
            Some((mem, state)) => snapshot_files(Path::new(mem), Path::new(state), vm, &mut out),
            None => Err("snapshot-files needs two paths separated by a tab".into()),
        },
        _ => Err(format!("unknown request {:?}", line.trim_end())),
    };
    match reply {
        Ok(ok) => writeln!(out, "ok {ok}"),
        Err(e) => writeln!(out, "error {}", e.replace('\n', " ")),
    }
}

/// Creates the new file `path` for an image; it must be absolute.
fn new_image(path: &Path) -> Result<File, String> {
    if !path.is_absolute() {
        return Err(format!("{} is not an absolute path", path.display()));
    }
    File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))
}

/// Writes about a hundred `progress` lines at most.
fn progress_lines(out: &mut &UnixStream) -> impl FnMut(u64, u64) {
    let mut step = 0;
    move |done, total| {
        if done * 100 / total.max(1) >= step || done == total {
            step = done * 100 / total.max(1) + 1;
            let _ = writeln!(out, "progress {done} {total}");
        }
    }
}

fn snapshot_live(path: &Path, vm: &StopHandle, out: &mut &UnixStream) -> Result<String, String> {
    let image = new_image(path)?;
    let report = vm.snapshot_live(image, progress_lines(out)).map_err(|e| {
        let _ = std::fs::remove_file(path);
        crate::error_chain(&e)
    })?;
    Ok(summary(&report))
}

fn snapshot_files(
    mem: &Path,
    state: &Path,
    vm: &StopHandle,
    out: &mut &UnixStream,
) -> Result<String, String> {
    if !state.is_absolute() {
        return Err(format!("{} is not an absolute path", state.display()));
    }
    let image = new_image(mem)?;
    let r = vm
        .snapshot_to_files(image, state, true, progress_lines(out))
        .map_err(|e| {
            let _ = std::fs::remove_file(mem);
            crate::error_chain(&e)
        })?;
    Ok(format!(
        "{} state_pages={} runs={} index_ms={} files_ms={}",
        summary(&r.snapshot),
        r.pages,
        r.runs,
        r.index.as_millis(),
        r.total.as_millis()
    ))
}

fn summary(r: &LiveReport) -> String {
    format!(
        "pause_us={} total_ms={} pages={} at_start={} before_write={} background={} zero={}",
        r.pause.as_micros(),
        r.total.as_millis(),
        r.memory.pages,
        r.memory.at_start,
        r.memory.before_write,
        r.memory.in_background,
        r.memory.zero
    )
}

/// Asks the VM behind the API socket `sock` for a live snapshot into `out`
/// (a new file); `progress(done, total)` hears of the pages copied.
/// Returns the VMM's `ok` line's fields.
pub fn request_snapshot_live(
    sock: &Path,
    out: &Path,
    progress: impl FnMut(u64, u64),
) -> Result<String, String> {
    let out = std::path::absolute(out).map_err(|e| format!("{}: {e}", out.display()))?;
    request(sock, &format!("snapshot-live {}", out.display()), progress)
}

/// Like [`request_snapshot_live`], and asks for the state file `state`
/// too (a new file): the two files `vmm restore` runs the VM again from.
pub fn request_snapshot_files(
    sock: &Path,
    out: &Path,
    state: &Path,
    progress: impl FnMut(u64, u64),
) -> Result<String, String> {
    let abs = |p: &Path| {
        let a = std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display()))?;
        let s = a.display().to_string();
        if s.contains(['\t', '\n']) {
            return Err(format!(
                "{s:?}: a path with a tab or a newline cannot be sent"
            ));
        }
        Ok(s)
    };
    let line = format!("snapshot-files {}\t{}", abs(out)?, abs(state)?);
    request(sock, &line, progress)
}

/// Sends one request line and reads the answer.
fn request(sock: &Path, line: &str, mut progress: impl FnMut(u64, u64)) -> Result<String, String> {
    let mut conn = UnixStream::connect(sock).map_err(|e| {
        format!(
            "cannot reach a VM at {} ({e}); was it started with --api-sock?",
            sock.display()
        )
    })?;
    writeln!(conn, "{line}").map_err(|e| e.to_string())?;
    for line in BufReader::new(&conn).lines() {
        let line = line.map_err(|e| format!("the VMM's answer: {e}"))?;
        if let Some(rest) = line.strip_prefix("progress ") {
            let mut n = rest.split(' ').filter_map(|v| v.parse().ok());
            if let (Some(d), Some(t)) = (n.next(), n.next()) {
                progress(d, t);
            }
        } else if let Some(ok) = line.strip_prefix("ok ") {
            return Ok(ok.to_string());
        } else if let Some(e) = line.strip_prefix("error ") {
            return Err(e.to_string());
        }
    }
    Err("the VM ended before the snapshot did".into())
}
