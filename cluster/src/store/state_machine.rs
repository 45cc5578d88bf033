//! The state machine in `<data_dir>/raft/state.db` and its snapshots in
//! `<data_dir>/raft/snapshot/`.
//!
//! `state.db` holds the model's tables and `raft_state (key, value)` with the JSON-encoded
//! last applied log id and last membership. A batch of entries is applied in one
//! transaction that also records the new last applied id and membership, so after a crash
//! the state reflects exactly the entries it says it applied. Each command runs inside a
//! savepoint: a deterministic rejection rolls back whatever the command wrote before it was
//! rejected and becomes the entry's response; a storage failure rolls back the whole batch
//! and fails the apply (openraft then stops the node rather than diverge).
//!
//! A snapshot is a copy of `state.db` taken with SQLite's online backup API under the state
//! machine's lock, so it matches the last applied id written in its metadata (which the copy
//! also carries in its own `raft_state`). It is converted to a rollback-journal database so
//! the bytes are one self-contained file. In `snapshot/`, `<uuid>.db` holds the data and
//! `current.json` the metadata plus the data file's name; `current.json` is replaced
//! atomically and last, so it always names a complete data file. Installing a received
//! snapshot writes it to a temporary file, verifies it is a healthy Keel state database,
//! restores it into the live connection with the backup API and then saves it as current.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Cursor};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftSnapshotBuilder, StoredMembership,
};
use rusqlite::backup::{Backup, StepResult};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Mutex};
use uuid::Uuid;

use super::{
    blocking, decode, encode, fsync_dir, fsync_file, remove_if_exists, storage_error, write_atomic,
    DbKind, DirLock, StoreError,
};
use crate::model::{self, CommandError};
use crate::types::{
    Entry, LogId, Request, Response, SnapshotMeta, StorageError,
    StoredMembership as KeelMembership, TypeConfig,
};

pub(super) const SCHEMA: &str = "
CREATE TABLE raft_state (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
";

pub(super) const TABLES: &[&str] = &["objects", "raft_state"];

const KEY_LAST_APPLIED: &str = "last_applied";
const KEY_LAST_MEMBERSHIP: &str = "last_membership";

const SNAPSHOT_DIR: &str = "snapshot";
const CURRENT_SNAPSHOT: &str = "current.json";

/// How often a backup step is retried while a database is momentarily locked.
const BACKUP_BUSY_RETRIES: u32 = 50;

/// The state machine. openraft owns it; reads go through a [`StateReader`].
pub struct StateMachineStore {
    db: Arc<Mutex<SmDb>>,
}

/// Builds snapshots of the state machine; shares its lock so the copy is consistent.
pub struct StateSnapshotBuilder {
    db: Arc<Mutex<SmDb>>,
}

struct SmDb {
    conn: Connection,
    path: PathBuf,
    snapshot_dir: PathBuf,
    /// Cached copies of what `raft_state` holds, updated only after a commit.
    last_applied: Option<LogId>,
    last_membership: KeelMembership,
    applied_tx: watch::Sender<Option<LogId>>,
    /// Held for as long as the state machine is open.
    _lock: Arc<DirLock>,
}

/// What `current.json` holds.
#[derive(Debug, Serialize, Deserialize)]
struct SavedSnapshot {
    meta: SnapshotMeta,
    /// File name, inside the snapshot directory, of the SQLite copy.
    data_file: String,
}

/// Read-only access to the cluster state, for API handlers and reconcilers.
#[derive(Clone)]
pub struct StateReader {
    inner: Arc<ReaderInner>,
}

struct ReaderInner {
    /// A read-only connection of its own: with WAL, reads never wait for an apply.
    conn: std::sync::Mutex<Connection>,
    path: PathBuf,
    applied: watch::Receiver<Option<LogId>>,
}

impl StateReader {
    /// Runs a read-only closure against the state-machine database (model::get/list etc).
    ///
    /// The closure runs inside one read transaction, so everything it reads comes from the
    /// same applied state. It blocks the calling thread for the duration of the closure,
    /// which for the model's point reads and listings is well under a millisecond.
    pub fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        self.read_with(|conn| f(conn).map_err(|e| self.sqlite_error(e)))
    }

    /// [`read`](Self::read) for a closure with an error type of its own (a model
    /// function's `CommandError`, say): its errors come back as they are, and a failure of
    /// the read transaction itself as `E::from(StoreError)`.
    pub fn read_with<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, E>,
    ) -> Result<T, E> {
        // A panic inside an earlier closure poisons the mutex but cannot have left a write
        // half-done (the connection is read-only and its transaction rolled back on unwind),
        // so the connection is still good.
        let mut conn = self
            .inner
            .conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let tx = conn.transaction().map_err(|e| self.sqlite_error(e))?;
        let value = f(&tx)?;
        // Ending a read transaction cannot lose anything; dropping it would do the same.
        tx.rollback().map_err(|e| self.sqlite_error(e))?;
        Ok(value)
    }

    fn sqlite_error(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.inner.path.clone(),
            op: "reading the cluster state",
            source,
        }
    }

    /// Last applied log id; changes after every apply or snapshot install (reconcilers watch it).
    ///
    /// `changed()` on the receiver fails once the state machine has been dropped, i.e. when
    /// raft shut down.
    pub fn applied(&self) -> watch::Receiver<Option<LogId>> {
        let mut rx = self.inner.applied.clone();
        // A fresh subscriber is woken by the next change, not by one that already happened.
        rx.mark_unchanged();
        rx
    }
}

