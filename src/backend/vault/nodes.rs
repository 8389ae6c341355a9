//! The nodes of one Vault/OpenBao cluster, and following its active node.
//!
//! A `[[backend]]` may list several node addresses. Requests go to the
//! node in use; on a connection error, 5xx, 429 or 307 the request moves
//! on to the next address (each node at most once per request), and the
//! node that answered stays in use. Standbys serve reads a little behind
//! the active node and forward writes, so every request after the first
//! carries read-your-writes headers: the highest `X-Vault-Index` seen and
//! `X-Vault-Inconsistent: forward-active-node` (a standby that has not
//! caught up forwards the request instead of answering from old state).
//! Without them, keyhole's check-and-set write, whose version was read
//! from a standby that had not yet applied keyhole's previous write,
//! fails with a false conflict.
#![forbid(unsafe_code)]

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Whether an answer means "try the next node": the node is sealed,
/// failing, overloaded, or redirects to the active node.
pub fn moves_on(status: u16) -> bool {
    status >= 500 || status == 429 || status == 307
}

/// The raft index an `X-Vault-Index` header carries (base64 of
/// `{"cluster":..,"value":"<index>"}`); None if it is not one.
pub fn index_value(header: &str) -> Option<u64> {
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD.decode(header.trim()).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&raw).ok()?;
    match &v["value"] {
        serde_json::Value::String(s) => s.parse().ok(),
        serde_json::Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

/// The cluster's addresses, the one in use, and the newest state seen.
#[derive(Debug)]
pub struct Nodes {
    addresses: Vec<String>,
    current: AtomicUsize,
    switches: AtomicU64,
    /// The highest `X-Vault-Index` answered so far (header, value).
    index: Mutex<Option<(String, u64)>>,
}

/// Most bytes of an `X-Vault-Index` header kept (it is a short token).
const MAX_INDEX_HEADER: usize = 512;

impl Nodes {
    /// `addresses`: at least one (the config insists).
    pub fn new(addresses: Vec<String>) -> Nodes {
        Nodes { addresses, current: AtomicUsize::new(0), switches: AtomicU64::new(0), index: Mutex::new(None) }
    }

    /// The order to try the nodes in for one request: the one in use
    /// first, then the others in config order after it.
    pub fn order(&self) -> Vec<usize> {
        let n = self.addresses.len();
        let start = self.current.load(Ordering::Relaxed) % n.max(1);
        (0..n).map(|k| (start + k) % n).collect()
    }

    pub fn address(&self, i: usize) -> &str {
        &self.addresses[i]
    }

    pub fn addresses(&self) -> &[String] {
        &self.addresses
    }

    /// The node in use.
    pub fn in_use(&self) -> &str {
        &self.addresses[self.current.load(Ordering::Relaxed) % self.addresses.len()]
    }

    /// How many times the node in use changed since start.
    pub fn switches(&self) -> u64 {
        self.switches.load(Ordering::Relaxed)
    }

    /// Node `i` answered: use it from now on.
    pub fn answered(&self, i: usize, backend: &str) {
        let was = self.current.swap(i, Ordering::Relaxed);
        if was != i {
            self.switches.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                backend,
                from = %self.addresses[was % self.addresses.len()],
                to = %self.addresses[i],
                "now using another node of the cluster"
            );
        }
    }

    /// Remember an answer's `X-Vault-Index` if it is newer than any seen.
    pub fn saw_index(&self, header: &str) {
        if header.len() > MAX_INDEX_HEADER {
            return;
        }
        let Some(value) = index_value(header) else { return };
        let mut idx = self.index.lock().expect("index lock");
        if idx.as_ref().is_none_or(|(_, v)| value > *v) {
            *idx = Some((header.to_owned(), value));
        }
    }

    /// The read-your-writes headers to send, once an index is known.
    pub fn consistency_headers(&self) -> Option<String> {
        self.index.lock().expect("index lock").as_ref().map(|(h, _)| h.clone())
    }
}

/// `keyhole doctor`'s line for each node: (fine, "prod: node 2 of 3
/// http://... is standby"). A node down or sealed is not fine; the
/// cluster still serves while one node of three is.
pub fn doctor_lines(backend: &str, nodes: &[(String, Result<&'static str, String>)]) -> Vec<(bool, String)> {
    let n = nodes.len();
    nodes
        .iter()
        .enumerate()
        .map(|(i, (addr, role))| match role {
            Ok(r @ ("active" | "standby")) => (true, format!("{backend}: node {} of {n} {addr} is {r}", i + 1)),
            Ok(r) => (false, format!("{backend}: node {} of {n} {addr} is {r}", i + 1)),
            Err(e) => (false, format!("{backend}: node {} of {n} {addr} does not answer: {e}", i + 1)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn header(value: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(format!("{{\"cluster\":\"c\",\"value\":\"{value}\"}}"))
    }

    #[test]
    fn which_answers_move_to_the_next_node() {
        for s in [500, 502, 503, 429, 307] {
            assert!(moves_on(s), "{s}");
        }
        for s in [200, 204, 400, 403, 404, 405] {
            assert!(!moves_on(s), "{s}");
        }
    }

    #[test]
    fn the_highest_index_is_kept() {
        let n = Nodes::new(vec!["a".into(), "b".into()]);
        assert_eq!(n.consistency_headers(), None);
        n.saw_index(&header("41"));
        n.saw_index(&header("40")); // a lagging standby's answer
        assert_eq!(n.consistency_headers(), Some(header("41")));
        n.saw_index(&header("52"));
        assert_eq!(n.consistency_headers(), Some(header("52")));
        n.saw_index("not base64 !");
        n.saw_index(&"A".repeat(4096));
        assert_eq!(n.consistency_headers(), Some(header("52")));
        assert_eq!(index_value(&header("x")), None);
    }

    #[test]
    fn requests_start_at_the_node_in_use() {
        let n = Nodes::new(vec!["a".into(), "b".into(), "c".into()]);
        assert_eq!(n.order(), [0, 1, 2]);
        n.answered(2, "t");
        assert_eq!((n.order(), n.in_use(), n.switches()), (vec![2, 0, 1], "c", 1));
        n.answered(2, "t");
        assert_eq!(n.switches(), 1);
    }
}
