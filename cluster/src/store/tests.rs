//! Tests of the SQLite raft store: openraft's own conformance suite, plus what the suite
//! cannot see: refusing foreign files, a full disk, reopening, snapshots carrying the model.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use openraft::storage::{RaftLogReader, RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, EntryPayload, Membership, RaftSnapshotBuilder};
use rusqlite::Connection;
use tempfile::TempDir;

use super::{open, LogStore, StateMachineStore, StoreError, APPLICATION_ID};
use crate::model::{self, Command, CommandError, Outcome};
use crate::types::{Entry, KeelNode, LogId, Request, StorageError, TypeConfig, Vote};

// ---- helpers ----------------------------------------------------------------------

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn blank(term: u64, index: u64) -> Entry {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Blank,
    }
}

fn normal(term: u64, index: u64, command: Command) -> Entry {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(Request {
            request_id: format!("req-{index}"),
            command,
        }),
    }
}

fn membership(term: u64, index: u64) -> Entry {
    let node = KeelNode {
        name: "n1".into(),
        peer_addr: "10.0.0.1:7400".into(),
        api_addr: "10.0.0.1:8443".into(),
    };
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Membership(Membership::new(
            vec![BTreeSet::from([1])],
            BTreeMap::from([(1, node)]),
        )),
    }
}

/// A join-token command whose digest field is `size` bytes long: a big entry.
fn create_token(id: &str, size: usize) -> Command {
    Command::CreateJoinToken {
        token_id: id.into(),
        secret_sha256: "a".repeat(size),
        now_ms: 10,
        expires_at_ms: 1_000,
    }
}

fn raft_dir(dir: &TempDir) -> PathBuf {
    dir.path().join("raft")
}

fn open_ok(dir: &TempDir) -> (LogStore, StateMachineStore, super::StateReader) {
    open(dir.path()).expect("open the store")
}

fn indexes(entries: &[Entry]) -> Vec<u64> {
    entries.iter().map(|e| e.log_id.index).collect()
}

/// Opens the store over a prepared file and expects a refusal that leaves the file as is.
fn assert_refused(dir: &TempDir, file: &Path, check: impl FnOnce(&StoreError)) {
    let before = fs::read(file).expect("read before");
    let Err(err) = open(dir.path()) else {
        panic!("{} was accepted", file.display())
    };
    check(&err);
    let message = err.to_string();
    assert!(message.contains("refusing to touch it"), "{message}");
    assert!(message.contains(&file.display().to_string()), "{message}");
    assert_eq!(
        fs::read(file).expect("read after"),
        before,
        "the file was modified"
    );
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut sidecar = file.as_os_str().to_os_string();
        sidecar.push(suffix);
        assert!(
            !Path::new(&sidecar).exists(),
            "SQLite touched {}",
            Path::new(&sidecar).display()
        );
    }
}

/// A well-formed SQLite database as another program would leave it.
fn foreign_database(path: &Path, application_id: i32) {
    let conn = Connection::open(path).expect("create");
    conn.execute_batch(&format!(
        "PRAGMA application_id = {application_id};
         CREATE TABLE photos (id INTEGER PRIMARY KEY, name TEXT);
         INSERT INTO photos (name) VALUES ('holiday.jpg');"
    ))
    .expect("fill");
}

// ---- openraft's suite -------------------------------------------------------------

struct TempStore;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for TempStore {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = TempDir::new().expect("temp dir");
        let (log, sm, _reader) = open_ok(&dir);
        Ok((dir, log, sm))
    }
}

/// `Suite::test_all` makes its own runtimes, so this must not run inside one.
#[test]
fn openraft_suite_passes() {
    Suite::test_all(TempStore).expect("openraft storage suite");
}

// ---- refusing what is not ours ----------------------------------------------------

#[test]
fn garbage_file_is_refused_untouched() {
    let dir = TempDir::new().expect("temp dir");
    fs::create_dir_all(raft_dir(&dir)).expect("mkdir");
    let file = raft_dir(&dir).join("log.db");
    fs::write(
        &file,
        b"these are not the bytes you are looking for\n".repeat(200),
    )
    .expect("write");
    assert_refused(&dir, &file, |e| {
        assert!(
            matches!(e, StoreError::NotSqlite { path } if *path == file),
            "{e:?}"
        );
    });
}