impl StateMachineStore {
    pub(super) fn open(
        raft_dir: &Path,
        lock: Arc<DirLock>,
    ) -> Result<(Self, StateReader), StoreError> {
        let path = raft_dir.join("state.db");
        let conn = super::open_db(&path, DbKind::State)?;
        let (last_applied, last_membership) = read_raft_state(&conn, &path)?;

        let snapshot_dir = raft_dir.join(SNAPSHOT_DIR);
        super::create_dir_durable(&snapshot_dir)?;
        remove_stale_snapshot_files(&snapshot_dir)?;

        let reader_conn = super::open_read_only(&path)
            .map_err(|e| StoreError::sqlite(&path, "opening the state reader", e))?;
        let (applied_tx, applied_rx) = watch::channel(last_applied);
        let reader = StateReader {
            inner: Arc::new(ReaderInner {
                conn: std::sync::Mutex::new(reader_conn),
                path: path.clone(),
                applied: applied_rx,
            }),
        };
        let sm = StateMachineStore {
            db: Arc::new(Mutex::new(SmDb {
                conn,
                path,
                snapshot_dir,
                last_applied,
                last_membership,
                applied_tx,
                _lock: lock,
            })),
        };
        Ok((sm, reader))
    }

    /// Runs `f` against the state on a blocking thread, holding the state machine's mutex.
    async fn with_db<T, F>(&self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut SmDb) -> Result<T, StoreError> + Send + 'static,
    {
        with_db(&self.db, op, f).await
    }

    /// Runs `f` on the live writing connection, for tests that need to break it.
    #[cfg(test)]
    pub(super) async fn with_conn<T>(&self, f: impl FnOnce(&Connection) -> T) -> T {
        f(&self.db.lock().await.conn)
    }
}

