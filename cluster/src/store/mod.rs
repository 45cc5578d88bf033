//! openraft's log and state machine on SQLite.
//!
//! # Files
//!
//! Everything lives under `<data_dir>/raft/`:
//!
//! * `LOCK` — an advisory `flock` held for as long as any store handle is alive, so two Keel
//!   processes can never drive the same raft identity from one data directory.
//! * `log.db` — the raft log ([`log`]): the vote, the last committed and last purged log ids,
//!   and the entries, one JSON document per row keyed by log index.
//! * `state.db` — the state machine ([`state_machine`]): the model's tables
//!   ([`crate::model::SCHEMA`]) plus `raft_state`, which holds the last applied log id and
//!   the last applied membership in the same transaction as the entries' effects.
//! * `snapshot/` — the current snapshot: `<uuid>.db` (a self-contained SQLite copy of
//!   `state.db`) and `current.json` (its openraft metadata and the name of the data file).
//!
//! # Durability
//!
//! Both databases run in WAL mode with `synchronous=FULL`: a commit returns only after its
//! WAL frames are fsynced, and SQLite fsyncs the directory when it creates the WAL. Every
//! acknowledgement openraft sees (the `append` callback, the return of `save_vote`, of
//! `apply`, of `install_snapshot`) comes after such a commit. A database file is created
//! under a temporary name, fully initialised, fsynced and renamed into place (then the
//! directory is fsynced), so a crash never leaves a half-initialised `log.db` or `state.db`
//! behind; snapshot files are written the same way, with `current.json` renamed last as the
//! commit point.
//!
//! # Refusing what is not ours
//!
//! Every database carries `PRAGMA application_id` = [`APPLICATION_ID`] and
//! `user_version` = [`SCHEMA_VERSION`]. An existing file is checked before SQLite opens it for
//! writing: the 100-byte header must be SQLite's with Keel's application id (read straight
//! from the file, so SQLite never even rolls back a foreign hot journal), then a read-only
//! connection checks the schema version, `PRAGMA quick_check` and the expected tables. Any
//! failure is a [`StoreError`] and the file is left exactly as found: never truncated,
//! rewritten or migrated.

mod log;
mod state_machine;
#[cfg(test)]
mod tests;

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use openraft::{AnyError, ErrorSubject, ErrorVerb, StorageIOError};
use rusqlite::{Connection, ErrorCode, OpenFlags};

use crate::types::{LogId, StorageError};

pub use self::log::LogStore;
pub use self::state_machine::{StateMachineStore, StateReader, StateSnapshotBuilder};

/// `PRAGMA application_id` of every Keel raft database: "KEEL" in ASCII.
pub const APPLICATION_ID: u32 = 0x4B45_454C;

/// `PRAGMA user_version` this build writes and understands. There is no migration code yet:
/// a different version is refused rather than guessed at.
pub const SCHEMA_VERSION: i64 = 1;

/// Page size of every database. Fixed because SQLite's backup API cannot restore a snapshot
/// into a WAL-mode database whose page size differs, so every node must agree.
const PAGE_SIZE: u32 = 4096;

/// How long a connection waits for a lock held by the other connection on the same file (the
/// state reader against the writer) before giving up with `SQLITE_BUSY`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";
const SQLITE_HEADER_LEN: usize = 100;
/// Offset of the big-endian application id in the SQLite file header.
const APPLICATION_ID_OFFSET: usize = 68;

/// Opens (creating on first use) the raft log, the state machine and a reader of the state
/// under `<data_dir>/raft/`.
///
/// Fails without touching anything if the directory is in use by another process or holds a
/// file that is not a healthy Keel database of this version.
pub fn open(data_dir: &Path) -> Result<(LogStore, StateMachineStore, StateReader), StoreError> {
    let dir = data_dir.join("raft");
    create_dir_durable(&dir)?;
    let lock = DirLock::acquire(&dir)?;
    let log = LogStore::open(&dir.join("log.db"), lock.clone())?;
    let (sm, reader) = StateMachineStore::open(&dir, lock)?;
    Ok((log, sm, reader))
}