#[test]
fn empty_file_is_refused_untouched() {
    // SQLite would happily treat an empty file as an empty database; the store never
    // leaves one behind (it creates databases by rename), so an empty file is not ours.
    let dir = TempDir::new().expect("temp dir");
    fs::create_dir_all(raft_dir(&dir)).expect("mkdir");
    let file = raft_dir(&dir).join("log.db");
    fs::write(&file, b"").expect("write");
    assert_refused(&dir, &file, |e| {
        assert!(matches!(e, StoreError::NotSqlite { .. }), "{e:?}");
    });
}

#[test]
fn sqlite_database_of_another_application_is_refused_untouched() {
    for application_id in [0, 0x1234_5678] {
        let dir = TempDir::new().expect("temp dir");
        fs::create_dir_all(raft_dir(&dir)).expect("mkdir");
        let file = raft_dir(&dir).join("state.db");
        foreign_database(&file, application_id);
        assert_refused(&dir, &file, |e| match e {
            StoreError::Foreign { path, kind, found } => {
                assert_eq!(path, &file);
                assert_eq!(*kind, "cluster state");
                assert_eq!(*found, application_id as u32);
            }
            other => panic!("unexpected {other:?}"),
        });
        let message = open(dir.path()).err().expect("refused").to_string();
        assert!(
            message.contains(&format!("{APPLICATION_ID:#010x}")),
            "{message}"
        );
    }
}

#[test]
fn keel_database_of_the_wrong_kind_is_refused_untouched() {
    let dir = TempDir::new().expect("temp dir");
    drop(open_ok(&dir));
    let file = raft_dir(&dir).join("state.db");
    fs::copy(raft_dir(&dir).join("log.db"), &file).expect("swap in the log");
    assert_refused(&dir, &file, |e| {
        assert!(
            matches!(
                e,
                StoreError::WrongKind {
                    table: "objects",
                    ..
                }
            ),
            "{e:?}"
        );
    });
}

#[test]
fn newer_schema_version_is_refused_untouched() {
    let dir = TempDir::new().expect("temp dir");
    drop(open_ok(&dir));
    let file = raft_dir(&dir).join("log.db");
    {
        let conn = Connection::open(&file).expect("open");
        conn.execute_batch("PRAGMA journal_mode = DELETE; PRAGMA user_version = 2;")
            .expect("bump version");
    }
    assert_refused(&dir, &file, |e| {
        assert!(matches!(e, StoreError::Version { found: 2, .. }), "{e:?}");
    });
}

#[test]
fn corrupt_keel_database_is_refused_untouched() {
    let dir = TempDir::new().expect("temp dir");
    drop(open_ok(&dir));
    let file = raft_dir(&dir).join("state.db");
    let mut bytes = fs::read(&file).expect("read");
    assert!(
        bytes.len() >= 3 * 4096,
        "state.db has {} bytes",
        bytes.len()
    );
    // Page 2 is the root of the first table: scribble over its b-tree header.
    bytes[4096..4096 + 512].fill(0xA5);
    fs::write(&file, &bytes).expect("corrupt");
    assert_refused(&dir, &file, |e| {
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e:?}");
    });
}

#[test]
fn a_data_dir_is_used_by_one_store_at_a_time() {
    let dir = TempDir::new().expect("temp dir");
    let first = open_ok(&dir);
    assert!(
        matches!(open(dir.path()), Err(StoreError::InUse { .. })),
        "a second store opened the same directory"
    );
    drop(first);
    drop(open_ok(&dir));
}

// ---- durability -------------------------------------------------------------------

