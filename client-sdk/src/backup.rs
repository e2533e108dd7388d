//! The backup file of a server's store: what the admin port's `GET /api/backup` streams, `exchangectl
//! backup` downloads and `exchangectl restore` brings back (docs/OPERATIONS.md, "Backup and restore").
//!
//! # Format (version 1)
//! ```text
//! GXBACKUP\n                                     magic line
//! {"format":1,"server":"exchange-node",...}\n    header: one line of JSON (BackupHeader)
//! frames: a tag byte, then big-endian lengths
//!   'T' u32 n, name                              the entries that follow belong to sled tree `name`
//!   'K' u32 n, key, u32 m, value                 one entry of the current tree
//!   'F' u32 n, name, u32 mode, u64 m, bytes      a plain file of the data directory (the audit keys)
//!   'E' u64 trees, u64 entries, u64 files        the end, with the counts
//! 32 bytes                                       SHA-256 of every byte before them
//! ```
//! Nothing may follow the checksum. A frame's lengths are checked against what is left before anything
//! is allocated for it, so a damaged length fails as "truncated" or "corrupt", never as a huge allocation.
//!
//! # Reading is verify-then-apply
//! [`BackupReader`] hands out items as it parses them; only when it reaches the end does it know whether
//! the checksum matches. [`restore_into`] therefore reads the file twice: once to verify it (nothing is
//! created), then to import it into a fresh folder beside the target, which it renames into place only
//! once the second pass has verified again (the file could change in between) and the imported key
//! counts match the file's. A damaged or truncated file leaves the disk as it was.
//!
//! # Secrets
//! A node's backup holds its audit keys (`audit-seal.key`, `audit-hash.key`): whoever has the file can
//! seal a rewritten audit trail. Backup files and restored folders are created mode 0600/0700.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The first line of every backup file.
pub const MAGIC: &[u8] = b"GXBACKUP\n";
/// The format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Where a node keeps its sled database inside its data directory.
pub const NODE_DB_DIR: &str = "node.sled";
/// A file name suffix for backups (what `exchangectl backup` suggests and the servers use for temp files).
pub const FILE_EXTENSION: &str = "gxbak";

const TAG_TREE: u8 = b'T';
const TAG_ENTRY: u8 = b'K';
const TAG_FILE: u8 = b'F';
const TAG_END: u8 = b'E';
/// The header line is small; a file whose first "line" is longer is not a backup.
const MAX_HEADER_BYTES: usize = 64 * 1024;
const MAX_NAME_BYTES: u32 = 4096;
/// Plain files are the audit keys and their public half: anything larger is damage.
const MAX_PLAIN_FILE_BYTES: u64 = 1024 * 1024;
/// Entries per sled batch while importing: large enough that sled's per-batch work is amortised, small
/// enough to bound the memory a batch holds.
const IMPORT_BATCH_ENTRIES: usize = 10_000;
const IMPORT_BATCH_BYTES: usize = 32 * 1024 * 1024;
/// sled's page cache while importing (its 1 GiB default is more than a department server can spare).
const IMPORT_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// Which server's store a backup holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerKind {
    #[serde(rename = "exchange-node")]
    ExchangeNode,
    #[serde(rename = "directory")]
    Directory,
}

impl ServerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ServerKind::ExchangeNode => "exchange-node",
            ServerKind::Directory => "directory",
        }
    }

    /// "an exchange-node", "a directory".
    pub fn with_article(self) -> &'static str {
        match self {
            ServerKind::ExchangeNode => "an exchange-node",
            ServerKind::Directory => "a directory",
        }
    }

    /// Where this server's sled database sits inside its data directory ("" = the data directory itself).
    pub fn db_dir(self) -> &'static str {
        match self {
            ServerKind::ExchangeNode => NODE_DB_DIR,
            ServerKind::Directory => "",
        }
    }
}

impl std::fmt::Display for ServerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ServerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "node" | "exchange-node" => Ok(ServerKind::ExchangeNode),
            "directory" => Ok(ServerKind::Directory),
            other => Err(format!("unknown server kind {other:?}: expected node or directory")),
        }
    }
}

/// The header line: what the file is and where it came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupHeader {
    pub format: u32,
    pub server: ServerKind,
    pub department: String,
    /// The server certificate's name.
    pub certificate: String,
    pub created_unix_ms: i64,
    pub software_version: String,
    /// Where the sled database goes inside the data directory ("" = the data directory itself).
    pub db_dir: String,
}

impl BackupHeader {
    /// A header for a backup made now by this build.
    pub fn new(server: ServerKind, department: &str, certificate: &str) -> Self {
        BackupHeader {
            format: FORMAT_VERSION,
            server,
            department: department.to_string(),
            certificate: certificate.to_string(),
            created_unix_ms: now_unix_ms(),
            software_version: env!("CARGO_PKG_VERSION").to_string(),
            db_dir: server.db_dir().to_string(),
        }
    }
}

