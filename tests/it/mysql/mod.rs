//! MySQL projects (issue 20, part A) through the real server on the shared MariaDB: projects
//! with an engine, the accounts of each scope and what they cannot reach, `/api/execute-sql`'s
//! answers and values (MariaDB's own `JSON_OBJECT` as the oracle), the embedded server.

mod binlog;
mod binlog_restart;
mod engine;
mod execute;
mod sandbox;
mod values;
