//! The protocol as afl-fuzz speaks it, played by a thread over real pipes,
//! with the simulated target.

use std::io::{PipeReader, PipeWriter, Seek, SeekFrom};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::fuzz::mock::{self, Maze, scratch_dir};

/// Shared memory between the test's two sides.
#[derive(Clone)]
struct TestShm(Arc<Mutex<Vec<u8>>>);

impl TestShm {
    fn new(size: usize) -> Self {
        TestShm(Arc::new(Mutex::new(vec![0; size])))
    }

    fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

impl SharedMemory for TestShm {
    fn size(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    fn read_at(&self, offset: usize, dst: &mut [u8]) -> usize {
        let m = self.0.lock().unwrap();
        let n = dst.len().min(m.len().saturating_sub(offset));
        dst[..n].copy_from_slice(&m[offset..offset + n]);
        n
    }

    fn write_at(&mut self, offset: usize, src: &[u8]) -> usize {
        let mut m = self.0.lock().unwrap();
        let n = src.len().min(m.len().saturating_sub(offset));
        m[offset..offset + n].copy_from_slice(&src[..n]);
        n
    }
}

/// afl-fuzz's side of the pipes.
struct Afl {
    ctl: PipeWriter,
    st: PipeReader,
}

impl Afl {
    fn read(&mut self) -> u32 {
        read_u32(&mut self.st)
            .unwrap()
            .expect("the forkserver closed its pipe")
    }

