//! MySQL projects (issue 20; part B: the binlog stream, `binlog*.rs`) through the real server on the shared MariaDB: projects
//! with an engine, the accounts of each scope and what they cannot reach, `/api/execute-sql`'s
//! answers and values (MariaDB's own `JSON_OBJECT` as the oracle), the embedded server and its
//! binary log retention (`retention.rs`), `fluxbase doctor` on an operator's server.

mod answers;
mod binlog;
mod binlog_restart;
mod doctor;
mod engine;
mod execute;
mod isolation;
mod redteam;
mod retention;
mod sandbox;
mod shares;
mod values;
