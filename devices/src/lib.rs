//! Emulated devices. Every device that touches guest memory does so through
//! a pin from `memory` (devices are the GUP users); the legacy devices here
//! touch none.

pub mod pin_test;
pub mod serial;
pub mod virtio;

/// An error and its sources on one line: "what failed: why: deeper why".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
