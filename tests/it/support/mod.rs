//! Test harness, one file a job:
//! - `cluster`: the throwaway PostgreSQL cluster shared by the binary, scratch dirs, a dedicated
//!   cluster for a test that would hurt the others;
//! - `app`: the real server in-process (`spawn_app()`), stopped on drop;
//! - `process`: the real binary as a child process, and any child, killed on drop;
//! - `fixtures`: users, projects and keys; `http`: requests to a server known by its URL;
//! - `ws`: the WebSocket client; `bus`: reading the event bus; `poll`: waiting with a deadline;
//! - `guide`: the guide's `realtime.js` client in Node against a project;
//! - `receiver`: a webhook receiver; `multipart`: upload bodies; `fs`: files on disk;
//! - `mariadb`: the MariaDB shared by the binary (MySQL projects: `spawn_mysql_app()`,
//!   `mysql_fixture()`);
//! - `nats`: `nats-server -js` as a child process (`nats()` shared, or a test's own to kill
//!   and restart); `nodes`: several `fluxbase serve` processes as one cluster.

#![allow(dead_code)]

pub mod app;
pub mod bus;
pub mod cluster;
pub mod fixtures;
pub mod fs;
pub mod guide;
pub mod http;
pub mod mariadb;
pub mod multipart;
pub mod nats;
pub mod nodes;
pub mod poll;
pub mod process;
pub mod receiver;
pub mod ws;

pub use app::{
    spawn_app, spawn_app_with, spawn_webhook_app, start_with, start_with_durable, TestApp,
};
pub use cluster::{pg, scratch_dir, unique};
pub use fixtures::Fixture;
