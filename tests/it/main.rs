//! Integration tests: real PostgreSQL, real HTTP, one binary (see `support`). One folder per
//! area of `src/`.

mod support;

mod accounts;
mod cdc;
mod cluster;
mod dashboard;
mod mysql;
mod operations;
mod realtime;
mod sql;
mod storage;
mod webhooks;
