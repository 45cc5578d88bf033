//! The raft log in `<data_dir>/raft/log.db`.
//!
//! Two tables: `raft_log (idx, entry)` holds one JSON-encoded [`Entry`] per log index, and
//! `raft_meta (key, value)` holds the JSON-encoded vote, last committed and last purged log
//! ids. Every write is one SQLite transaction committed with `synchronous=FULL` (see the
//! parent module), which gives openraft what it needs:
//!
//! * `save_vote` returns only after the vote's commit is fsynced;
//! * `append` reports the flush through the callback only after the entries' transaction
//!   committed, and a failed transaction (a full disk, say) rolls back entirely, leaving the
//!   log exactly as it was;
//! * `truncate` and `purge` each delete a suffix or prefix in one transaction, so the log
//!   never has a hole; `purge` records the purged id in the same transaction, so the log state
//!   is right even when no entry remains.
//!
//! Writes are serialised by the mutex around the one connection, which also satisfies
//! openraft's rule that IO is applied in order.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, RaftLogId};
use rusqlite::{params, Connection, OptionalExtension};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::Mutex;

use super::{
    blocking, decode, encode, sql_bound, sql_index, storage_error, DbKind, DirLock, StoreError,
};
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

pub(super) const SCHEMA: &str = "
CREATE TABLE raft_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE raft_log (
    idx   INTEGER PRIMARY KEY,
    entry TEXT NOT NULL
);
";

pub(super) const TABLES: &[&str] = &["raft_meta", "raft_log"];

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_LAST_PURGED: &str = "last_purged";

/// Upper bound on what one `limited_get_log_entries` call returns, so that replicating a
/// long log to a lagging follower goes in batches of bounded memory.
const READ_BATCH: i64 = 1024;

/// The raft log. Cheap to clone: clones share the connection, and openraft's log reader is a
/// clone.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Mutex<LogDb>>,
}

struct LogDb {
    conn: Connection,
    path: PathBuf,
    /// Held for as long as the log is open.
    _lock: Arc<DirLock>,
}

impl LogStore {
    pub(super) fn open(path: &Path, lock: Arc<DirLock>) -> Result<Self, StoreError> {
        let conn = super::open_db(path, DbKind::Log)?;
        Ok(LogStore {
            db: Arc::new(Mutex::new(LogDb {
                conn,
                path: path.to_path_buf(),
                _lock: lock,
            })),
        })
    }

    /// Runs `f` against the database on a blocking thread, holding the log's mutex.
    async fn with_db<T, F>(&self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut LogDb) -> Result<T, StoreError> + Send + 'static,
    {
        let mut db = self.db.clone().lock_owned().await;
        blocking(op, move || f(&mut db)).await
    }

    /// Limits the database to `pages` pages (SQLite's `max_page_count`, per connection), so
    /// tests can make the "disk" fill up. Returns the limit now in force.
    #[cfg(test)]
    pub(super) async fn set_max_page_count(&self, pages: u64) -> u64 {
        let db = self.db.lock().await;
        db.conn
            .pragma_update_and_check(None, "max_page_count", pages, |row| row.get(0))
            .expect("max_page_count")
    }

    /// The current size of the database in pages.
    #[cfg(test)]
    pub(super) async fn page_count(&self) -> u64 {
        let db = self.db.lock().await;
        db.conn
            .pragma_query_value(None, "page_count", |row| row.get(0))
            .expect("page_count")
    }
}

impl LogDb {
    fn sql_err(&self, op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
        move |e| StoreError::sqlite(&self.path, op, e)
    }

