//! Secret paths, prefixes, selectors, grant targets, workload names and
//! signals: never a panic, and what parses keeps its promises.
#![no_main]

use keyhole::policy::{Selector, Target, check_workload_name, parse_signal};
use keyhole::secret::{SecretPath, validate_prefix};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(p) = SecretPath::parse(s) {
        let p = p.as_str();
        assert!(p.len() <= 256 && !p.starts_with('/') && !p.ends_with('/'));
        assert!(p.split('/').all(|seg| !seg.is_empty() && seg != "." && seg != ".."));
    }
    let _ = validate_prefix(s);
    if let Ok(sel) = Selector::parse(s) {
        assert_eq!(Selector::parse(&sel.to_string()).map(|x| x.to_string()), Ok(sel.to_string()));
    }
    if let Ok(t) = Target::parse(s) {
        assert!(Target::parse(&t.to_string()).is_ok());
    }
    if check_workload_name(s).is_ok() {
        assert!(!s.contains('/') && s != "." && s != "..");
    }
    let _ = parse_signal(s);
});
