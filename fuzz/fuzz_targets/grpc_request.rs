//! gRPC requests as the broker turns them into policy: any bytes decode
//! or not, and a decoded grant or workload is checked, never a panic.
#![no_main]

use keyhole::api::admin::grant_from_pb;
use keyhole::api::pb;
use keyhole::policy::Workload;
use keyhole::secret::SecretPath;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = pb::GrantSpec::decode(data) {
        if let Ok(grant) = grant_from_pb(g) {
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