/// Keys in one tree of a backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TreeCount {
    /// The tree's name (lossy UTF-8: every tree this project opens has a UTF-8 name).
    pub name: String,
    pub keys: u64,
}

/// What a backup file holds, as written or as verified.
#[derive(Clone, Debug, Serialize)]
pub struct BackupSummary {
    pub header: BackupHeader,
    pub trees: Vec<TreeCount>,
    pub keys: u64,
    pub files: Vec<String>,
    /// The file's size.
    pub bytes: u64,
    /// SHA-256 of the whole file, as `sha256sum` prints it.
    pub sha256: String,
    /// The checksum the file carries (SHA-256 of everything before it), verified.
    pub checksum: String,
    /// How long the server's writers waited while the store was copied (only when the server wrote it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub writes_paused_ms: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("reading the backup: {0}")]
    Read(io::Error),
    #[error("writing the backup: {0}")]
    Write(io::Error),
    #[error("not a gov-exchange backup file: {0}")]
    NotABackup(String),
    #[error("backup format {found} is not supported by this build (it reads format {FORMAT_VERSION}): use the exchangectl of the version that wrote it")]
    UnsupportedFormat { found: u32 },
    #[error("the backup file is truncated: it ends at byte {offset}, before its checksum (an interrupted download or copy?)")]
    Truncated { offset: u64 },
    #[error("the backup file is corrupt at byte {offset}: {reason}")]
    Corrupt { offset: u64, reason: String },
    #[error("the backup file is corrupt: its content hashes to {actual} but its checksum says {expected}")]
    ChecksumMismatch { expected: String, actual: String },
    #[error("this file is {} backup, not {} backup", found.with_article(), expected.with_article())]
    WrongServer { found: ServerKind, expected: ServerKind },
    #[error("{0} is not empty: restore into an empty or new folder, or pass --force to move the existing folder aside (it is kept, never deleted)")]
    TargetNotEmpty(PathBuf),
    #[error("{0} is in use: the server is still running on it. Stop the server, then restore")]
    Locked(PathBuf),
    #[error("sled store: {0}")]
    Store(String),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> BackupError + '_ {
    move |source| BackupError::Io { path: path.to_path_buf(), source }
}

fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

// ---- writing ----

struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes a backup file frame by frame. Call [`BackupWriter::finish`] to write the end and the checksum:
/// a writer dropped without it leaves a file every reader refuses as truncated.
pub struct BackupWriter<W: Write> {
    out: HashingWriter<W>,
    header: BackupHeader,
    trees: Vec<TreeCount>,
    files: Vec<String>,
    keys: u64,
}

fn len_u32(n: usize, what: &str) -> Result<u32, BackupError> {
    u32::try_from(n)
        .map_err(|_| BackupError::Write(io::Error::new(io::ErrorKind::InvalidInput, format!("{what} of {n} bytes is too large"))))
}

impl<W: Write> BackupWriter<W> {
    /// Writes the magic line and the header.
    pub fn new(out: W, header: BackupHeader) -> Result<Self, BackupError> {
        let mut out = HashingWriter { inner: out, hasher: Sha256::new(), bytes: 0 };
        let json = serde_json::to_vec(&header).expect("headers serialize");
        out.write_all(MAGIC).map_err(BackupError::Write)?;
        out.write_all(&json).map_err(BackupError::Write)?;
        out.write_all(b"\n").map_err(BackupError::Write)?;
        Ok(BackupWriter { out, header, trees: Vec::new(), files: Vec::new(), keys: 0 })
    }

    /// Starts a tree: the entries written next belong to it.
    pub fn begin_tree(&mut self, name: &[u8]) -> Result<(), BackupError> {
        if name.len() > MAX_NAME_BYTES as usize {
            return Err(BackupError::Write(io::Error::new(io::ErrorKind::InvalidInput, "tree name too long")));
        }
        let o = &mut self.out;
        o.write_all(&[TAG_TREE]).map_err(BackupError::Write)?;
        o.write_all(&len_u32(name.len(), "tree name")?.to_be_bytes()).map_err(BackupError::Write)?;
        o.write_all(name).map_err(BackupError::Write)?;
        self.trees.push(TreeCount { name: String::from_utf8_lossy(name).into_owned(), keys: 0 });
        Ok(())
    }

    /// One entry of the current tree.
    pub fn entry(&mut self, key: &[u8], value: &[u8]) -> Result<(), BackupError> {
        let Some(tree) = self.trees.last_mut() else {
            return Err(BackupError::Write(io::Error::other("an entry before any tree")));
        };
        let o = &mut self.out;
        o.write_all(&[TAG_ENTRY]).map_err(BackupError::Write)?;
        o.write_all(&len_u32(key.len(), "key")?.to_be_bytes()).map_err(BackupError::Write)?;
        o.write_all(key).map_err(BackupError::Write)?;
        o.write_all(&len_u32(value.len(), "value")?.to_be_bytes()).map_err(BackupError::Write)?;
        o.write_all(value).map_err(BackupError::Write)?;
        tree.keys += 1;
        self.keys += 1;
        Ok(())
    }

