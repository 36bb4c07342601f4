//! Integration tests: real PostgreSQL, real HTTP, one binary (see `support`).

mod support;

mod accounts;
mod broadcast_epoch;
mod catch_up_sharing;
mod cdc;
mod channels;
mod cli;
mod egress;
mod guide;
mod limits;
mod openapi;
mod operations;
mod outage;
mod realtime;
mod realtime_rls;
mod realtime_slow_link;
mod red;
mod replication;
mod resume;
mod rls;
mod sandbox;
mod sql;
mod storage;
mod team;
mod values;
mod webhooks;
mod wire;
