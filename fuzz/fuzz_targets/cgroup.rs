//! `/proc/<pid>/cgroup` as a hostile process might shape it: a container
//! id (64 hex digits) or none, or an error; never a panic.
#![no_main]

use keyhole::identity::cgroup::container_id;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(Some(id)) = container_id(s) {
        assert!(id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()), "{id:?}");
    }
});