/// Why the raft store could not be opened or an operation on it failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is locked by another process using the same data directory: \
         stop it or point --data-dir elsewhere"
    )]
    InUse { path: PathBuf },
    #[error("I/O failed on {path} while {op}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is not a SQLite database (no SQLite header): refusing to touch it; \
         move it away or point --data-dir elsewhere"
    )]
    NotSqlite { path: PathBuf },
    #[error(
        "{path} is not a Keel {kind} database (application_id {found:#010x}, expected \
         {expected:#010x}): refusing to touch it; move it away or point --data-dir elsewhere",
        expected = APPLICATION_ID
    )]
    Foreign {
        path: PathBuf,
        kind: &'static str,
        found: u32,
    },
    #[error(
        "{path} is a Keel database of schema version {found}, but this build only knows \
         version {supported}: refusing to touch it; run the Keel version that wrote it",
        supported = SCHEMA_VERSION
    )]
    Version { path: PathBuf, found: i64 },
    #[error(
        "{path} is a Keel database but not a {kind} database (table {table} is missing): \
         refusing to touch it; move it away or point --data-dir elsewhere"
    )]
    WrongKind {
        path: PathBuf,
        kind: &'static str,
        table: &'static str,
    },
    #[error(
        "{path} failed SQLite's integrity check ({detail}): refusing to touch it; move it \
         away and let the node catch up from its peers"
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error("cannot read {path} to verify it: refusing to touch it")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "the disk holding {path} is full while {op}: free space and restart the node; \
         everything committed before is intact"
    )]
    DiskFull {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("SQLite failed on {path} while {op}")]
    Sqlite {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot encode {what} as JSON")]
    Encode {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot decode {what} stored in {path}")]
    Decode {
        path: PathBuf,
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("log index {index} does not fit SQLite's signed 64-bit integers")]
    IndexTooLarge { index: u64 },
    #[error("the state store {path} failed while applying entry {log_id}: {detail}")]
    Apply {
        path: PathBuf,
        log_id: LogId,
        detail: String,
    },
    #[error("{path} names snapshot data file {name:?}, which is not a plain file name")]
    BadSnapshotName { path: PathBuf, name: String },
    #[error("the blocking task {op} did not finish")]
    Task {
        op: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
}

impl StoreError {
    /// Wraps a SQLite error, singling out a full disk so the operator is told what to do.
    fn sqlite(path: &Path, op: &'static str, source: rusqlite::Error) -> Self {
        let path = path.to_path_buf();
        if source.sqlite_error_code() == Some(ErrorCode::DiskFull) {
            StoreError::DiskFull { path, op, source }
        } else {
            StoreError::Sqlite { path, op, source }
        }
    }

    fn io(path: &Path, op: &'static str, source: io::Error) -> Self {
        StoreError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    }
}

/// Displays an error followed by all its sources, `: `-separated.
pub(crate) struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

/// Turns a store failure into openraft's error, logging the whole chain first: openraft
/// shuts the node down on any storage error, so this log line is what the operator reads.
pub(crate) fn storage_error(
    subject: ErrorSubject<crate::types::NodeId>,
    verb: ErrorVerb,
    e: StoreError,
) -> StorageError {
    tracing::error!(
        subject = ?subject,
        verb = %verb,
        error = %ErrorChain(&e),
        "raft storage failed"
    );
    StorageError::IO {
        source: StorageIOError::new(subject, verb, AnyError::new(&e)),
    }
}

/// Runs `f` on a blocking thread. SQLite commits wait for fsync, which must not stall the
/// async runtime's worker threads.
async fn blocking<T, F>(op: &'static str, f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|source| StoreError::Task { op, source })?
}

// ---- the data directory ---------------------------------------------------------------

/// An exclusive `flock` on `<dir>/LOCK`, released when the last store handle drops it.
#[derive(Debug)]
pub(crate) struct DirLock {
    _file: File,
}

impl DirLock {
    fn acquire(dir: &Path) -> Result<Arc<Self>, StoreError> {
        let path = dir.join("LOCK");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| StoreError::io(&path, "opening the lock file", e))?;
        match file.try_lock() {
            Ok(()) => Ok(Arc::new(DirLock { _file: file })),
            Err(fs::TryLockError::WouldBlock) => Err(StoreError::InUse { path }),
            Err(fs::TryLockError::Error(e)) => {
                Err(StoreError::io(&path, "locking the lock file", e))
            }
        }
    }
}

/// Creates `dir` (and parents) and fsyncs its parent so the new entry survives a crash.
fn create_dir_durable(dir: &Path) -> Result<(), StoreError> {
    // Every directory about to be created, innermost first: each one's parent must be
    // fsynced to make its entry durable.
    let mut missing = Vec::new();
    let mut cur = dir;
    while !cur.exists() {
        missing.push(cur);
        cur = parent_dir(cur);
    }
    if missing.is_empty() {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    for created in missing.into_iter().rev() {
        fsync_dir(parent_dir(created))?;
    }
    Ok(())
}

fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(dir, "fsyncing the directory", e))
}

