//! Fluxbase: a backend-as-a-service in front of PostgreSQL.
//!
//! The server is one binary: an HTTP API (SQL over HTTP with scoped API keys, accounts,
//! projects, keys) in front of a control database and one PostgreSQL database per project. See
//! the README for the architecture; each module's docs explain its part.

pub mod accounts;
pub mod api;
pub mod app;
#[cfg(test)]
mod architecture;
pub mod auth;
pub mod budget;
pub mod bus;
pub mod catalog;
pub mod cdc;
pub mod cluster;
pub mod config;
pub mod control;
pub mod db;
pub mod doctor;
pub mod embedded;
pub mod error;
pub mod keys;
pub mod metrics;
pub mod mysql;
pub mod os_user;
pub mod projects;
pub mod realtime;
pub mod rls;
pub mod secrets;
pub mod sql;
pub mod storage;
pub mod supervise;
pub mod team;
pub mod text;
pub mod visibility;
pub mod webhooks;
