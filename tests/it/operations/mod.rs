//! Running the server: what only the operator may reach, the binary as a newcomer runs it,
//! bounded resources, red-team findings, the integration guide's own samples, and the API
//! document checked against the live server.

mod cli;
pub mod guide;
mod limits;
mod openapi;
mod operator;
mod red;
mod teardown;