fn fsync_file(path: &Path) -> Result<(), StoreError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| StoreError::io(path, "fsyncing the file", e))
}

/// Replaces `path` with `bytes` atomically: temp file, fsync, rename, fsync directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = tmp_path(path);
    fs::write(&tmp, bytes).map_err(|e| StoreError::io(&tmp, "writing", e))?;
    fsync_file(&tmp)?;
    rename_durable(&tmp, path)
}

/// Renames `from` to `to` and fsyncs the directory of `to`, which is where the rename is
/// recorded.
fn rename_durable(from: &Path, to: &Path) -> Result<(), StoreError> {
    fs::rename(from, to).map_err(|e| StoreError::io(from, "renaming into place", e))?;
    fsync_dir(parent_dir(to))
}

/// The directory holding `path`; `.` for a bare relative name.
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Removes a file if it exists; anything but "not found" is an error.
fn remove_if_exists(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::io(path, "removing", e)),
    }
}

// ---- databases --------------------------------------------------------------------

/// The two kinds of database the store keeps; each names the tables that identify it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DbKind {
    Log,
    State,
}

impl DbKind {
    fn name(self) -> &'static str {
        match self {
            DbKind::Log => "raft log",
            DbKind::State => "cluster state",
        }
    }

    fn tables(self) -> &'static [&'static str] {
        match self {
            DbKind::Log => log::TABLES,
            DbKind::State => state_machine::TABLES,
        }
    }

    fn schema(self) -> String {
        match self {
            DbKind::Log => log::SCHEMA.to_string(),
            DbKind::State => format!("{}\n{}", crate::model::SCHEMA, state_machine::SCHEMA),
        }
    }
}

/// Opens the database at `path` for writing, creating it if there is no file there yet, and
/// refusing (without modifying it) any existing file that is not a healthy Keel database of
/// `kind`.
fn open_db(path: &Path, kind: DbKind) -> Result<Connection, StoreError> {
    match fs::symlink_metadata(path) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => create_db(path, kind)?,
        Err(e) => return Err(StoreError::io(path, "inspecting", e)),
    }
    verify_db(path, kind)?;
    // No SQLITE_OPEN_CREATE: the file was verified a moment ago, and if it vanished since,
    // an empty database must not silently take its place.
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI,
    )
    .map_err(|e| StoreError::sqlite(path, "opening", e))?;
    configure_writer(&conn, path)?;
    Ok(conn)
}

/// Durability settings of a writing connection; see the module documentation.
fn configure_writer(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| StoreError::sqlite(path, "setting the busy timeout", e))?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(|e| StoreError::sqlite(path, "enabling WAL", e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        // Still durable with synchronous=FULL; only readers and the writer now contend.
        tracing::warn!(path = %path.display(), mode, "SQLite refused WAL mode");
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(|e| StoreError::sqlite(path, "setting synchronous=FULL", e))?;
    Ok(())
}

/// Creates a fresh database of `kind` at `path` via a temporary file, so that `path` either
/// does not exist or is complete.
fn create_db(path: &Path, kind: DbKind) -> Result<(), StoreError> {
    let tmp = tmp_path(path);
    // A leftover from a crash during an earlier creation: it never became the database.
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut name = tmp.clone().into_os_string();
        name.push(suffix);
        remove_if_exists(Path::new(&name))?;
    }
    let sql_err = |e| StoreError::sqlite(&tmp, "creating the database", e);
    let mut conn = Connection::open(&tmp).map_err(sql_err)?;
    conn.pragma_update(None, "page_size", PAGE_SIZE)
        .map_err(sql_err)?;
    configure_writer(&conn, &tmp)?;
    let tx = conn.transaction().map_err(sql_err)?;
    tx.execute_batch(&format!(
        "PRAGMA application_id = {};\nPRAGMA user_version = {SCHEMA_VERSION};\n{}",
        // The pragma takes a signed 32-bit integer; the bit pattern is what matters.
        APPLICATION_ID as i32,
        kind.schema()
    ))
    .map_err(sql_err)?;
    tx.commit().map_err(sql_err)?;
    // Closing checkpoints the WAL into the main file and removes it, so the renamed file
    // is self-contained and its header already carries the application id.
    conn.close().map_err(|(_, e)| sql_err(e))?;
    fsync_file(&tmp)?;
    rename_durable(&tmp, path)?;
    tracing::info!(path = %path.display(), kind = kind.name(), "created raft database");
    Ok(())
}

