//! Integration tests: real PostgreSQL, real HTTP, one binary (see `support`).

mod support;

mod accounts;
mod cli;
mod guide;
mod sql;
mod values;
mod wire;
