//! Change capture: the change stream on the bus, the replication and wire clients against the
//! real cluster, and the database going away and coming back.

mod outage;
mod replication;
mod status;
mod stream;
mod wire;
