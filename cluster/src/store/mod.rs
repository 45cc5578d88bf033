//! placeholder: replaced by the SQLite raft store