#[tokio::test]
async fn reopen_keeps_vote_log_and_state() {
    let dir = TempDir::new().expect("temp dir");
    let vote = Vote::new_committed(3, 1);
    {
        let (mut log, mut sm, reader) = open_ok(&dir);
        log.save_vote(&vote).await.expect("vote");
        let entries = vec![
            membership(1, 1),
            normal(1, 2, crate::model::test_init_command()),
            blank(2, 3),
            blank(2, 4),
            blank(2, 5),
        ];
        log.blocking_append(entries.clone()).await.expect("append");
        log.save_committed(Some(log_id(2, 5)))
            .await
            .expect("commit");
        let responses = sm.apply(entries).await.expect("apply");
        assert_eq!(responses[1], Ok(Outcome::HostJoined { host_id: 1 }));
        log.purge(log_id(1, 2)).await.expect("purge");
        assert!(reader.read(model::cluster_info).expect("read").is_some());
    }

    let (mut log, mut sm, reader) = open_ok(&dir);
    assert_eq!(log.read_vote().await.expect("vote"), Some(vote));
    assert_eq!(
        log.read_committed().await.expect("committed"),
        Some(log_id(2, 5))
    );
    let state = log.get_log_state().await.expect("log state");
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 2)));
    assert_eq!(state.last_log_id, Some(log_id(2, 5)));
    let entries = log.try_get_log_entries(..).await.expect("entries");
    assert_eq!(indexes(&entries), [3, 4, 5]);

    let (applied, members) = sm.applied_state().await.expect("applied");
    assert_eq!(applied, Some(log_id(2, 5)));
    assert_eq!(members.log_id(), &Some(log_id(1, 1)));
    assert_eq!(*reader.applied().borrow(), Some(log_id(2, 5)));
    let info = reader.read(model::cluster_info).expect("read");
    assert_eq!(info.map(|i| i.cluster_id).as_deref(), Some("c1"));

    // Everything purged: the log state still knows where the log ended.
    log.purge(log_id(2, 5)).await.expect("purge all");
    drop((log, sm, reader));
    let (mut log, _sm, _reader) = open_ok(&dir);
    let state = log.get_log_state().await.expect("log state");
    assert_eq!(state.last_purged_log_id, Some(log_id(2, 5)));
    assert_eq!(state.last_log_id, Some(log_id(2, 5)));
    assert!(log
        .try_get_log_entries(..)
        .await
        .expect("entries")
        .is_empty());
}

/// Copies the files of an open store as a crash would leave them: committed data still in
/// the `-wal` files, not yet checkpointed into the databases.
#[tokio::test]
async fn crash_image_reopens_with_everything_committed() {
    let dir = TempDir::new().expect("temp dir");
    let crashed = TempDir::new().expect("temp dir");
    let vote = Vote::new_committed(2, 1);
    let (mut log, mut sm, _reader) = open_ok(&dir);
    log.save_vote(&vote).await.expect("vote");
    let entries = vec![
        membership(1, 1),
        normal(1, 2, crate::model::test_init_command()),
    ];
    log.blocking_append(entries.clone()).await.expect("append");
    sm.apply(entries).await.expect("apply");

    fs::create_dir_all(raft_dir(&crashed)).expect("mkdir");
    let mut copied_wal = false;
    for name in ["log.db", "log.db-wal", "state.db", "state.db-wal"] {
        let from = raft_dir(&dir).join(name);
        if from.exists() {
            fs::copy(&from, raft_dir(&crashed).join(name)).expect("copy");
            copied_wal |= name.ends_with("-wal");
        }
    }
    assert!(copied_wal, "nothing was left in a WAL to recover");

    let (mut log, mut sm, reader) = open_ok(&crashed);
    assert_eq!(log.read_vote().await.expect("vote"), Some(vote));
    let entries = log.try_get_log_entries(..).await.expect("entries");
    assert_eq!(indexes(&entries), [1, 2]);
    assert_eq!(
        sm.applied_state().await.expect("applied").0,
        Some(log_id(1, 2))
    );
    assert!(reader.read(model::cluster_info).expect("read").is_some());
}

#[tokio::test]
async fn disk_full_append_fails_and_keeps_what_was_committed() {
    let dir = TempDir::new().expect("temp dir");
    let vote = Vote::new_committed(1, 1);
    let (mut log, _sm, _reader) = open_ok(&dir);
    log.save_vote(&vote).await.expect("vote");
    log.blocking_append([blank(1, 1), normal(1, 2, create_token("t2", 6000))])
        .await
        .expect("append");

    // Leave room for a few more pages only, then write 6 KB entries until one does not fit.
    let pages = log.page_count().await;
    assert_eq!(log.set_max_page_count(pages + 6).await, pages + 6);
    let mut next = 3;
    let err = loop {
        let entry = normal(1, next, create_token(&format!("t{next}"), 6000));
        match log.blocking_append([entry]).await {
            Ok(()) => next += 1,
            Err(e) => break e,
        }
        assert!(next < 50, "the page limit never hit");
    };
    let message = err.to_string();
    assert!(message.contains("disk holding"), "{message}");
    assert!(message.contains("is full"), "{message}");

    // What was committed before is all there, with no trace of the failed batch.
    let written: Vec<u64> = (1..next).collect();
    let entries = log.try_get_log_entries(..).await.expect("entries");
    assert_eq!(indexes(&entries), written);
    assert_eq!(log.read_vote().await.expect("vote"), Some(vote));

    // Once there is room again the same connection appends.
    log.set_max_page_count(1 << 30).await;
    log.blocking_append([blank(1, next)])
        .await
        .expect("append after room");
    drop((log, _sm, _reader));

    // And so does a fresh open (openraft stops on the first storage error, so in real life
    // a node reopens its store after the operator made room).
    let (mut log, _sm, _reader) = open_ok(&dir);
    let entries = log.try_get_log_entries(..).await.expect("entries");
    assert_eq!(indexes(&entries), (1..=next).collect::<Vec<_>>());
    log.blocking_append([blank(1, next + 1)])
        .await
        .expect("append after reopen");
    assert_eq!(
        log.get_log_state().await.expect("state").last_log_id,
        Some(log_id(1, next + 1))
    );
    assert_eq!(log.read_vote().await.expect("vote"), Some(vote));
}

