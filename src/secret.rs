//! Secret values and secret paths.
//!
//! [`SecretBytes`] is the only type that holds a secret value. It owns
//! whole pages, locked in RAM and excluded from core dumps, zeroes them on
//! drop, has no `Debug`/`Display`/`Serialize`, and hands out its bytes only
//! through [`SecretBytes::expose`].

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use zeroize::Zeroize;

static LIVE: AtomicU64 = AtomicU64::new(0);
static LOCKED: AtomicU64 = AtomicU64::new(0);

/// A secret value in locked, page-aligned memory that is zeroed on drop.
pub struct SecretBytes {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
    locked: bool,
}

// SAFETY: SecretBytes owns its allocation exclusively (like Box<[u8]>); it
// has no interior mutability, so sharing `&SecretBytes` across threads
// only allows concurrent reads.
unsafe impl Send for SecretBytes {}
// SAFETY: as above.
unsafe impl Sync for SecretBytes {}

impl SecretBytes {
    /// Copy `bytes` into a new locked buffer. The caller should zeroize its
    /// own copy afterwards (see [`SecretBytes::take`]).
    pub fn copy_from(bytes: &[u8]) -> Self {
        let page = crate::sys::page_size();
        // At least one page, so the pointer is never dangling and the
        // buffer never shares a page with another allocation.
        let size = bytes.len().max(1).div_ceil(page) * page;
        // Invariant: page is a power of two and size a multiple of it,
        // below isize::MAX for any value that fits in memory.
        let layout = Layout::from_size_align(size, page).expect("page-aligned layout");
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else { std::alloc::handle_alloc_error(layout) };
        // SAFETY: `raw` is a fresh allocation of `size` >= bytes.len() bytes
        // that does not overlap `bytes`.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), raw, bytes.len()) };
        // SAFETY: the allocation is ours, page-aligned and a whole number of
        // pages, so no other object shares its pages.
        let locked = unsafe { crate::sys::lock_pages(raw, size) };
        LIVE.fetch_add(1, Ordering::Relaxed);
        if locked {
            LOCKED.fetch_add(1, Ordering::Relaxed);
        }
        Self { ptr, len: bytes.len(), layout, locked }
    }

    /// Move a value out of a plain buffer (e.g. a decoded request),
    /// zeroizing the buffer.
    pub fn take(buf: &mut Vec<u8>) -> Self {
        let s = Self::copy_from(buf);
        buf.zeroize();
        s
    }