    fn read_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let value: Option<String> = self
            .conn
            .query_row("SELECT value FROM raft_meta WHERE key = ?1", [key], |row| {
                row.get(0)
            })
            .optional()
            .map_err(self.sql_err("reading log metadata"))?;
        value
            .map(|v| decode(&self.path, key, v.as_bytes()))
            .transpose()
    }

    fn write_meta<T: Serialize>(
        conn: &Connection,
        path: &Path,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        let json = encode(key, value)?;
        conn.execute(
            "INSERT INTO raft_meta (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![key, json],
        )
        .map_err(|e| StoreError::sqlite(path, "writing log metadata", e))?;
        Ok(())
    }

    fn decode_entry(&self, idx: i64, json: &str) -> Result<Entry, StoreError> {
        decode(&self.path, format!("log entry {idx}"), json.as_bytes())
    }

    /// Entries with `start <= idx < end`, at most `limit` of them, in index order.
    fn entries(&self, start: i64, end: i64, limit: i64) -> Result<Vec<Entry>, StoreError> {
        let rows = self
            .conn
            .prepare_cached(
                "SELECT idx, entry FROM raft_log WHERE idx >= ?1 AND idx < ?2
                 ORDER BY idx LIMIT ?3",
            )
            .and_then(|mut stmt| {
                stmt.query_map(params![start, end, limit], |row| {
                    Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(self.sql_err("reading log entries"))?;
        rows.iter()
            .map(|(idx, json)| self.decode_entry(*idx, json))
            .collect()
    }

    fn last_entry_log_id(&self) -> Result<Option<LogId>, StoreError> {
        let row: Option<(i64, String)> = self
            .conn
            .query_row(
                "SELECT idx, entry FROM raft_log ORDER BY idx DESC LIMIT 1",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()
            .map_err(self.sql_err("reading the last log entry"))?;
        row.map(|(idx, json)| self.decode_entry(idx, &json).map(|e| e.log_id))
            .transpose()
    }
}

/// `[start, end)` of a range of log indexes, in SQLite's integers.
fn sql_range<RB: RangeBounds<u64>>(range: &RB) -> (i64, i64) {
    let start = match range.start_bound() {
        Bound::Included(&i) => sql_bound(i),
        Bound::Excluded(&i) => sql_bound(i.saturating_add(1)),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&i) => sql_bound(i.saturating_add(1)),
        Bound::Excluded(&i) => sql_bound(i),
        Bound::Unbounded => i64::MAX,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let (start, end) = sql_range(&range);
        self.with_db("reading log entries", move |db| {
            db.entries(start, end, i64::MAX)
        })
        .await
        .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Read, e))
    }

    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        let (start, end) = sql_range(&(start..end));
        self.with_db("reading log entries", move |db| {
            db.entries(start, end, READ_BATCH)
        })
        .await
        .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Read, e))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        self.with_db("reading the log state", |db| {
            let last_purged: Option<LogId> = db.read_meta(KEY_LAST_PURGED)?;
            // With every entry purged, the last log id is the last purged one.
            let last = db.last_entry_log_id()?.or(last_purged);
            Ok(LogState {
                last_purged_log_id: last_purged,
                last_log_id: last,
            })
        })
        .await
        .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Read, e))
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let vote = *vote;
        self.with_db("saving the vote", move |db| {
            // An autocommit statement: durable (fsynced) when it returns.
            LogDb::write_meta(&db.conn, &db.path, KEY_VOTE, &vote)
        })
        .await
        .map_err(|e| storage_error(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.with_db("reading the vote", |db| db.read_meta(KEY_VOTE))
            .await
            .map_err(|e| storage_error(ErrorSubject::Vote, ErrorVerb::Read, e))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.with_db("saving the committed log id", move |db| {
            LogDb::write_meta(&db.conn, &db.path, KEY_COMMITTED, &committed)
        })
        .await
        .map_err(|e| storage_error(ErrorSubject::Store, ErrorVerb::Write, e))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        self.with_db("reading the committed log id", |db| {
            // Stored as JSON `null` after `save_committed(None)`; both mean "none".
            Ok(db.read_meta::<Option<LogId>>(KEY_COMMITTED)?.flatten())
        })
        .await
        .map_err(|e| storage_error(ErrorSubject::Store, ErrorVerb::Read, e))
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Encoding happens before any SQL so a bad entry cannot leave a partial batch.
        let rows = entries
            .into_iter()
            .map(|entry| {
                let idx = sql_index(entry.get_log_id().index)?;
                let json = encode(format!("log entry {}", entry.log_id), &entry)?;
                Ok((idx, json))
            })
            .collect::<Result<Vec<_>, StoreError>>()
            .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Write, e))?;

        self.with_db("appending log entries", move |db| {
            let path = db.path.clone();
            let err = |e| StoreError::sqlite(&path, "appending log entries", e);
            let tx = db.conn.transaction().map_err(err)?;
            {
                let mut stmt = tx
                    .prepare_cached("INSERT INTO raft_log (idx, entry) VALUES (?1, ?2)")
                    .map_err(err)?;
                for (idx, json) in &rows {
                    stmt.execute(params![idx, json]).map_err(err)?;
                }
            }
            // Dropping `tx` on any error above rolls the whole batch back.
            tx.commit().map_err(err)
        })
        .await
        .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Write, e))?;

        // Only now, with the commit fsynced, may openraft count these entries as persisted.
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.with_db("truncating the log", move |db| {
            let from = sql_index(log_id.index)?;
            db.conn
                .execute("DELETE FROM raft_log WHERE idx >= ?1", [from])
                .map_err(db.sql_err("truncating the log"))?;
            Ok(())
        })
        .await
        .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.with_db("purging the log", move |db| {
            let upto = sql_index(log_id.index)?;
            let path = db.path.clone();
            let err = |e| StoreError::sqlite(&path, "purging the log", e);
            let tx = db.conn.transaction().map_err(err)?;
            LogDb::write_meta(&tx, &path, KEY_LAST_PURGED, &log_id)?;
            tx.execute("DELETE FROM raft_log WHERE idx <= ?1", [upto])
                .map_err(err)?;
            tx.commit().map_err(err)
        })
        .await
        .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }
}
