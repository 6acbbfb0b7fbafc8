//! virtio-net in a real VM: frames between a program-mode guest and a TAP
//! device in a network namespace this test creates (it needs root and
//! iproute2, and fails if either is missing).

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

use guest_tests::{MIB, Running, assert_exit, guest};
use vmm::virtio::DeviceConfig;

const TAP: &str = "vmmtap0";

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("this test needs iproute2's `ip`: {e}"));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Self {
        let name = format!("vmm-test-{}", std::process::id());
        ip(&["netns", "add", &name]);
        Self(name)
    }

    /// Moves the calling thread into the namespace.
    fn enter(&self) {
        let f = std::fs::File::open(format!("/var/run/netns/{}", self.0)).unwrap();
        // SAFETY: setns on a namespace descriptor we opened; it changes
        // only this thread's network namespace.
        let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn net_frames_go_both_ways_through_a_tap() {
    let ns = Netns::new();
    // Everything network-related happens on a thread inside the namespace;
    // processes it starts (`ip`) inherit it.
    let (outcome, console) = std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter();
            ip(&["link", "set", "lo", "up"]);
            ip(&["tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr"]);
            ip(&["link", "set", TAP, "address", "02:00:00:00:00:01"]);
            ip(&["addr", "add", "10.0.0.1/24", "dev", TAP]);
            ip(&["link", "set", TAP, "up"]);
            ip(&[
                "neigh",
                "add",
                "10.0.0.2",
                "lladdr",
                "52:54:00:12:34:56",
                "dev",
                TAP,
            ]);
            let sock = UdpSocket::bind("10.0.0.1:5000").unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let net = DeviceConfig::parse_net(&format!("tap={TAP}")).unwrap();
            let vm = Running::start_with(guest("virtio_net"), 64 * MIB, 1, vec![net]);
            let mut buf = [0u8; 64];
            let (n, from) = sock
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("no datagram from the guest ({e}): {}", vm.console()));
            assert_eq!(
                &buf[..n],
                b"ping",
                "the frame with an offload not negotiated got through"
            );
            assert_eq!(from.to_string(), "10.0.0.2:6000");
            sock.send_to(b"pong", "10.0.0.2:6000").unwrap();
            vm.finish()
        })
        .join()
        .unwrap()
    });
    assert_exit(&outcome, &console, 0);
    assert!(console.contains("VIRTIO-NET-OK"), "{console}");
}
