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
        _ => Err(format!("unknown request {:?}", line.trim_end())),
    };
    match reply {
        Ok(ok) => writeln!(out, "ok {ok}"),
        Err(e) => writeln!(out, "error {}", e.replace('\n', " ")),
    }
}

fn snapshot_live(path: &Path, vm: &StopHandle, out: &mut &UnixStream) -> Result<String, String> {
    if !path.is_absolute() {
        return Err(format!("{} is not an absolute path", path.display()));
    }
    let image = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let mut step = 0;
    let report = vm
        .snapshot_live(image, |done, total| {
            // About a hundred progress lines at most.
            if done * 100 / total.max(1) >= step || done == total {
                step = done * 100 / total.max(1) + 1;
                let _ = writeln!(out, "progress {done} {total}");
            }
        })
        .map_err(|e| {
            let _ = std::fs::remove_file(path);
            crate::error_chain(&e)
        })?;
    Ok(summary(&report))
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
    mut progress: impl FnMut(u64, u64),
) -> Result<String, String> {
    let out = std::path::absolute(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut conn = UnixStream::connect(sock).map_err(|e| {
        format!(
            "cannot reach a VM at {} ({e}); was it started with --api-sock?",
            sock.display()
        )
    })?;
    writeln!(conn, "snapshot-live {}", out.display()).map_err(|e| e.to_string())?;
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
