//! Connecting to the broker, and the one mapping from gRPC status and
//! connection errors to the CLI's exit codes.
#![forbid(unsafe_code)]

use std::fmt;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

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
            Code::ResourceExhausted if !s.message().contains("message length too large") => 5,
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

/// How long the CLI waits for a broker that is starting, restarting or
/// handing over to a successor before it reports the broker missing.
const WAIT_FOR_BROKER: Duration = Duration::from_secs(5);

/// Whether a call may be sent again when the connection breaks under it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Reads, and changes that land the same however often they are sent.
    Safe,
    /// Changes that must not be applied twice: only the connect is retried.
    ConnectOnly,
}

/// Where the CLI sends its calls: the broker's unix socket on this
/// host, or a remote broker's admin listener over mutual TLS.
#[derive(Debug)]
pub enum Target {
    Socket(PathBuf),
    Remote(Box<Remote>),
}

/// A remote broker (`--endpoint`), with this client's certificate.
#[derive(Debug)]
pub struct Remote {
    pub url: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl Target {
    fn endpoint(&self) -> anyhow::Result<Endpoint> {
        match self {
            Target::Socket(socket) => Endpoint::from_shared(format!("unix://{}", socket.display()))
                .map_err(|e| fail(2, format!("bad socket path {}: {e}", socket.display()))),
            Target::Remote(r) => {
                if !r.url.starts_with("https://") {
                    return Err(fail(2, format!("--endpoint {:?}: use https://HOST:PORT", r.url)));
                }
                let read = |p: &Path, flag: &str| {
                    std::fs::read(p).map_err(|e| fail(2, format!("{flag} {}: cannot read it: {e}", p.display())))
                };
                let tls = ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(read(&r.ca, "--ca")?))
                    .identity(Identity::from_pem(read(&r.cert, "--cert")?, read(&r.key, "--key")?));
                Endpoint::from_shared(r.url.clone())
                    .and_then(|e| e.tls_config(tls))
                    .map_err(|e| fail(2, format!("--endpoint {}: {}", r.url, crate::causes(&e))))
            }
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Socket(s) => write!(f, "{}", s.display()),
            Target::Remote(r) => f.write_str(&r.url),
        }
    }
}

async fn connect(endpoint: &Endpoint, target: &Target, deadline: Instant) -> anyhow::Result<Channel> {
    loop {
        let e = match endpoint.connect().await {
            Ok(c) => return Ok(c),
            Err(e) => e,
        };
        let io = std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
            .find_map(|e| e.downcast_ref::<std::io::Error>());
        let kind = io.map(std::io::Error::kind);
        // No socket, or nobody accepting on it: a broker may be starting.
        // A connection cut before anything was sent (a broker handing over,
        // or one that closed a connection it could not classify yet) is
        // safe to try again too.
        let waiting = matches!(
            kind,
            Some(
                ErrorKind::NotFound | ErrorKind::ConnectionRefused | ErrorKind::BrokenPipe | ErrorKind::ConnectionReset
            )
        );
        if waiting && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let waited = WAIT_FOR_BROKER.as_secs();
        let message = match (kind, target) {
            (Some(ErrorKind::NotFound), Target::Socket(s)) => format!(
                "no broker socket at {} (waited {waited} s): is `keyhole serve` running? (set --socket or KEYHOLE_SOCKET)",
                s.display()
            ),
            (Some(ErrorKind::ConnectionRefused), _) => {
                format!("nothing is listening on {target} (waited {waited} s): the broker is not running")
            }
            (Some(ErrorKind::PermissionDenied), _) => format!(
                "permission denied opening {target}: admin calls need root or an [admin] uid with access to the socket"
            ),
            (_, Target::Remote(_)) => format!("cannot connect to {target}: {}", crate::causes(&e)),
            _ => format!("cannot connect to {target}: {}", io.map_or(e.to_string(), ToString::to_string)),
        };
        let code = if kind == Some(ErrorKind::PermissionDenied) { 4 } else { 5 };
        return Err(fail(code, message));
    }
}