    /// One run: returns the pid and the status.
    fn run(&mut self) -> (i32, u32) {
        write_u32(&mut self.ctl, 0).unwrap();
        let pid = self.read() as i32;
        (pid, self.read())
    }
}

/// Serves `input` on this thread while `afl` plays afl-fuzz on another;
/// returns what the server returned and what `afl` did.
fn serve<T: Send>(
    map: TestShm,
    input: Input,
    afl: impl FnOnce(Afl) -> T + Send,
) -> (Result<u64, ForkserverError>, T) {
    let (mut ctl_r, ctl_w) = std::io::pipe().unwrap();
    let (st_r, mut st_w) = std::io::pipe().unwrap();
    std::thread::scope(|s| {
        let h = s.spawn(move || {
            afl(Afl {
                ctl: ctl_w,
                st: st_r,
            })
        });
        let mut fs = Forkserver::new(Some(Box::new(map)), input);
        let r = fs.serve(&mut Maze::new(), &mut ctl_r, &mut st_w);
        drop(st_w);
        (r, h.join().unwrap())
    })
}

fn coverage_of(input: &[u8]) -> Vec<u8> {
    let mut m = Maze::new();
    m.run(input).unwrap();
    m.coverage().to_vec()
}

#[test]
fn handshake_runs_statuses_and_hangs_over_a_file() {
    let dir = scratch_dir("fs-file");
    let file = dir.join(".cur_input");
    let map = TestShm::new(MAP_SIZE);
    let (f, m) = (file.clone(), map.clone());
    let (served, ()) = serve(map, Input::File(file), move |mut afl| {
        assert_eq!(
            afl.read(),
            0xc001_ffff,
            "FS_OPT_ENABLED | FS_OPT_MAPSIZE | 65536"
        );
        let mut run = |input: &[u8]| {
            std::fs::write(&f, input).unwrap();
            afl.run()
        };
        let (pid, status) = run(b"hello");
        assert!(pid > 0);
        assert_eq!(status, 0);
        assert_eq!(m.bytes(), coverage_of(b"hello"), "the map after the run");
        assert_eq!(run(b"MAGIC!7").1, STATUS_FAIL);
        assert_eq!(run(b"CRASH").1, STATUS_CRASH);
        assert_eq!(m.bytes(), coverage_of(b"CRASH"));
        assert_eq!(run(b"MAGIC!").1, 0, "read anew each time");

        // A hang is answered only after afl-fuzz kills the pid it got.
        std::fs::write(&f, b"HANG").unwrap();
        write_u32(&mut afl.ctl, 0).unwrap();
        let hung = afl.read() as i32;
        assert_eq!(hung, pid, "one sentinel until it is killed");
        let t = Instant::now();
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: kill has no memory effects; `hung` is the forkserver's
        // unreaped child.
        assert_eq!(unsafe { libc::kill(hung, libc::SIGKILL) }, 0);
        let status = afl.read();
        assert!(t.elapsed() >= Duration::from_millis(300));
        assert_eq!(status, libc::SIGKILL as u32, "killed by SIGKILL");
        assert_eq!(m.bytes(), coverage_of(b"HANG"));

        // The next run gets a new sentinel.
        std::fs::write(&f, b"ok").unwrap();
        let (next, status) = afl.run();
        assert_ne!(next, hung);
        assert_eq!(status, 0);
    });
    assert_eq!(served.unwrap(), 6, "returns when afl-fuzz closes the pipe");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn test_cases_in_shared_memory() {
    let input = TestShm::new(4 + MAX_INPUT);
    let shm = input.clone();
    let (served, ()) = serve(
        TestShm::new(MAP_SIZE),
        Input::Shared(Box::new(input)),
        |mut afl| {
            assert_eq!(afl.read(), 0xc101_ffff, "offers shared-memory test cases");
            write_u32(&mut afl.ctl, SHM_INPUT_ACK).unwrap();
            let mut shm = shm;
            for (data, want) in [
                (&b"MAGIC!7"[..], STATUS_FAIL),
                (b"MAG", 0),
                (b"CRASH", STATUS_CRASH),
            ] {
                shm.write_at(0, &(data.len() as u32).to_ne_bytes());
                shm.write_at(4, data);
                assert_eq!(afl.run().1, want, "{data:?}");
            }
            // A length beyond the segment is cut to what it holds.
            shm.write_at(0, &u32::MAX.to_ne_bytes());
            shm.write_at(4, b"MAGIC!7");
            assert_eq!(afl.run().1, STATUS_FAIL);
        },
    );
    assert_eq!(served.unwrap(), 4);

    let (served, ()) = serve(
        TestShm::new(MAP_SIZE),
        Input::Shared(Box::new(TestShm::new(64))),
        |mut afl| {
            afl.read();
            write_u32(&mut afl.ctl, FS_OPT_ENABLED).unwrap();
        },
    );
    let e = served.unwrap_err().to_string();
    assert!(e.contains("answered 0x80000001"), "{e}");
}

#[test]
fn stdin_is_read_from_its_start_for_each_run() {
    // afl-fuzz rewrites the file behind the target's stdin, truncates it
    // and rewinds it, through the same open file (a shared offset).
    let dir = scratch_dir("fs-stdin");
    let path = dir.join(".cur_input");
    let mut afl_file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    let ours = afl_file.try_clone().unwrap();
    let (served, ()) = serve(TestShm::new(MAP_SIZE), Input::Fd(ours), move |mut afl| {
        assert_eq!(afl.read(), HELLO);
        for (data, want) in [
            (&b"CRASH and more"[..], STATUS_CRASH),
            (b"ok", 0),
            (b"MAGIC!7", STATUS_FAIL),
        ] {
            afl_file.seek(SeekFrom::Start(0)).unwrap();
            afl_file.write_all(data).unwrap();
            afl_file.set_len(data.len() as u64).unwrap();
            afl_file.seek(SeekFrom::Start(0)).unwrap();
            assert_eq!(afl.run().1, want, "{data:?}");
        }
    });
    assert_eq!(served.unwrap(), 3);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn one_run_without_afl() {
    let dir = scratch_dir("fs-once");
    let file = dir.join("crash");
    std::fs::write(&file, mock::MAGIC).unwrap();
    match run(&mut Maze::new(), Some(&file)).unwrap() {
        Outcome::Ran(v) => assert_eq!(v, Verdict::Fail(mock::FAIL_STATUS)),
        other => panic!("{other:?}"),
    }
    let e = run(&mut Maze::new(), Some(&dir.join("missing"))).unwrap_err();
    assert!(e.to_string().contains("cannot read"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