    /// Every entry of `tree` under `name`; returns how many. The caller makes sure nothing writes to the
    /// tree meanwhile (sled has no snapshots: an iteration sees writes applied while it runs).
    pub fn tree(&mut self, name: &[u8], tree: &sled::Tree) -> Result<u64, BackupError> {
        self.begin_tree(name)?;
        let mut n = 0;
        for kv in tree.iter() {
            let (k, v) = kv.map_err(|e| BackupError::Store(e.to_string()))?;
            self.entry(&k, &v)?;
            n += 1;
        }
        Ok(n)
    }

    /// Every tree of `db`: those named in `first` first, in that order, then the rest by name.
    ///
    /// Order matters where one tree records how far another is applied (a cursor): copied before the
    /// data it describes, a restored cursor can only lag its data, and replaying a change is harmless
    /// where missing one is not.
    pub fn db(&mut self, db: &sled::Db, first: &[&str]) -> Result<(), BackupError> {
        let mut names: Vec<sled::IVec> = db.tree_names();
        names.sort();
        let rank = |n: &sled::IVec| first.iter().position(|f| f.as_bytes() == n.as_ref()).unwrap_or(first.len());
        names.sort_by_key(|n| rank(n));
        for name in names {
            let tree = db.open_tree(&name).map_err(|e| BackupError::Store(e.to_string()))?;
            self.tree(&name, &tree)?;
        }
        Ok(())
    }

    /// A plain file of the data directory: `name` is a bare file name, restored beside the database.
    pub fn file(&mut self, name: &str, mode: u32, bytes: &[u8]) -> Result<(), BackupError> {
        check_file_name(name).map_err(|reason| BackupError::Write(io::Error::new(io::ErrorKind::InvalidInput, reason)))?;
        if bytes.len() as u64 > MAX_PLAIN_FILE_BYTES {
            return Err(BackupError::Write(io::Error::new(io::ErrorKind::InvalidInput, format!("{name} is larger than 1 MiB"))));
        }
        let o = &mut self.out;
        o.write_all(&[TAG_FILE]).map_err(BackupError::Write)?;
        o.write_all(&len_u32(name.len(), "file name")?.to_be_bytes()).map_err(BackupError::Write)?;
        o.write_all(name.as_bytes()).map_err(BackupError::Write)?;
        o.write_all(&(mode & 0o777).to_be_bytes()).map_err(BackupError::Write)?;
        o.write_all(&(bytes.len() as u64).to_be_bytes()).map_err(BackupError::Write)?;
        o.write_all(bytes).map_err(BackupError::Write)?;
        self.files.push(name.to_string());
        Ok(())
    }

    /// Writes the end frame and the checksum; returns the writer and the summary.
    pub fn finish(mut self) -> Result<(W, BackupSummary), BackupError> {
        let o = &mut self.out;
        o.write_all(&[TAG_END]).map_err(BackupError::Write)?;
        o.write_all(&(self.trees.len() as u64).to_be_bytes()).map_err(BackupError::Write)?;
        o.write_all(&self.keys.to_be_bytes()).map_err(BackupError::Write)?;
        o.write_all(&(self.files.len() as u64).to_be_bytes()).map_err(BackupError::Write)?;
        let HashingWriter { mut inner, hasher, bytes } = self.out;
        let checksum: [u8; 32] = hasher.finalize().into();
        inner.write_all(&checksum).map_err(BackupError::Write)?;
        inner.flush().map_err(BackupError::Write)?;
        // `sha256` (the whole file's hash) is left empty: [`write_backup_file`] fills it in from the file.
        let summary = BackupSummary {
            header: self.header,
            trees: self.trees,
            keys: self.keys,
            files: self.files,
            bytes: bytes + 32,
            sha256: String::new(),
            checksum: hex::encode(checksum),
            writes_paused_ms: None,
        };
        Ok((inner, summary))
    }
}

/// Creates `path` for writing, mode 0600, failing if it exists.
pub fn create_private_file(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)
}

/// The name a file is written under until it is complete.
fn partial_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "backup".into());
    path.with_file_name(format!(".{name}.partial"))
}