/// Connect to the broker on `socket` and make one call, reconnecting while
/// a broker starts or hands over (up to [`WAIT_FOR_BROKER`]). A status made
/// on our side (it has a source error) means the connection broke before
/// an answer; a status the broker sent never has one.
async fn call<C, T, Fut>(
    target: &Target,
    retry: Retry,
    client: impl Fn(Channel) -> C,
    f: impl Fn(C) -> Fut,
) -> anyhow::Result<T>
where
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let endpoint = target.endpoint()?;
    let deadline = Instant::now() + WAIT_FOR_BROKER;
    loop {
        let channel = connect(&endpoint, target, deadline).await?;
        if let Target::Remote(_) = target {
            accepted(&channel, target).await?;
        }
        let status = match f(client(channel)).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) => s,
        };
        if std::error::Error::source(&status).is_none() {
            return Err(Failure::from(status).into());
        }
        if retry == Retry::Safe && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let outcome = match retry {
            Retry::Safe => "",
            Retry::ConnectOnly => "; the change may or may not have been made: check before you repeat it",
        };
        return Err(fail(
            5,
            format!("the connection to the broker broke during the call ({}){outcome}", status.message()),
        ));
    }
}

/// Over TLS 1.3 the client finishes its handshake before the broker has
/// checked the client's certificate; a refusal shows as a connection
/// closed under the first call. So the first call is a Ping, which the
/// broker answers to anyone it let in: if it breaks, we were not.
async fn accepted(channel: &Channel, target: &Target) -> anyhow::Result<()> {
    match AdminClient::new(channel.clone()).ping(crate::api::pb::PingRequest {}).await {
        Ok(_) => Ok(()),
        Err(s) if std::error::Error::source(&s).is_none() => Err(Failure::from(s).into()),
        Err(s) => Err(fail(
            4,
            format!(
                "{target} refused this client after the TLS handshake ({}): is its certificate issued by the broker's [admin] client_ca?",
                innermost(&s)
            ),
        )),
    }
}

/// The deepest cause of an error: the one that says what happened.
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    std::iter::successors(Some(e), |e| e.source()).last().map_or_else(String::new, ToString::to_string)
}

/// One call to the admin service (see [`call`]).
pub async fn admin<T, Fut>(socket: &Target, retry: Retry, f: impl Fn(AdminClient<Channel>) -> Fut) -> anyhow::Result<T>
where
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let client = |c| AdminClient::new(c).max_decoding_message_size(32 << 20).max_encoding_message_size(32 << 20);
    call(socket, retry, client, f).await
}

/// One call to the workload service (see [`call`]).
pub async fn workload<T, Fut>(
    socket: &Target,
    retry: Retry,
    f: impl Fn(WorkloadClient<Channel>) -> Fut,
) -> anyhow::Result<T>
where
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    call(socket, retry, WorkloadClient::new, f).await
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

/// `rpc!(admin|workload, socket, Safe|ConnectOnly, method, request)`: one
/// call through [`admin`] or [`workload`], the request cloned per attempt.
macro_rules! rpc {
    ($service:ident, $socket:expr, $retry:ident, $method:ident, $req:expr) => {
        $crate::cli::client::$service($socket, $crate::cli::client::Retry::$retry, |mut c| {
            let req = $req.clone();
            async move { c.$method(req).await }
        })
        .await
    };
}
pub(crate) use rpc;

/// Print rows under a header, columns two spaces apart, each as wide as
/// its widest cell. The last column is never padded, so put the one that
/// can grow long (a path, selectors) there: the table then fits 80
/// columns unless that one cell is long. Right-align the columns in
/// `right`.
pub fn print_table(header: &[&str], rows: &[Vec<String>], right: &[usize]) {
    if rows.is_empty() {
        return;
    }
    let last = header.len() - 1;
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).chain([header[i].len()]).max().unwrap_or(0))
        .collect();
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, c) in cells.enumerate() {
            let w = widths[i];
            match (i == last, right.contains(&i)) {
                (true, _) => out.push_str(c),
                (false, true) => out.push_str(&format!("{c:>w$}  ")),
                (false, false) => out.push_str(&format!("{c:w$}  ")),
            }
        }
        println!("{}", out.trim_end());
    };
    line(&mut header.iter().copied());
    for r in rows {
        line(&mut r.iter().map(String::as_str));
    }
}
