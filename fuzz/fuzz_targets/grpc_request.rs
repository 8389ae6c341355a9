//! gRPC requests as the broker turns them into policy: any bytes decode
//! or not, and a decoded grant or workload is checked, never a panic.
#![no_main]

use keyhole::api::pb;
use keyhole::api::templates::grant_request;
use keyhole::policy::Workload;
use keyhole::secret::SecretPath;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = pb::GrantSpec::decode(data) {
        // As the Grant handler does: a template's grant names its path.
        if let Ok(grant) = grant_request(g).and_then(|asked| asked.parse()) {
            assert!(grant.mode != 0 && grant.mode & !0o444 == 0);
        }
    }
    if let Ok(w) = pb::WorkloadSpec::decode(data) {
        let _ = Workload::new(&w.name, &w.selectors);
    }
    if let Ok(p) = pb::PutSecretRequest::decode(data) {
        let _ = SecretPath::parse(&p.path);
    }
});