/// Writes a backup file at `out` (mode 0600): `fill` writes the frames. The file is written under a
/// temporary name, synced, hashed, and renamed to `out` (replacing it) only when complete, so `out` is
/// never a half-written backup.
pub fn write_backup_file(
    out: &Path,
    header: BackupHeader,
    fill: impl FnOnce(&mut BackupWriter<BufWriter<File>>) -> Result<(), BackupError>,
) -> Result<BackupSummary, BackupError> {
    let partial = partial_path(out);
    match std::fs::remove_file(&partial) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_at(&partial)(e)),
    }
    let result = (|| {
        let file = create_private_file(&partial).map_err(io_at(&partial))?;
        let mut writer = BackupWriter::new(BufWriter::with_capacity(1 << 20, file), header)?;
        fill(&mut writer)?;
        let (buffered, mut summary) = writer.finish()?;
        let file = buffered.into_inner().map_err(|e| io_at(&partial)(e.into_error()))?;
        file.sync_all().map_err(io_at(&partial))?;
        drop(file);
        summary.sha256 = sha256_file(&partial)?;
        std::fs::rename(&partial, out).map_err(io_at(out))?;
        Ok(summary)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// SHA-256 of a whole file, hex.
pub fn sha256_file(path: &Path) -> Result<String, BackupError> {
    let mut f = BufReader::with_capacity(1 << 20, File::open(path).map_err(io_at(path))?);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(io_at(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

// ---- reading ----

struct HashingReader<R: Read> {
    inner: R,
    /// Everything before the checksum.
    content: Sha256,
    /// Everything, as `sha256sum` sees it.
    whole: Sha256,
    offset: u64,
}

impl<R: Read> HashingReader<R> {
    /// Exactly `buf.len()` bytes, or `Truncated`.
    fn exact(&mut self, buf: &mut [u8], hashed: bool) -> Result<(), BackupError> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.inner.read(&mut buf[filled..]) {
                Ok(0) => return Err(BackupError::Truncated { offset: self.offset + filled as u64 }),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(BackupError::Read(e)),
            }
        }
        if hashed {
            self.content.update(&*buf);
        }
        self.whole.update(&*buf);
        self.offset += buf.len() as u64;
        Ok(())
    }

    fn u8(&mut self) -> Result<u8, BackupError> {
        let mut b = [0u8; 1];
        self.exact(&mut b, true)?;
        Ok(b[0])
    }

    fn u32(&mut self) -> Result<u32, BackupError> {
        let mut b = [0u8; 4];
        self.exact(&mut b, true)?;
        Ok(u32::from_be_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, BackupError> {
        let mut b = [0u8; 8];
        self.exact(&mut b, true)?;
        Ok(u64::from_be_bytes(b))
    }

    /// `len` bytes, read as they arrive rather than allocated up front: a damaged length then ends as
    /// `Truncated` at the end of the file instead of as an allocation of gigabytes.
    fn bytes(&mut self, len: u64) -> Result<Vec<u8>, BackupError> {
        let mut out = Vec::with_capacity(len.min(1 << 20) as usize);
        let mut chunk = [0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            self.exact(&mut chunk[..n], true)?;
            out.extend_from_slice(&chunk[..n]);
            left -= n as u64;
        }
        Ok(out)
    }

    fn at_eof(&mut self) -> Result<bool, BackupError> {
        let mut b = [0u8; 1];
        loop {
            match self.inner.read(&mut b) {
                Ok(0) => return Ok(true),
                Ok(_) => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(BackupError::Read(e)),
            }
        }
    }
}

/// One item of a backup, in file order.
#[derive(Debug, PartialEq, Eq)]
pub enum BackupItem {
    /// The entries that follow belong to this tree.
    Tree(Vec<u8>),
    Entry { key: Vec<u8>, value: Vec<u8> },
    File { name: String, mode: u32, bytes: Vec<u8> },
}

/// Reads a backup item by item. Items are handed out before the checksum is known: trust them only
/// once [`BackupReader::next_item`] has returned `Ok(None)` (end reached, checksum verified).
pub struct BackupReader<R: Read> {
    r: HashingReader<R>,
    header: BackupHeader,
    trees: Vec<TreeCount>,
    files: Vec<String>,
    keys: u64,
    summary: Option<BackupSummary>,
}

fn check_file_name(name: &str) -> Result<(), String> {
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
        && Path::new(name).file_name().is_some_and(|n| n == name);
    if plain {
        Ok(())
    } else {
        Err(format!("file name {name:?} is not a plain file name"))
    }
}

impl<R: Read> BackupReader<R> {
    /// Reads and checks the magic line and the header.
    pub fn new(inner: R) -> Result<Self, BackupError> {
        let mut r = HashingReader { inner, content: Sha256::new(), whole: Sha256::new(), offset: 0 };
        let mut magic = [0u8; MAGIC.len()];
        r.exact(&mut magic, true).map_err(|e| match e {
            BackupError::Truncated { .. } => BackupError::NotABackup("it is shorter than the magic line".into()),
            e => e,
        })?;
        if magic != MAGIC {
            return Err(BackupError::NotABackup("it does not start with GXBACKUP".into()));
        }
        let mut line = Vec::new();
        loop {
            let b = r.u8()?;
            if b == b'\n' {
                break;
            }
            line.push(b);
            if line.len() > MAX_HEADER_BYTES {
                return Err(BackupError::NotABackup("its header line is longer than 64 KiB".into()));
            }
        }
        // The format number first: a newer header may not parse as this build's header.
        let value: serde_json::Value = serde_json::from_slice(&line)
            .map_err(|e| BackupError::Corrupt { offset: MAGIC.len() as u64, reason: format!("header: {e}") })?;
        let format = value.get("format").and_then(serde_json::Value::as_u64).unwrap_or(0);
        if format != u64::from(FORMAT_VERSION) {
            return Err(BackupError::UnsupportedFormat { found: u32::try_from(format).unwrap_or(u32::MAX) });
        }
        let header: BackupHeader = serde_json::from_value(value)
            .map_err(|e| BackupError::Corrupt { offset: MAGIC.len() as u64, reason: format!("header: {e}") })?;
        if header.db_dir != header.server.db_dir() {
            return Err(BackupError::Corrupt {
                offset: MAGIC.len() as u64,
                reason: format!("header: db_dir {:?} is not where a {} keeps its database", header.db_dir, header.server),
            });
        }
        Ok(BackupReader { r, header, trees: Vec::new(), files: Vec::new(), keys: 0, summary: None })
    }

    pub fn header(&self) -> &BackupHeader {
        &self.header
    }

    /// The summary, once the end was reached and verified.
    pub fn summary(&self) -> Option<&BackupSummary> {
        self.summary.as_ref()
    }

    fn corrupt(&self, at: u64, reason: impl Into<String>) -> BackupError {
        BackupError::Corrupt { offset: at, reason: reason.into() }
    }

    /// The next item; `Ok(None)` once the end frame and the checksum are read and verified.
    pub fn next_item(&mut self) -> Result<Option<BackupItem>, BackupError> {
        if self.summary.is_some() {
            return Ok(None);
        }
        let at = self.r.offset;
        match self.r.u8()? {
            TAG_TREE => {
                let n = self.r.u32()?;
                if n > MAX_NAME_BYTES {
                    return Err(self.corrupt(at, format!("a tree name of {n} bytes")));
                }
                let name = self.r.bytes(u64::from(n))?;
                self.trees.push(TreeCount { name: String::from_utf8_lossy(&name).into_owned(), keys: 0 });
                Ok(Some(BackupItem::Tree(name)))
            }
            TAG_ENTRY => {
                if self.trees.is_empty() {
                    return Err(self.corrupt(at, "an entry before any tree"));
                }
                let n = self.r.u32()?;
                let key = self.r.bytes(u64::from(n))?;
                let m = self.r.u32()?;
                let value = self.r.bytes(u64::from(m))?;
                self.trees.last_mut().expect("checked").keys += 1;
                self.keys += 1;
                Ok(Some(BackupItem::Entry { key, value }))
            }
            TAG_FILE => {
                let n = self.r.u32()?;
                if n > MAX_NAME_BYTES {
                    return Err(self.corrupt(at, format!("a file name of {n} bytes")));
                }
                let name = String::from_utf8(self.r.bytes(u64::from(n))?)
                    .map_err(|_| self.corrupt(at, "a file name that is not UTF-8"))?;
                check_file_name(&name).map_err(|reason| self.corrupt(at, reason))?;
                let mode = self.r.u32()?;
                if mode & !0o777 != 0 {
                    return Err(self.corrupt(at, format!("file {name}: mode {mode:o}")));
                }
                let len = self.r.u64()?;
                if len > MAX_PLAIN_FILE_BYTES {
                    return Err(self.corrupt(at, format!("file {name}: {len} bytes")));
                }
                let bytes = self.r.bytes(len)?;
                self.files.push(name.clone());
                Ok(Some(BackupItem::File { name, mode, bytes }))
            }
            TAG_END => {
                let trees = self.r.u64()?;
                let keys = self.r.u64()?;
                let files = self.r.u64()?;
                let content = std::mem::replace(&mut self.r.content, Sha256::new());
                let actual: [u8; 32] = content.finalize().into();
                let mut expected = [0u8; 32];
                self.r.exact(&mut expected, false)?;
                if actual != expected {
                    return Err(BackupError::ChecksumMismatch { expected: hex::encode(expected), actual: hex::encode(actual) });
                }
                if (trees, keys, files) != (self.trees.len() as u64, self.keys, self.files.len() as u64) {
                    return Err(self.corrupt(
                        at,
                        format!(
                            "the end frame counts {trees} trees, {keys} keys, {files} files; the file holds {}, {}, {}",
                            self.trees.len(),
                            self.keys,
                            self.files.len()
                        ),
                    ));
                }
                if !self.r.at_eof()? {
                    return Err(self.corrupt(self.r.offset, "data after the checksum"));
                }
                let whole = std::mem::replace(&mut self.r.whole, Sha256::new());
                self.summary = Some(BackupSummary {
                    header: self.header.clone(),
                    trees: std::mem::take(&mut self.trees),
                    keys: self.keys,
                    files: std::mem::take(&mut self.files),
                    bytes: self.r.offset,
                    sha256: hex::encode(whole.finalize()),
                    checksum: hex::encode(actual),
                    writes_paused_ms: None,
                });
                Ok(None)
            }
            other => Err(self.corrupt(at, format!("unknown frame type 0x{other:02x}"))),
        }
    }
}

/// Reads the whole file and checks its structure, counts and checksum. Writes nothing.
pub fn verify_file(path: &Path) -> Result<BackupSummary, BackupError> {
    let file = File::open(path).map_err(io_at(path))?;
    let mut reader = BackupReader::new(BufReader::with_capacity(1 << 20, file))?;
    while reader.next_item()?.is_some() {}
    Ok(reader.summary().cloned().expect("the end was reached"))
}

// ---- restoring ----

/// How [`restore_into`] treats the target.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// Refuse a backup of another kind of server.
    pub expect_server: Option<ServerKind>,
    /// Move a non-empty target aside (to `<target>.before-restore-<time>`) instead of refusing.
    pub force: bool,
}

/// What [`restore_into`] did.
#[derive(Clone, Debug, Serialize)]
pub struct RestoreSummary {
    pub backup: BackupSummary,
    pub data_dir: PathBuf,
    /// Where the folder that was in the way went (only with `force`).
    pub moved_aside: Option<PathBuf>,
}

/// Whether a sled database at `db_path` is held by a running process. Opening it is the only test sled
/// offers; an unlocked database is closed again at once.
fn sled_in_use(db_path: &Path) -> Result<bool, BackupError> {
    if !db_path.join("conf").exists() && !db_path.join("db").exists() {
        return Ok(false);
    }
    match sled::Config::new().path(db_path).cache_capacity(1 << 20).open() {
        Ok(db) => {
            drop(db);
            Ok(false)
        }
        Err(e) if e.to_string().contains("could not acquire lock") => Ok(true),
        // Unreadable as a database: not in use by a server at least; the restore moves it aside or refuses.
        Err(_) => Ok(false),
    }
}

fn dir_is_empty(dir: &Path) -> Result<bool, BackupError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(io_at(dir)(e)),
    }
}

fn create_private_dir(path: &Path) -> io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(path)
}

fn sync_dir(dir: &Path) {
    // Makes renames in `dir` durable; best effort (not every platform can open a folder).
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

fn store_err(e: sled::Error) -> BackupError {
    BackupError::Store(e.to_string())
}

/// Opens a sled database, waiting up to `wait` for a handle this process just dropped to let go of the
/// file lock (sled releases it once its background threads finish).
fn open_waiting(path: &Path, wait: Duration) -> Result<sled::Db, BackupError> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        match sled::Config::new().path(path).cache_capacity(IMPORT_CACHE_BYTES).open() {
            Err(e) if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            result => return result.map_err(store_err),
        }
    }
}

