//! Running the server: what only the operator may reach, the binary as a newcomer runs it,
//! bounded resources, red-team findings, and the integration guide's own samples.

mod cli;
mod guide;
mod limits;
mod operator;
mod red;