// ---- applying ---------------------------------------------------------------------

#[tokio::test]
async fn rejections_are_recorded_as_responses() {
    let dir = TempDir::new().expect("temp dir");
    let (_log, mut sm, reader) = open_ok(&dir);
    let mut applied = reader.applied();
    assert_eq!(*applied.borrow(), None);

    let responses = sm
        .apply([normal(1, 1, create_token("early", 8))])
        .await
        .expect("apply");
    assert_eq!(responses, [Err(CommandError::NotInitialized)]);
    assert!(applied.has_changed().expect("sender alive"));
    assert_eq!(*applied.borrow_and_update(), Some(log_id(1, 1)));

    let responses = sm
        .apply([
            normal(1, 2, crate::model::test_init_command()),
            normal(1, 3, crate::model::test_init_command()),
            membership(1, 4),
        ])
        .await
        .expect("apply");
    assert_eq!(
        responses,
        [
            Ok(Outcome::HostJoined { host_id: 1 }),
            Err(CommandError::AlreadyInitialized {
                cluster_id: "c1".into()
            }),
            Ok(Outcome::Done),
        ]
    );
    assert_eq!(*applied.borrow_and_update(), Some(log_id(1, 4)));
    let (last, members) = sm.applied_state().await.expect("applied");
    assert_eq!(last, Some(log_id(1, 4)));
    assert_eq!(members.log_id(), &Some(log_id(1, 4)));
    let hosts = reader.read(model::list::<model::Host>).expect("hosts");
    assert_eq!(hosts.len(), 1);
}

#[tokio::test]
async fn storage_failure_during_apply_fails_the_batch_and_records_nothing() {
    let dir = TempDir::new().expect("temp dir");
    let (_log, mut sm, reader) = open_ok(&dir);
    sm.apply([normal(1, 1, crate::model::test_init_command())])
        .await
        .expect("init");

    // A read-only connection makes the model's writes fail: a storage failure, not a
    // rejection.
    sm.with_conn(|c| c.execute_batch("PRAGMA query_only = ON"))
        .await
        .expect("query_only");
    let batch = vec![blank(1, 2), normal(1, 3, create_token("t1", 8))];
    let err = sm.apply(batch.clone()).await.expect_err("apply must fail");
    assert!(
        err.to_string().contains("failed while applying entry"),
        "{err}"
    );
    assert_eq!(
        sm.applied_state().await.expect("applied").0,
        Some(log_id(1, 1))
    );
    assert_eq!(*reader.applied().borrow(), Some(log_id(1, 1)));

    sm.with_conn(|c| c.execute_batch("PRAGMA query_only = OFF"))
        .await
        .expect("query_only");
    let responses = sm.apply(batch).await.expect("apply");
    assert_eq!(responses, [Ok(Outcome::Done), Ok(Outcome::Done)]);
    let token: Option<model::JoinToken> = reader.read(|c| model::get(c, "t1")).expect("read");
    assert!(token.is_some());
}

// ---- snapshots --------------------------------------------------------------------

