//! Queries on the control database (schema `fluxbase`): one file per table, typed rows, functions
//! taking a client or transaction. Domain services call these; nothing else writes SQL against
//! the control schema.

pub mod deliveries;
pub mod webhooks;
