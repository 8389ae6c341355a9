//! Per-caller inodes of leased files (`dynamic:`/`cert:`).
//!
//! A leased file shows each caller its own content, but the kernel keeps
//! one page cache per inode: `sendfile`/`splice` read through it even when
//! the open was answered with direct I/O (Linux >= 6.5), and a short read
//! there sets the inode's size. With one inode for every container of a
//! workload, container B's `cat` (busybox: sendfile) read container A's
//! certificate and key whenever A had read it between B's open and B's
//! read, and read its own file cut to A's length otherwise.
//!
//! So a lookup of a leased name answers an inode of the caller's own —
//! one per (file, holder), holder as [`crate::lease::Holder`] keys leases —
//! with no entry or attribute caching, so every path walk asks again and
//! each caller lands on its own inode. An open checks that the inode it
//! came through is the opener's: no caller ever opens (and fills or
//! reads the pages of) another's.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::Mutex;

/// Per-caller inode numbers live above every counted one.
const HIGH: u64 = 1 << 62;
/// Most per-caller inodes remembered; past it they are all forgotten (a
/// forgotten one is looked up again on the next path walk).
const MAX: usize = 65_536;

#[derive(Default)]
struct Inner {
    by_key: HashMap<(u64, String), u64>,
    by_ino: HashMap<u64, (u64, String)>,
}

/// The per-caller inodes of one mount's leased files.
#[derive(Default)]
pub struct LeasedInodes(Mutex<Inner>);

impl std::fmt::Debug for LeasedInodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeasedInodes").finish_non_exhaustive()
    }
}

impl LeasedInodes {
    /// The inode `holder` sees for the leased file of inode `base`:
    /// random in the high range, so one never names another's, not even
    /// across a takeover (which forgets them all).
    pub fn ino_for(&self, base: u64, holder: &str) -> u64 {
        let mut m = self.0.lock().expect("leased inodes lock");
        if let Some(ino) = m.by_key.get(&(base, holder.to_owned())) {
            return *ino;
        }
        if m.by_key.len() >= MAX {
            m.by_key.clear();
            m.by_ino.clear();
        }
        let ino = loop {
            let mut b = [0u8; 8];
            // Without randomness, a counter: still unique in this broker.
            let r = match getrandom::fill(&mut b) {
                Ok(()) => u64::from_ne_bytes(b),
                Err(_) => m.by_ino.len() as u64 + 1,
            };
            let ino = HIGH | (r & (HIGH - 1));
            if !m.by_ino.contains_key(&ino) {
                break ino;
            }
        };
        m.by_key.insert((base, holder.to_owned()), ino);
        m.by_ino.insert(ino, (base, holder.to_owned()));
        ino
    }

    /// The base inode a per-caller inode stands for (None if `ino` is none).
    pub fn base_of(&self, ino: u64) -> Option<u64> {
        if ino & HIGH == 0 {
            return None;
        }
        self.0.lock().expect("leased inodes lock").by_ino.get(&ino).map(|(b, _)| *b)
    }

    /// Whether `ino` is `holder`'s own inode of a leased file.
    pub fn owned_by(&self, ino: u64, holder: &str) -> bool {
        self.0.lock().expect("leased inodes lock").by_ino.get(&ino).is_some_and(|(_, h)| h == holder)
    }
}

/// The holder key of a caller at lookup, when attestation cannot say yet
/// (its container is not described): the container its cgroup names, or
/// its uid. An open attests for real and refuses a mismatch.
pub fn claimed_holder(pid: i32, uid: u32) -> String {
    let claimed = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|c| crate::identity::cgroup::container_id(&c).ok().flatten());
    claimed.unwrap_or_else(|| format!("uid:{uid}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_holder_has_its_own_inode_of_each_file() {
        let l = LeasedInodes::default();
        let a = l.ino_for(7, "aaaa");
        let b = l.ino_for(7, "bbbb");
        assert_ne!(a, b);
        assert_eq!(l.ino_for(7, "aaaa"), a);
        assert_ne!(l.ino_for(8, "aaaa"), a);
        assert_eq!((l.base_of(a), l.base_of(b), l.base_of(7)), (Some(7), Some(7), None));
        assert!(l.owned_by(a, "aaaa") && !l.owned_by(a, "bbbb") && !l.owned_by(7, "aaaa"));
    }
}
