//! Integration tests: real PostgreSQL, real HTTP, one binary (see `support`).

mod support;

mod accounts;
mod cdc;
mod cli;
mod guide;
mod realtime;
mod replication;
mod sql;
mod values;
mod wire;