/// Imports the (already verified) file into `dir`; verifies the checksum again on the way and checks the
/// imported key counts against the file's.
fn import(file: &Path, dir: &Path, summary: &BackupSummary) -> Result<BackupSummary, BackupError> {
    let db_path = dir.join(&summary.header.db_dir);
    let mut reader = BackupReader::new(BufReader::with_capacity(1 << 20, File::open(file).map_err(io_at(file))?))?;
    if reader.header() != &summary.header {
        return Err(BackupError::Corrupt { offset: 0, reason: "the file changed while it was being restored".into() });
    }
    let db = sled::Config::new().path(&db_path).cache_capacity(IMPORT_CACHE_BYTES).open().map_err(store_err)?;
    let mut tree: Option<sled::Tree> = None;
    let mut batch = sled::Batch::default();
    let (mut batch_entries, mut batch_bytes) = (0usize, 0usize);
    let flush_batch = |tree: &Option<sled::Tree>, batch: &mut sled::Batch| -> Result<(), BackupError> {
        if let Some(t) = tree {
            t.apply_batch(std::mem::take(batch)).map_err(store_err)?;
        }
        Ok(())
    };
    while let Some(item) = reader.next_item()? {
        match item {
            BackupItem::Tree(name) => {
                flush_batch(&tree, &mut batch)?;
                (batch_entries, batch_bytes) = (0, 0);
                tree = Some(db.open_tree(name).map_err(store_err)?);
            }
            BackupItem::Entry { key, value } => {
                batch_bytes += key.len() + value.len();
                batch_entries += 1;
                batch.insert(key, value);
                if batch_entries >= IMPORT_BATCH_ENTRIES || batch_bytes >= IMPORT_BATCH_BYTES {
                    flush_batch(&tree, &mut batch)?;
                    (batch_entries, batch_bytes) = (0, 0);
                }
            }
            BackupItem::File { name, mode, bytes } => {
                let path = dir.join(&name);
                let mut options = OpenOptions::new();
                options.write(true).create_new(true);
                #[cfg(unix)]
                {
                    use std::os::unix::fs::OpenOptionsExt;
                    options.mode(mode);
                }
                let mut f = options.open(&path).map_err(io_at(&path))?;
                f.write_all(&bytes).and_then(|()| f.sync_all()).map_err(io_at(&path))?;
            }
        }
    }
    flush_batch(&tree, &mut batch)?;
    db.flush().map_err(store_err)?;
    drop(tree);
    drop(db);
    let verified = reader.summary().cloned().expect("the end was reached");
    if verified.checksum != summary.checksum {
        return Err(BackupError::Corrupt { offset: 0, reason: "the file changed while it was being restored".into() });
    }
    // Read back what was imported: the database must hold exactly what the file does.
    let db = open_waiting(&db_path, Duration::from_secs(10))?;
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    for t in &verified.trees {
        *expected.entry(t.name.clone()).or_default() += t.keys;
    }
    for (name, keys) in &expected {
        let found = db.open_tree(name.as_bytes()).map_err(store_err)?.len() as u64;
        if found != *keys {
            return Err(BackupError::Store(format!("tree {name}: {found} keys imported, the file holds {keys}")));
        }
    }
    db.flush().map_err(store_err)?;
    Ok(verified)
}

