//! Webhooks: delivery end to end through the real server, and the egress client against raw
//! loopback receivers.

mod claims;
mod delivery;
mod egress;
mod limits;
mod ordering;