#[tokio::test]
async fn snapshot_carries_the_model_state_to_another_node() {
    let leader_dir = TempDir::new().expect("temp dir");
    let (_log, mut leader, _reader) = open_ok(&leader_dir);
    leader
        .apply([
            membership(1, 1),
            normal(1, 2, crate::model::test_init_command()),
            normal(1, 3, create_token("t1", 8)),
        ])
        .await
        .expect("apply");
    let snapshot = leader
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .expect("build");
    assert_eq!(snapshot.meta.last_log_id, Some(log_id(1, 3)));
    assert_eq!(snapshot.meta.last_membership.log_id(), &Some(log_id(1, 1)));
    let bytes = snapshot.snapshot.into_inner();
    assert!(bytes.starts_with(b"SQLite format 3\0"));
    // File format bytes 1/1: a rollback-journal database, complete without any -wal file.
    assert_eq!((bytes[18], bytes[19]), (1, 1));
    let current = leader
        .get_current_snapshot()
        .await
        .expect("current")
        .expect("saved");
    assert_eq!(current.meta, snapshot.meta);
    assert_eq!(current.snapshot.into_inner(), bytes);

    let follower_dir = TempDir::new().expect("temp dir");
    let meta = snapshot.meta;
    {
        let (_log, mut follower, reader) = open_ok(&follower_dir);
        let mut applied = reader.applied();
        let mut received = follower.begin_receiving_snapshot().await.expect("begin");
        received.get_mut().extend_from_slice(&bytes);
        follower
            .install_snapshot(&meta, received)
            .await
            .expect("install");

        assert!(applied.has_changed().expect("sender alive"));
        assert_eq!(*applied.borrow_and_update(), Some(log_id(1, 3)));
        let (last, members) = follower.applied_state().await.expect("applied");
        assert_eq!(
            (last, members),
            (meta.last_log_id, meta.last_membership.clone())
        );
        let info = reader.read(model::cluster_info).expect("read");
        assert_eq!(info.map(|i| i.cluster_id).as_deref(), Some("c1"));
        let mode: String = follower
            .with_conn(|c| c.pragma_query_value(None, "journal_mode", |r| r.get(0)))
            .await
            .expect("journal mode");
        assert_eq!(mode, "wal");

        // The follower carries on from the snapshot.
        let responses = follower
            .apply([normal(1, 4, create_token("t2", 8))])
            .await
            .expect("apply after install");
        assert_eq!(responses, [Ok(Outcome::Done)]);
    }

    let (_log, mut follower, reader) = open_ok(&follower_dir);
    assert_eq!(
        follower.applied_state().await.expect("applied").0,
        Some(log_id(1, 4))
    );
    let current = follower
        .get_current_snapshot()
        .await
        .expect("current")
        .expect("saved");
    assert_eq!(current.meta, meta);
    let tokens = reader.read(model::list::<model::JoinToken>).expect("read");
    assert_eq!(tokens.len(), 2);
    let mut files: Vec<String> = fs::read_dir(raft_dir(&follower_dir).join("snapshot"))
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    // The data file's name is random hex, so it may sort either side of current.json.
    files.sort_by_key(|f| f == "current.json");
    assert_eq!(files.len(), 2, "{files:?}");
    assert_eq!(files[1], "current.json");
    assert!(files[0].ends_with(".db"), "{files:?}");
}

#[tokio::test]
async fn a_bad_snapshot_is_refused_and_the_state_kept() {
    let dir = TempDir::new().expect("temp dir");
    let (_log, mut sm, reader) = open_ok(&dir);
    sm.apply([
        membership(1, 1),
        normal(1, 2, crate::model::test_init_command()),
    ])
    .await
    .expect("apply");
    let before = sm.applied_state().await.expect("applied");

    let foreign = TempDir::new().expect("temp dir");
    let foreign_db = foreign.path().join("other.db");
    foreign_database(&foreign_db, 0);
    let bad = [
        b"garbage".repeat(1000),
        fs::read(&foreign_db).expect("read"),
    ];
    for bytes in bad {
        let meta = crate::types::SnapshotMeta {
            last_log_id: Some(log_id(5, 50)),
            last_membership: before.1.clone(),
            snapshot_id: "bad".into(),
        };
        let mut received = sm.begin_receiving_snapshot().await.expect("begin");
        received.get_mut().extend_from_slice(&bytes);
        sm.install_snapshot(&meta, received)
            .await
            .expect_err("a bad snapshot must be refused");
        assert_eq!(sm.applied_state().await.expect("applied"), before);
        assert!(reader.read(model::cluster_info).expect("read").is_some());
        assert!(sm.get_current_snapshot().await.expect("current").is_none());
    }
    let leftovers = fs::read_dir(raft_dir(&dir).join("snapshot"))
        .expect("ls")
        .count();
    assert_eq!(leftovers, 0);
}