async fn with_db<T, F>(db: &Arc<Mutex<SmDb>>, op: &'static str, f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&mut SmDb) -> Result<T, StoreError> + Send + 'static,
{
    let mut db = db.clone().lock_owned().await;
    blocking(op, move || f(&mut db)).await
}

fn read_raft_state(
    conn: &Connection,
    path: &Path,
) -> Result<(Option<LogId>, KeelMembership), StoreError> {
    let read = |key: &str| -> Result<Option<String>, StoreError> {
        conn.query_row(
            "SELECT value FROM raft_state WHERE key = ?1",
            [key],
            |row| row.get(0),
        )
        .optional()
        .map_err(|e| StoreError::sqlite(path, "reading the applied state", e))
    };
    let last_applied = match read(KEY_LAST_APPLIED)? {
        Some(json) => decode::<Option<LogId>>(path, KEY_LAST_APPLIED, json.as_bytes())?,
        None => None,
    };
    let last_membership = match read(KEY_LAST_MEMBERSHIP)? {
        Some(json) => decode(path, KEY_LAST_MEMBERSHIP, json.as_bytes())?,
        None => KeelMembership::default(),
    };
    Ok((last_applied, last_membership))
}

fn write_raft_state(
    tx: &Transaction<'_>,
    path: &Path,
    last_applied: Option<LogId>,
    membership: &KeelMembership,
) -> Result<(), StoreError> {
    let rows = [
        (KEY_LAST_APPLIED, encode(KEY_LAST_APPLIED, &last_applied)?),
        (
            KEY_LAST_MEMBERSHIP,
            encode(KEY_LAST_MEMBERSHIP, membership)?,
        ),
    ];
    for (key, value) in rows {
        tx.execute(
            "INSERT INTO raft_state (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )
        .map_err(|e| StoreError::sqlite(path, "recording the applied state", e))?;
    }
    Ok(())
}

// ---- applying ---------------------------------------------------------------------

/// Applies a batch of entries in one transaction; see the module documentation.
fn apply_batch(db: &mut SmDb, entries: Vec<Entry>) -> Result<Vec<Response>, StoreError> {
    let path = db.path.clone();
    let err = |op| {
        let path = path.clone();
        move |e| StoreError::sqlite(&path, op, e)
    };
    let mut last_applied = db.last_applied;
    let mut membership = db.last_membership.clone();
    let mut responses = Vec::with_capacity(entries.len());

    let mut tx = db.conn.transaction().map_err(err("starting to apply"))?;
    for entry in entries {
        let log_id = entry.log_id;
        let response = match entry.payload {
            EntryPayload::Blank => Ok(model::Outcome::Done),
            EntryPayload::Normal(request) => apply_command(&mut tx, &path, log_id, &request)?,
            EntryPayload::Membership(m) => {
                membership = StoredMembership::new(Some(log_id), m);
                Ok(model::Outcome::Done)
            }
        };
        last_applied = Some(log_id);
        responses.push(response);
    }
    write_raft_state(&tx, &path, last_applied, &membership)?;
    tx.commit().map_err(err("committing applied entries"))?;

    db.last_applied = last_applied;
    db.last_membership = membership;
    db.applied_tx.send_replace(last_applied);
    Ok(responses)
}

/// Applies one command inside a savepoint of the batch's transaction. `Ok(response)` is
/// what the entry produced (possibly a rejection); `Err` is a storage failure.
fn apply_command(
    tx: &mut Transaction<'_>,
    path: &Path,
    log_id: LogId,
    request: &Request,
) -> Result<Response, StoreError> {
    let err = |e| StoreError::sqlite(path, "applying a command", e);
    let savepoint = tx.savepoint().map_err(err)?;
    match model::apply(&savepoint, &request.command) {
        Ok(outcome) => {
            savepoint.commit().map_err(err)?;
            Ok(Ok(outcome))
        }
        // Dropping the savepoint and then the transaction rolls everything back.
        Err(CommandError::Store { detail }) => Err(StoreError::Apply {
            path: path.to_path_buf(),
            log_id,
            detail,
        }),
        Err(rejection) => {
            // The default drop behaviour of a savepoint is to roll back to it: whatever the
            // command wrote before it was rejected must not survive.
            savepoint.finish().map_err(err)?;
            tracing::debug!(
                request_id = %request.request_id,
                command = request.command.kind(),
                %log_id,
                error = %rejection,
                "command rejected"
            );
            Ok(Err(rejection))
        }
    }
}

// ---- snapshots --------------------------------------------------------------------

/// Copies the live database into a new file at `dst_path` with the backup API, then turns
/// the copy into a rollback-journal database so its bytes stand alone.
fn backup_to_file(src: &Connection, src_path: &Path, dst_path: &Path) -> Result<(), StoreError> {
    let err = |e| StoreError::sqlite(src_path, "copying the state for a snapshot", e);
    remove_if_exists(dst_path)?;
    let mut dst = Connection::open(dst_path).map_err(err)?;
    {
        let backup = Backup::new(src, &mut dst).map_err(err)?;
        run_backup(&backup).map_err(err)?;
    }
    // The copied header may still say WAL (it comes from the live database); reopening
    // and switching back checkpoints into the main file and records the rollback mode.
    dst.close().map_err(|(_, e)| err(e))?;
    let dst = Connection::open(dst_path).map_err(err)?;
    dst.pragma_update_and_check(None, "journal_mode", "DELETE", |row| {
        row.get::<_, String>(0)
    })
    .map_err(err)?;
    dst.close().map_err(|(_, e)| err(e))?;
    fsync_file(dst_path)
}

/// Runs a backup in one step, retrying while the destination is briefly locked.
fn run_backup(backup: &Backup<'_, '_>) -> rusqlite::Result<()> {
    let mut busy = 0;
    loop {
        match backup.step(-1)? {
            StepResult::Done => return Ok(()),
            StepResult::More => {}
            _ => {
                busy += 1;
                if busy > BACKUP_BUSY_RETRIES {
                    return Err(rusqlite::Error::SqliteFailure(
                        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
                        Some("the database stayed locked during a backup".into()),
                    ));
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

impl SmDb {
    fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StoreError> {
        let id = Uuid::new_v4().simple().to_string();
        let data_file = format!("{id}.db");
        let tmp = super::tmp_path(&self.snapshot_dir.join(&data_file));
        backup_to_file(&self.conn, &self.path, &tmp)?;
        let bytes = fs::read(&tmp).map_err(|e| StoreError::io(&tmp, "reading the snapshot", e))?;
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.last_membership.clone(),
            snapshot_id: format!(
                "{}-{}",
                self.last_applied
                    .map_or_else(|| "none".to_string(), |l| l.to_string()),
                &id[..8]
            ),
        };
        self.save_current(&meta, &tmp, data_file)?;
        tracing::info!(
            snapshot_id = %meta.snapshot_id,
            bytes = bytes.len(),
            "built a snapshot of the cluster state"
        );
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }

    fn install_snapshot(&mut self, meta: &SnapshotMeta, bytes: &[u8]) -> Result<(), StoreError> {
        let data_file = format!("{}.db", Uuid::new_v4().simple());
        let tmp = super::tmp_path(&self.snapshot_dir.join(&data_file));
        fs::write(&tmp, bytes).map_err(|e| StoreError::io(&tmp, "writing the snapshot", e))?;
        let result = fsync_file(&tmp)
            .and_then(|()| super::verify_db(&tmp, DbKind::State))
            .and_then(|()| self.restore_from(&tmp, meta))
            .and_then(|()| self.save_current(meta, &tmp, data_file));
        if result.is_err() {
            // Best effort: a leftover temp file is removed at the next open anyway.
            let _ = fs::remove_file(&tmp);
        }
        result?;
        self.applied_tx.send_replace(self.last_applied);
        tracing::info!(
            snapshot_id = %meta.snapshot_id,
            last_log_id = ?meta.last_log_id,
            "installed a snapshot of the cluster state"
        );
        Ok(())
    }

    /// Replaces the live state with the verified copy at `src_path`.
    fn restore_from(&mut self, src_path: &Path, meta: &SnapshotMeta) -> Result<(), StoreError> {
        let err = |e| StoreError::sqlite(&self.path, "restoring a snapshot", e);
        let src = super::open_read_only(src_path).map_err(err)?;
        {
            let backup = Backup::new(&src, &mut self.conn).map_err(err)?;
            run_backup(&backup).map_err(err)?;
        }
        drop(src);
        // The copy carries its own raft_state, which for a Keel-built snapshot already
        // matches `meta`; the metadata is what openraft holds us to, so record it.
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction()
            .map_err(|e| StoreError::sqlite(&path, "restoring a snapshot", e))?;
        write_raft_state(&tx, &path, meta.last_log_id, &meta.last_membership)?;
        tx.commit()
            .map_err(|e| StoreError::sqlite(&path, "restoring a snapshot", e))?;
        self.last_applied = meta.last_log_id;
        self.last_membership = meta.last_membership.clone();
        Ok(())
    }

    /// Makes the data at `tmp` the current snapshot, then forgets every older one.
    fn save_current(
        &self,
        meta: &SnapshotMeta,
        tmp: &Path,
        data_file: String,
    ) -> Result<(), StoreError> {
        super::rename_durable(tmp, &self.snapshot_dir.join(&data_file))?;
        let saved = SavedSnapshot {
            meta: meta.clone(),
            data_file,
        };
        let json = encode("snapshot metadata", &saved)?;
        // The commit point: until this rename the previous snapshot stays current.
        write_atomic(&self.snapshot_dir.join(CURRENT_SNAPSHOT), json.as_bytes())?;
        remove_stale_snapshot_files(&self.snapshot_dir)
    }

    fn current_snapshot(&self) -> Result<Option<Snapshot<TypeConfig>>, StoreError> {
        let Some(saved) = read_saved(&self.snapshot_dir)? else {
            return Ok(None);
        };
        let path = self.snapshot_dir.join(&saved.data_file);
        let bytes =
            fs::read(&path).map_err(|e| StoreError::io(&path, "reading the snapshot", e))?;
        Ok(Some(Snapshot {
            meta: saved.meta,
            snapshot: Box::new(Cursor::new(bytes)),
        }))
    }
}

fn read_saved(snapshot_dir: &Path) -> Result<Option<SavedSnapshot>, StoreError> {
    let path = snapshot_dir.join(CURRENT_SNAPSHOT);
    let json = match fs::read(&path) {
        Ok(json) => json,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::io(&path, "reading", e)),
    };
    let saved: SavedSnapshot = decode(&path, "snapshot metadata", &json)?;
    // The name is joined to the snapshot directory: it must not lead anywhere else.
    let plain = Path::new(&saved.data_file).file_name() == Some(OsStr::new(&saved.data_file));
    if !plain || saved.data_file == CURRENT_SNAPSHOT {
        return Err(StoreError::BadSnapshotName {
            path,
            name: saved.data_file,
        });
    }
    Ok(Some(saved))
}

/// Removes everything in the snapshot directory but `current.json` and the data file it
/// names: older snapshots and the temporary files of interrupted builds and installs. The
/// directory belongs to the store alone, and this runs with the state machine locked.
fn remove_stale_snapshot_files(snapshot_dir: &Path) -> Result<(), StoreError> {
    let keep = read_saved(snapshot_dir)?.map(|s| s.data_file);
    let entries =
        fs::read_dir(snapshot_dir).map_err(|e| StoreError::io(snapshot_dir, "listing", e))?;
    let mut removed = false;
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io(snapshot_dir, "listing", e))?;
        let name = entry.file_name();
        if name == CURRENT_SNAPSHOT || keep.as_deref().is_some_and(|k| name == k) {
            continue;
        }
        remove_if_exists(&entry.path())?;
        removed = true;
    }
    if removed {
        fsync_dir(snapshot_dir)?;
    }
    Ok(())
}

// ---- openraft ---------------------------------------------------------------------

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateSnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, KeelMembership), StorageError> {
        let db = self.db.lock().await;
        Ok((db.last_applied, db.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        self.with_db("applying entries", move |db| apply_batch(db, entries))
            .await
            .map_err(|e| storage_error(ErrorSubject::StateMachine, ErrorVerb::Write, e))
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        StateSnapshotBuilder {
            db: self.db.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let owned_meta = meta.clone();
        let bytes = snapshot.into_inner();
        self.with_db("installing a snapshot", move |db| {
            db.install_snapshot(&owned_meta, &bytes)
        })
        .await
        .map_err(|e| {
            storage_error(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Write,
                e,
            )
        })
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        self.with_db("reading the current snapshot", |db| db.current_snapshot())
            .await
            .map_err(|e| storage_error(ErrorSubject::Snapshot(None), ErrorVerb::Read, e))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateSnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        with_db(&self.db, "building a snapshot", |db| db.build_snapshot())
            .await
            .map_err(|e| storage_error(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))
    }
}
