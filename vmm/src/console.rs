//! A VM's console: what its serial port and WRITE hypercall print.
//!
//! The root VM's output passes straight through. A clone's output is
//! collected into whole lines, each prefixed with the clone's id, so lines of
//! VMs running at once never interleave mid-line.

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};

/// Where console output goes.
#[derive(Clone, Debug, Default)]
pub enum Sink {
    /// The process's standard output.
    #[default]
    Stdout,
    /// A buffer (for tests and embedders).
    Capture(Arc<Mutex<Vec<u8>>>),
    /// Nowhere (fuzzing clones, whose runs would repeat the same lines).
    Discard,
}

impl Sink {
    /// A new capturing sink and its buffer.
    pub fn capture() -> (Self, Arc<Mutex<Vec<u8>>>) {
        let buf = Arc::new(Mutex::new(Vec::new()));
        (Sink::Capture(buf.clone()), buf)
    }

    fn emit(&self, bytes: &[u8]) {
        match self {
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                // Output is best effort: a closed stdout must not stop the VM.
                let _ = out.write_all(bytes);
                let _ = out.flush();
            }
            Sink::Capture(buf) => buf
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(bytes),
            Sink::Discard => {}
        }
    }
}

/// One VM's console.
#[derive(Debug)]
pub struct Console {
    sink: Sink,
    prefix: Option<Vec<u8>>,
    pending: Mutex<Vec<u8>>,
}

impl Console {
    /// A console; `clone_id` is `None` for the root VM.
    pub fn new(sink: Sink, clone_id: Option<u32>) -> Self {
        Self {
            sink,
            prefix: clone_id.map(|id| format!("[{id}] ").into_bytes()),
            pending: Mutex::new(Vec::new()),
        }
    }

    /// Prints guest output.
    pub fn write(&self, bytes: &[u8]) {
        let Some(prefix) = &self.prefix else {
            self.sink.emit(bytes);
            return;
        };
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        pending.extend_from_slice(bytes);
        let Some(last_nl) = pending.iter().rposition(|b| *b == b'\n') else {
            return;
        };
        let rest = pending.split_off(last_nl + 1);
        let mut out = Vec::with_capacity(pending.len() + 16);
        for line in pending.split_inclusive(|b| *b == b'\n') {
            out.extend_from_slice(prefix);
            out.extend_from_slice(line);
        }
        *pending = rest;
        drop(pending);
        self.sink.emit(&out);
    }

    /// Prints whatever partial line is left (the VM ended).
    pub fn flush(&self) {
        let rest =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
        if !rest.is_empty() {
            let mut out = self.prefix.clone().unwrap_or_default();
            out.extend_from_slice(&rest);
            out.push(b'\n');
            self.sink.emit(&out);
        }
    }
}

/// Lets devices write to a console through `std::io::Write`.
#[derive(Debug, Clone)]
pub struct ConsoleWriter(pub Arc<Console>);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_print_whole_prefixed_lines() {
        let (sink, buf) = Sink::capture();
        let c = Console::new(sink, Some(3));
        c.write(b"ab");
        assert!(buf.lock().unwrap().is_empty());
        c.write(b"c\nd\ne");
        assert_eq!(&*buf.lock().unwrap(), b"[3] abc\n[3] d\n");
        c.flush();
        assert_eq!(&*buf.lock().unwrap(), b"[3] abc\n[3] d\n[3] e\n");
    }

    #[test]
    fn root_passes_through() {
        let (sink, buf) = Sink::capture();
        let c = Console::new(sink, None);
        c.write(b"x");
        c.flush();
        assert_eq!(&*buf.lock().unwrap(), b"x");
    }
}
