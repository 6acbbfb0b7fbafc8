//! Emulated devices. Every device that touches guest memory does so through
//! a pin from `memory` (devices are the GUP users); the legacy devices here
//! touch none.

pub mod pin_test;
pub mod serial;