    /// The secret bytes. Every use is a place a value can leak: keep them few.
    pub fn expose(&self) -> &[u8] {
        // SAFETY: ptr is valid for `len` initialized bytes for our lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// (buffers alive, buffers the kernel locked) across the process.
    pub fn counts() -> (u64, u64) {
        (LIVE.load(Ordering::Relaxed), LOCKED.load(Ordering::Relaxed))
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        let size = self.layout.size();
        // SAFETY: we own `size` bytes at ptr; zeroize through a slice so the
        // writes are not optimized away.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), size) }.zeroize();
        // SAFETY: the same whole-page range that lock_pages was given.
        unsafe { crate::sys::unlock_pages(self.ptr.as_ptr(), size) };
        if self.locked {
            LOCKED.fetch_sub(1, Ordering::Relaxed);
        }
        LIVE.fetch_sub(1, Ordering::Relaxed);
        // SAFETY: allocated in copy_from with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

impl Clone for SecretBytes {
    fn clone(&self) -> Self {
        Self::copy_from(self.expose())
    }
}

impl PartialEq for SecretBytes {
    /// Constant-time in the length of the values.
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (self.expose(), other.expose());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes(<{} bytes redacted>)", self.len)
    }
}

/// Generate `n` characters from `[A-Za-z0-9]` (5.95 bits each) by
/// rejection sampling, so every character is equally likely.
pub fn generate_alnum(n: usize) -> Result<SecretBytes, getrandom::Error> {
    const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = zeroize::Zeroizing::new(Vec::with_capacity(n));
    let mut pool = zeroize::Zeroizing::new([0u8; 64]);
    while out.len() < n {
        getrandom::fill(&mut pool[..])?;
        // 248 = 4 * 62: bytes at or above it would bias the result.
        let missing = n - out.len();
        out.extend(pool.iter().filter(|&&b| b < 248).map(|&b| ALPHABET[(b % 62) as usize]).take(missing));
    }
    Ok(SecretBytes::copy_from(&out))
}

/// Longest secret path, in bytes.
pub const MAX_PATH_LEN: usize = 256;

/// A validated secret path: `/`-joined segments of `[A-Za-z0-9._-]`, no
/// empty, `.` or `..` segment, at most [`MAX_PATH_LEN`] bytes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SecretPath(String);

impl TryFrom<String> for SecretPath {
    type Error = PathError;

    fn try_from(s: String) -> Result<Self, PathError> {
        // A grant of a template names it by its reserved path.
        if let Some(name) = s.strip_prefix(TEMPLATE_PREFIX) {
            return SecretPath::template(name);
        }
        // A stored grant of a lease source (`dynamic:NAME`, `cert:NAME`).
        if let Some((kind, name)) = s.split_once(':') {
            if matches!(kind, "dynamic" | "cert") && crate::policy::check_source_name(name).is_ok() {
                return Ok(Self(s));
            }
        }
        validate_path(&s)?;
        Ok(Self(s))
    }
}

/// Where a template is shown among secret paths: `@template/NAME`. No
/// secret path can start so (`@` is not allowed in one), so a template
/// grant never clashes with a secret.
pub const TEMPLATE_PREFIX: &str = "@template/";

impl SecretPath {
    /// The reserved path of template `name` (one segment, see
    /// [`crate::template::check_name`]).
    pub fn template(name: &str) -> Result<Self, PathError> {
        validate_path(name)?;
        if name.contains('/') {
            return Err(PathError::BadChar(name.find('/').unwrap_or(0)));
        }
        Ok(Self(format!("{TEMPLATE_PREFIX}{name}")))
    }

    /// The template this path names, if it is a template's.
    pub fn template_name(&self) -> Option<&str> {
        self.0.strip_prefix(TEMPLATE_PREFIX)
    }
}

impl From<SecretPath> for String {
    fn from(p: SecretPath) -> String {
        p.0
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("secret path is empty")]
    Empty,
    #[error("secret path is {0} bytes; the limit is {MAX_PATH_LEN}")]
    TooLong(usize),
    #[error("secret path has an empty segment (leading, trailing or double '/')")]
    EmptySegment,
    #[error("secret path has a '.' or '..' segment")]
    DotSegment,
    #[error("secret path has a character outside [A-Za-z0-9._-/] at byte {0}")]
    BadChar(usize),
}

impl SecretPath {
    pub fn parse(s: &str) -> Result<Self, PathError> {
        validate_path(s)?;
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A lease source as a grant names it, `dynamic:NAME` or `cert:NAME`
    /// (see `crate::lease`); the caller checked the name.
    pub(crate) fn leased(kind: &str, name: &str) -> Self {
        Self(format!("{kind}:{name}"))
    }
}

impl fmt::Display for SecretPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn validate_path(s: &str) -> Result<(), PathError> {
    if s.is_empty() {
        return Err(PathError::Empty);
    }
    if s.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong(s.len()));
    }
    if let Some(i) = s.bytes().position(|b| !(b.is_ascii_alphanumeric() || b"._-/".contains(&b))) {
        return Err(PathError::BadChar(i));
    }
    for seg in s.split('/') {
        match seg {
            "" => return Err(PathError::EmptySegment),
            "." | ".." => return Err(PathError::DotSegment),
            _ => {}
        }
    }
    Ok(())
}

/// Check a listing prefix: empty, or a valid path (optionally ending in '/').
pub fn validate_prefix(s: &str) -> Result<(), PathError> {
    match s.strip_suffix('/').unwrap_or(s) {
        "" => Ok(()),
        p => validate_path(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mappings() -> usize {
        std::fs::read_to_string("/proc/self/maps").unwrap().lines().count()
    }

    #[test]
    fn dropped_secrets_give_their_mappings_back() {
        // Warm the allocator up, then hold many secrets at once (each on
        // its own pages, each a split mapping) and drop them all.
        drop((0..2000).map(|_| SecretBytes::copy_from(b"x")).collect::<Vec<_>>());
        let before = mappings();
        let held: Vec<_> = (0..2000).map(|i| SecretBytes::copy_from(&[i as u8; 10])).collect();
        drop(held);
        let after = mappings();
        assert!(after < before + 100, "{before} mappings before, {after} after 2,000 secrets came and went");
    }

    #[test]
    fn paths_accept_the_documented_alphabet() {
        for ok in ["a", "db/password", "prod/db-1/pw_2.txt", "A.b/c", "...a", "x/.hidden"] {
            assert!(SecretPath::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn paths_reject_traversal_and_odd_bytes() {
        use PathError::*;
        let cases: &[(&str, PathError)] = &[
            ("", Empty),
            ("/abs", EmptySegment),
            ("a//b", EmptySegment),
            ("a/", EmptySegment),
            ("..", DotSegment),
            ("a/../b", DotSegment),
            ("./a", DotSegment),
            ("a b", BadChar(1)),
            ("a\0b", BadChar(1)),
            ("é", BadChar(0)),
            ("a\\b", BadChar(1)),
        ];
        for (input, want) in cases {
            assert_eq!(SecretPath::parse(input).unwrap_err(), *want, "{input:?}");
        }
        assert_eq!(SecretPath::parse(&"a".repeat(257)).unwrap_err(), TooLong(257));
        assert!(SecretPath::parse(&"a".repeat(256)).is_ok());
    }

    #[test]
    fn prefixes() {
        assert!(validate_prefix("").is_ok());
        assert!(validate_prefix("db/").is_ok());
        assert!(validate_prefix("db").is_ok());
        assert!(validate_prefix("../").is_err());
    }

    #[test]
    fn secret_bytes_round_trip_and_redact() {
        let s = SecretBytes::copy_from(b"hunter2");
        assert_eq!(s.expose(), b"hunter2");
        assert_eq!(format!("{s:?}"), "SecretBytes(<7 bytes redacted>)");
        assert_eq!(s.clone(), s);
        let empty = SecretBytes::copy_from(b"");
        assert!(empty.is_empty());
        let mut v = b"abc".to_vec();
        let t = SecretBytes::take(&mut v);
        assert_eq!(t.expose(), b"abc");
        assert!(v.is_empty());
    }

    #[test]
    fn generated_values_use_the_alphabet() {
        let g = generate_alnum(1000).unwrap();
        assert_eq!(g.len(), 1000);
        assert!(g.expose().iter().all(u8::is_ascii_alphanumeric));
        assert_ne!(generate_alnum(32).unwrap(), generate_alnum(32).unwrap());
    }
}