/// Restores a backup file into `target_dir` (the server's `data_dir`), which the server must not be
/// using. The file is verified first (a damaged file changes nothing on disk); the database and files
/// are then created in a fresh folder beside the target and renamed into place. A non-empty target is
/// refused unless `force`, which moves it aside (never deletes it).
pub fn restore_into(file: &Path, target_dir: &Path, options: &RestoreOptions) -> Result<RestoreSummary, BackupError> {
    let summary = verify_file(file)?;
    if let Some(expected) = options.expect_server {
        if summary.header.server != expected {
            return Err(BackupError::WrongServer { found: summary.header.server, expected });
        }
    }
    let target = if target_dir.is_absolute() {
        target_dir.to_path_buf()
    } else {
        std::env::current_dir().map_err(io_at(target_dir))?.join(target_dir)
    };
    let name = target
        .file_name()
        .ok_or_else(|| BackupError::Io {
            path: target.clone(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "the data directory needs a folder name"),
        })?
        .to_string_lossy()
        .into_owned();
    let parent = target.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"));
    if sled_in_use(&target.join(&summary.header.db_dir))? {
        return Err(BackupError::Locked(target));
    }
    let empty = dir_is_empty(&target)?;
    if !empty && !options.force {
        return Err(BackupError::TargetNotEmpty(target));
    }
    std::fs::create_dir_all(&parent).map_err(io_at(&parent))?;
    let staging = parent.join(format!(".{name}.restoring-{}", now_unix_ms()));
    create_private_dir(&staging).map_err(io_at(&staging))?;
    let verified = match import(file, &staging, &summary) {
        Ok(v) => v,
        Err(e) => {
            // Only what this call created: the staging folder.
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    let mut moved_aside = None;
    if target.exists() {
        if empty {
            std::fs::remove_dir(&target).map_err(io_at(&target))?;
        } else {
            let aside = parent.join(format!("{name}.before-restore-{}", now_unix_ms()));
            std::fs::rename(&target, &aside).map_err(io_at(&target))?;
            moved_aside = Some(aside);
        }
    }
    std::fs::rename(&staging, &target).map_err(io_at(&target))?;
    sync_dir(&parent);
    Ok(RestoreSummary { backup: verified, data_dir: target, moved_aside })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) -> (PathBuf, BackupSummary) {
        // Not `temporary`: sled deletes a temporary database in the background after it is dropped, which
        // would race with tests that compare the folder before and after.
        let db = sled::Config::new().path(dir.join("src.sled")).open().unwrap();
        let meta = db.open_tree("policy_meta").unwrap();
        meta.insert("catalog_version", &7u64.to_be_bytes()).unwrap();
        let records = db.open_tree("records").unwrap();
        for i in 0..2500u32 {
            records.insert(format!("k{i:05}"), format!("value {i}").as_bytes()).unwrap();
        }
        db.insert("registration", b"r".as_slice()).unwrap();
        let out = dir.join("b.gxbak");
        let header = BackupHeader::new(ServerKind::ExchangeNode, "tax", "tax-node");
        let summary = write_backup_file(&out, header, |w| {
            w.file("audit-seal.key", 0o600, b"secret")?;
            w.db(&db, &["policy_meta"])
        })
        .unwrap();
        (out, summary)
    }

    #[test]
    fn written_then_verified_and_restored() {
        let dir = tempfile::tempdir().unwrap();
        let (out, written) = sample(dir.path());
        assert_eq!(written.trees[0].name, "policy_meta", "cursor trees come first");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let verified = verify_file(&out).unwrap();
        assert_eq!(verified.keys, 2502);
        assert_eq!(verified.checksum, written.checksum);
        assert_eq!(verified.sha256, written.sha256);
        assert_eq!(verified.sha256, sha256_file(&out).unwrap());
        assert_eq!(verified.bytes, std::fs::metadata(&out).unwrap().len());

        let target = dir.path().join("restored");
        let restored = restore_into(&out, &target, &RestoreOptions::default()).unwrap();
        assert_eq!(restored.moved_aside, None);
        assert_eq!(std::fs::read(target.join("audit-seal.key")).unwrap(), b"secret");
        let db = open_waiting(&target.join(NODE_DB_DIR), Duration::from_secs(10)).unwrap();
        assert_eq!(db.open_tree("records").unwrap().len(), 2500);
        assert_eq!(db.get("registration").unwrap().unwrap().as_ref(), b"r");
        drop(db);

        // Non-empty: refused without --force, moved aside (kept) with it.
        let err = restore_into(&out, &target, &RestoreOptions::default()).unwrap_err();
        assert!(matches!(err, BackupError::TargetNotEmpty(_)), "{err}");
        let wrong = RestoreOptions { expect_server: Some(ServerKind::Directory), force: true };
        assert!(matches!(restore_into(&out, &target, &wrong).unwrap_err(), BackupError::WrongServer { .. }));
        std::thread::sleep(Duration::from_millis(5));
        let again = restore_into(&out, &target, &RestoreOptions { force: true, ..Default::default() }).unwrap();
        let aside = again.moved_aside.expect("moved aside");
        assert!(aside.join("audit-seal.key").exists());
        assert!(target.join("audit-seal.key").exists());
    }

    #[test]
    fn a_running_server_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let (out, _) = sample(dir.path());
        let target = dir.path().join("live");
        let _running = sled::Config::new().path(target.join(NODE_DB_DIR)).open().unwrap();
        let err = restore_into(&out, &target, &RestoreOptions { force: true, ..Default::default() }).unwrap_err();
        assert!(matches!(err, BackupError::Locked(_)), "{err}");
    }

    fn entries_in(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn damage_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let (out, _) = sample(dir.path());
        let bytes = std::fs::read(&out).unwrap();
        let before = entries_in(dir.path());
        let target = dir.path().join("restored");

        // Every single flipped bit in a sample of positions, header and trailer included.
        for pos in (0..bytes.len()).step_by(251).chain([bytes.len() - 1, bytes.len() - 40]) {
            let mut damaged = bytes.clone();
            damaged[pos] ^= 0x10;
            std::fs::write(dir.path().join("damaged"), &damaged).unwrap();
            let err = restore_into(&dir.path().join("damaged"), &target, &RestoreOptions::default()).unwrap_err();
            assert!(
                matches!(
                    err,
                    BackupError::ChecksumMismatch { .. }
                        | BackupError::Corrupt { .. }
                        | BackupError::Truncated { .. }
                        | BackupError::NotABackup(_)
                        | BackupError::UnsupportedFormat { .. }
                ),
                "byte {pos}: {err}"
            );
            assert!(!target.exists(), "byte {pos}: nothing is written");
        }
        for len in [0, 5, MAGIC.len() + 3, bytes.len() / 2, bytes.len() - 1, bytes.len() - 32] {
            std::fs::write(dir.path().join("damaged"), &bytes[..len]).unwrap();
            let err = restore_into(&dir.path().join("damaged"), &target, &RestoreOptions::default()).unwrap_err();
            assert!(matches!(err, BackupError::Truncated { .. } | BackupError::NotABackup(_)), "{len}: {err}");
            assert!(!target.exists());
        }
        let mut longer = bytes.clone();
        longer.push(0);
        std::fs::write(dir.path().join("damaged"), &longer).unwrap();
        let err = verify_file(&dir.path().join("damaged")).unwrap_err();
        assert!(err.to_string().contains("after the checksum"), "{err}");
        std::fs::remove_file(dir.path().join("damaged")).unwrap();
        assert_eq!(entries_in(dir.path()), before, "no staging folder left behind");
    }

    #[test]
    fn a_frame_length_pointing_past_the_end_is_truncation_not_an_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let (out, _) = sample(dir.path());
        let mut bytes = std::fs::read(&out).unwrap();
        let header_end = bytes.iter().skip(MAGIC.len()).position(|&b| b == b'\n').unwrap() + MAGIC.len() + 1;
        // The first frame is the file: tag, name length; make the name length huge.
        assert_eq!(bytes[header_end], TAG_FILE);
        bytes[header_end + 1..header_end + 5].copy_from_slice(&u32::MAX.to_be_bytes());
        std::fs::write(&out, &bytes).unwrap();
        let err = verify_file(&out).unwrap_err();
        assert!(matches!(err, BackupError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn file_names_cannot_leave_the_data_directory() {
        for bad in ["", ".", "..", "../x", "a/b", "/etc/passwd"] {
            assert!(check_file_name(bad).is_err(), "{bad}");
        }
        assert!(check_file_name("audit-seal.key").is_ok());
        let mut w = BackupWriter::new(Vec::new(), BackupHeader::new(ServerKind::Directory, "central", "directory")).unwrap();
        assert!(w.file("../x", 0o600, b"").is_err());
    }
}

/// A fresh name for a temporary backup file in `data_dir` (a server writes there, streams it, then removes
/// it). Hidden, and never picked up by a later backup, which copies only the database and key files.
pub fn temp_backup_path(data_dir: &Path) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    data_dir.join(format!(".backup-{now}-{}-{n}.{FILE_EXTENSION}", std::process::id()))
}
