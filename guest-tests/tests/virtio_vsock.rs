//! virtio-vsock in a real VM: a program-mode guest and host processes
//! talk through the device's Unix-socket host side, in both directions.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use guest_tests::{MIB, Running, TIMEOUT, assert_exit, guest};
use vmm::virtio::DeviceConfig;

fn accept(l: &UnixListener, vm: &Running) -> UnixStream {
    l.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return s;
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => panic!("the guest never connected ({e}): {}", vm.console()),
        }
    }
}

#[test]
fn vsock_connects_both_ways_through_unix_sockets() {
    let uds = std::env::temp_dir().join(format!("vmm-{}-vsock.sock", std::process::id()));
    let port_path = PathBuf::from(format!("{}_4321", uds.display()));
    let _ = std::fs::remove_file(&port_path);
    let listener = UnixListener::bind(&port_path).unwrap();
    let vsock = DeviceConfig::parse_vsock(&format!("cid=3,uds={}", uds.display())).unwrap();
    let vm = Running::start_with(guest("virtio_vsock"), 64 * MIB, 1, vec![vsock]);

    // A: the host connects to guest port 1234.
    let mut a = UnixStream::connect(&uds).unwrap();
    a.set_read_timeout(Some(TIMEOUT)).unwrap();
    a.write_all(b"CONNECT 1234\n").unwrap();
    let mut line = String::new();
    BufReader::new(&a).read_line(&mut line).unwrap();
    assert!(
        line.starts_with("OK ") && line.ends_with('\n'),
        "{line:?}: {}",
        vm.console()
    );
    a.write_all(b"hello").unwrap();
    let mut got = [0u8; 5];
    a.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"HELLO");
    drop(a);

    // B: the guest connects to host port 4321.
    let mut b = accept(&listener, &vm);
    b.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut got = [0u8; 10];
    b.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"from-guest");
    b.write_all(b"ack").unwrap();

    let (outcome, console) = vm.finish();
    assert_exit(&outcome, &console, 0);
    assert!(console.contains("VIRTIO-VSOCK-OK"), "{console}");
    let _ = std::fs::remove_file(&port_path);
    assert!(!uds.exists(), "the device leaves its socket file behind");
}
