//! Accounts: users, sessions, projects and keys; teams with their invitations and roles.

mod team;
mod users;
