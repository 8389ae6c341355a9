//! Connecting to the broker, and the one mapping from gRPC status and
//! connection errors to the CLI's exit codes.
#![forbid(unsafe_code)]

use std::fmt;
use std::path::Path;

use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use crate::api::pb::admin_client::AdminClient;
use crate::api::pb::workload_client::WorkloadClient;

/// An error with the exit code it should end the process with.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

pub fn fail(code: u8, message: impl Into<String>) -> anyhow::Error {
    Failure { code, message: message.into() }.into()
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        let code = match s.code() {
            Code::InvalidArgument | Code::OutOfRange => 2,
            Code::FailedPrecondition | Code::AlreadyExists => 7,
            Code::NotFound => 3,
            Code::PermissionDenied | Code::Unauthenticated => 4,
            Code::Unavailable => 5,
            Code::DataLoss => 6,
            Code::ResourceExhausted if s.message().contains("message length too large") => {
                return Failure {
                    code: 2,
                    message: "the request is larger than the broker accepts (max_value_bytes)".into(),
                };
            }
            _ => 1,
        };
        Failure { code, message: s.message().to_owned() }
    }
}

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

async fn channel(socket: &Path) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(format!("unix://{}", socket.display()))
        .map_err(|e| fail(2, format!("bad socket path {}: {e}", socket.display())))?;
    endpoint.connect().await.map_err(|e| {
        let io = std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
            .find_map(|e| e.downcast_ref::<std::io::Error>());
        let s = socket.display();
        let message = match io.map(std::io::Error::kind) {
            Some(std::io::ErrorKind::NotFound) => {
                format!("no broker socket at {s}: is `keyhole serve` running? (set --socket or KEYHOLE_SOCKET)")
            }
            Some(std::io::ErrorKind::ConnectionRefused) => {
                format!("nothing is listening on {s}: the broker is not running")
            }
            Some(std::io::ErrorKind::PermissionDenied) => format!(
                "permission denied opening {s}: admin calls need root or an [admin] uid with access to the socket"
            ),
            _ => format!("cannot connect to {s}: {}", io.map_or(e.to_string(), ToString::to_string)),
        };
        let code = if io.map(std::io::Error::kind) == Some(std::io::ErrorKind::PermissionDenied) { 4 } else { 5 };
        fail(code, message)
    })
}

pub async fn admin(socket: &Path) -> anyhow::Result<AdminClient<Channel>> {
    Ok(AdminClient::new(channel(socket).await?).max_decoding_message_size(32 << 20).max_encoding_message_size(32 << 20))
}

pub async fn workload(socket: &Path) -> anyhow::Result<WorkloadClient<Channel>> {
    Ok(WorkloadClient::new(channel(socket).await?))
}

/// Print a value as JSON on stdout.
pub fn print_json(v: &impl serde::Serialize) {
    // Invariant: our JSON views are plain structs of strings and numbers.
    println!("{}", serde_json::to_string_pretty(v).expect("serialize output"));
}

pub fn time_ms(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}