/// Checks that `path` is a healthy Keel database of `kind` without writing to it.
fn verify_db(path: &Path, kind: DbKind) -> Result<(), StoreError> {
    let mut header = Vec::with_capacity(SQLITE_HEADER_LEN);
    File::open(path)
        .and_then(|f| {
            f.take(SQLITE_HEADER_LEN as u64)
                .read_to_end(&mut header)
                .map(|_| ())
        })
        .map_err(|e| StoreError::io(path, "reading the header", e))?;
    if header.len() < SQLITE_HEADER_LEN || !header.starts_with(SQLITE_MAGIC) {
        return Err(StoreError::NotSqlite {
            path: path.to_path_buf(),
        });
    }
    let mut id = [0u8; 4];
    id.copy_from_slice(&header[APPLICATION_ID_OFFSET..APPLICATION_ID_OFFSET + 4]);
    let found = u32::from_be_bytes(id);
    if found != APPLICATION_ID {
        return Err(StoreError::Foreign {
            path: path.to_path_buf(),
            kind: kind.name(),
            found,
        });
    }

    let unreadable = |source| StoreError::Unreadable {
        path: path.to_path_buf(),
        source,
    };
    let conn = open_for_verification(path).map_err(unreadable)?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(unreadable)?;
    if version != SCHEMA_VERSION {
        return Err(StoreError::Version {
            path: path.to_path_buf(),
            found: version,
        });
    }
    let problems = conn
        .prepare("PRAGMA quick_check")
        .and_then(|mut stmt| {
            stmt.query_map([], |row| row.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<String>>>()
        })
        .map_err(|source| match source.sqlite_error_code() {
            // A page too damaged for quick_check to even walk is corruption too.
            Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => StoreError::Corrupt {
                path: path.to_path_buf(),
                detail: source.to_string(),
            },
            _ => unreadable(source),
        })?;
    if problems != ["ok"] {
        let mut detail = problems.into_iter().take(5).collect::<Vec<_>>().join("; ");
        if detail.is_empty() {
            detail = "no verdict".into();
        }
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            detail,
        });
    }
    for &table in kind.tables() {
        let present: bool = conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?1)",
                [table],
                |row| row.get(0),
            )
            .map_err(unreadable)?;
        if !present {
            return Err(StoreError::WrongKind {
                path: path.to_path_buf(),
                kind: kind.name(),
                table,
            });
        }
    }
    Ok(())
}

/// A read-only connection for [`verify_db`] that leaves no trace next to the file.
///
/// A plain read-only connection to a WAL-mode database creates the `-wal` and `-shm` files
/// if they are missing. When no `-wal` or `-journal` file exists the main file is complete
/// on its own (it was cleanly closed), so SQLite can be told it is immutable and then opens
/// nothing else. Otherwise the sidecar holds committed data that verification must see, and
/// the ordinary read-only connection reads it (still without writing to it).
fn open_for_verification(path: &Path) -> rusqlite::Result<Connection> {
    let has_sidecar = ["-wal", "-journal"].iter().any(|suffix| {
        let mut name = path.as_os_str().to_os_string();
        name.push(suffix);
        Path::new(&name).exists()
    });
    match path.to_str() {
        Some(p) if !has_sidecar => {
            // In a URI `%`, `?` and `#` are syntax; everything else may stay as is.
            let mut uri = String::from("file:");
            for c in p.chars() {
                match c {
                    '%' => uri.push_str("%25"),
                    '?' => uri.push_str("%3f"),
                    '#' => uri.push_str("%23"),
                    c => uri.push(c),
                }
            }
            uri.push_str("?immutable=1");
            open_read_only(Path::new(&uri))
        }
        _ => open_read_only(path),
    }
}

/// A connection that cannot write, for verification and for [`StateReader`].
fn open_read_only(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}

fn encode<T: serde::Serialize>(what: impl Into<String>, value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|source| StoreError::Encode {
        what: what.into(),
        source,
    })
}

fn decode<T: serde::de::DeserializeOwned>(
    path: &Path,
    what: impl Into<String>,
    json: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(json).map_err(|source| StoreError::Decode {
        path: path.to_path_buf(),
        what: what.into(),
        source,
    })
}

/// Converts a log index for SQLite, which only has signed 64-bit integers.
fn sql_index(index: u64) -> Result<i64, StoreError> {
    i64::try_from(index).map_err(|_| StoreError::IndexTooLarge { index })
}

/// Like [`sql_index`] for range bounds, where anything past `i64::MAX` means "the end".
fn sql_bound(index: u64) -> i64 {
    i64::try_from(index).unwrap_or(i64::MAX)
}
