//! The config file: any text is a config or a clear error, never a panic.
#![no_main]

use keyhole::config::{Config, Overrides, RawConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(raw) = toml::from_str::<RawConfig>(s) {
        let _ = Config::from_raw(raw, Overrides::default());
    }
});
