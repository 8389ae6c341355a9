//! Docker volume-plugin requests: any body decodes or is refused, and the
//! options of a create are checked; never a panic.
#![no_main]

use keyhole::docker::plugin::{decode, parse_opts};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = decode(data) {
        if let Some(opts) = &r.opts {
            if let Ok(spec) = parse_opts(opts) {
                assert!(spec.mode.is_none_or(|m| m != 0 && m & !0o444 == 0));
            }
        }
    }
});
