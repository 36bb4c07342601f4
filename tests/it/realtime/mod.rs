//! Realtime: rooms and their protocol, row-level security on sockets, resume from the durable
//! history, slow links, and every change reaching every channel (socket and webhook alike).

mod broadcast_epoch;
mod catch_up_sharing;
mod channels;
mod resume;
mod rls;
mod rooms;
mod slow_link;
