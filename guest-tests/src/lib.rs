//! Guest programs used by the tests.
