//! Files that hold or guard the master key must be private to the
//! broker: the checks (and fixes, for an empty directory) of the state
//! dir, the run dir, the key and passphrase files, and reading the key.
#![forbid(unsafe_code)]

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, bail};

use crate::backend::local::KeyMaterial;
use crate::config::{Config, KeySource};
use crate::crypto::MasterKey;
use crate::secret::SecretBytes;

/// Why a file or directory is not private to this process, if it is not.
pub enum NotPrivate {
    /// Someone else owns it.
    Owner { owner: u32, me: u32 },
    /// Group or others have some access (the permission bits).
    Mode(u32),
}

/// Whether `md` is private to us: ours, with no access for group or others.
pub fn not_private(md: &fs::Metadata) -> Option<NotPrivate> {
    let me = euid();
    if md.uid() != me {
        return Some(NotPrivate::Owner { owner: md.uid(), me });
    }
    let mode = md.mode() & 0o7777;
    (mode & 0o077 != 0).then_some(NotPrivate::Mode(mode))
}

/// Refuse a file or directory that others could read or write, or that
/// belongs to someone else: it would hold or guard the master key.
pub(super) fn check_private(path: &Path, what: &str) -> anyhow::Result<()> {
    let md = fs::metadata(path).with_context(|| format!("cannot stat {what} {}", path.display()))?;
    let p = path.display();
    match not_private(&md) {
        None => Ok(()),
        Some(NotPrivate::Owner { owner, me }) => {
            bail!("{what} {p} belongs to uid {owner}, not to the broker's uid {me}; fix with: chown {me} {p}")
        }
        Some(NotPrivate::Mode(mode)) => {
            let want = if md.is_dir() { "0700" } else { "0400" };
            bail!("{what} {p} has mode {mode:04o}: group and others must have no access; fix with: chmod {want} {p}")
        }
    }
}

/// The run dir holds `admin.sock` and `takeover.sock`: whoever may
/// rename or create entries in it could put their own sockets there.
/// It must be ours and writable by nobody else (0755, as created, is fine).
pub(super) fn check_run_dir(path: &Path) -> anyhow::Result<()> {
    let md = fs::metadata(path).with_context(|| format!("cannot stat run dir {}", path.display()))?;
    let (p, me) = (path.display(), euid());
    if !md.is_dir() {
        bail!("run dir {p} is not a directory");
    }
    if md.uid() != me {
        bail!(
            "run dir {p} belongs to uid {}, not to the broker's uid {me}: its owner could replace admin.sock; \
             fix with: chown {me} {p}",
            md.uid()
        );
    }
    let mode = md.mode() & 0o7777;
    if mode & 0o022 != 0 {
        bail!(
            "run dir {p} has mode {mode:04o}: group and others must not write to it (they could replace \
             admin.sock); fix with: chmod 0755 {p}"
        );
    }
    Ok(())
}

fn euid() -> u32 {
    // /proc/self is owned by our effective uid: a safe way to learn it.
    fs::metadata("/proc/self").map_or(0, |m| m.uid())
}

pub(super) fn private_dir(path: &Path, what: &str) -> anyhow::Result<()> {
    if !path.exists() {
        fs::create_dir_all(path).with_context(|| format!("cannot create {what} {}", path.display()))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))?;
    }
    // An empty directory holds nothing yet (e.g. a fresh Docker volume,
    // created 0755): make it private rather than refuse it.
    let empty = fs::read_dir(path).map(|mut d| d.next().is_none()).unwrap_or(false);
    if empty && fs::metadata(path)?.mode() & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))?;
        tracing::info!(path = %path.display(), "made the empty {what} private (0700)");
    }
    check_private(path, what)
}

/// Write a new file that nobody else can read, durably.
fn create_private_file(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

pub(super) fn read_key(config: &Config) -> anyhow::Result<KeyMaterial> {
    match &config.key {
        KeySource::KeyFile(path) if path.exists() => {
            check_private(path, "master key file")?;
            let bytes = zeroize::Zeroizing::new(
                fs::read(path).with_context(|| format!("cannot read master key {}", path.display()))?,
            );
            let key = MasterKey::from_bytes(&bytes).with_context(|| {
                format!("master key {} is {} bytes; it must be exactly {}", path.display(), bytes.len(), MasterKey::LEN)
            })?;
            Ok(KeyMaterial::Key(key))
        }
        KeySource::KeyFile(path) => {
            if config.store_file().exists() {
                bail!(
                    "the store {} exists but its master key {} is missing: restore the key file (a new key cannot open the store)",
                    config.store_file().display(),
                    path.display()
                );
            }
            let key = MasterKey::generate()?;
            create_private_file(path, key.expose(), 0o400)?;
            tracing::info!(path = %path.display(), "created a new master key");
            Ok(KeyMaterial::Key(key))
        }
        KeySource::Passphrase(path) => {
            check_private(path, "passphrase file")?;
            let mut raw = fs::read(path).with_context(|| format!("cannot read passphrase file {}", path.display()))?;
            let trimmed = raw.strip_suffix(b"\n").unwrap_or(&raw).len();
            raw.truncate(trimmed);
            if raw.is_empty() {
                bail!("passphrase file {} is empty", path.display());
            }
            Ok(KeyMaterial::Passphrase(SecretBytes::take(&mut raw)))
        }
    }
}
