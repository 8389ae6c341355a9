//! `/proc/<pid>/cgroup` as a hostile process might shape it: a container
//! id (64 hex digits) or none, or an error; never a panic. The claim
//! parser agrees with the plain one, and names only lines that hold its id.
#![no_main]

use keyhole::identity::cgroup::{claim, container_id};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let plain = container_id(s);
    if let Ok(Some(id)) = &plain {
        assert!(id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()), "{id:?}");
    }
    match claim(s) {
        Ok(Some(c)) => {
            assert_eq!(plain.ok().flatten().as_deref(), Some(c.id.as_str()));
            assert!(!c.lines.is_empty() && c.lines.iter().all(|(_, path)| path.contains(&c.id)), "{c:?}");
        }
        Ok(None) => assert_eq!(plain, Ok(None)),
        Err(e) => assert!(plain.is_err(), "{e}"),
    }
});
