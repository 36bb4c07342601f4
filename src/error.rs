//! Failure classification shared by every domain: whether an error means the database could not
//! be reached (transient: the guide's 503 `DATABASE_CONNECTION_ERROR`, the pools reconnect) or
//! something else (a statement's own error, a bug). The API's error type is
//! [`crate::api::error::ApiError`].

/// Whether `e` says the database could not be reached or the connection was lost (refused,
/// reset, closed, timed out, the server shutting down or out of connections), as opposed to a
/// bug or a statement's own error. Such failures are the guide's 503
/// `DATABASE_CONNECTION_ERROR`: transient, the pools reconnect by themselves.
pub fn is_connection_error(e: &(dyn std::error::Error + 'static)) -> bool {
    use fluxbase_replication::wire::WireError;
    if let Some(pe) = e.downcast_ref::<tokio_postgres::Error>() {
        return pg_connection_error(pe);
    }
    if let Some(pe) = e.downcast_ref::<deadpool_postgres::PoolError>() {
        use deadpool_postgres::PoolError as P;
        return match pe {
            P::Timeout(_) | P::Closed => true,
            P::Backend(b) => pg_connection_error(b),
            _ => false,
        };
    }
    // MySQL (the binlog stream's catalog queries, realtime's checks on a MySQL project): the
    // socket failed or the connection is gone. Never a server error: a statement can raise any
    // error number with SIGNAL.
    if let Some(me) = e.downcast_ref::<mysql_async::Error>() {
        use mysql_async::DriverError as D;
        return matches!(
            me,
            mysql_async::Error::Io(_)
                | mysql_async::Error::Driver(D::ConnectionClosed | D::PoolDisconnected)
        );
    }
    if let Some(we) = e.downcast_ref::<WireError>() {
        return match we {
            WireError::Io(_) | WireError::Timeout | WireError::Closed => true,
            // An ERROR (not FATAL) came from a live connection: a statement's own error, which a
            // caller can raise with any SQLSTATE (`RAISE … USING ERRCODE = '08006'`).
            WireError::Db(db) => db.is_fatal() && connection_sqlstate(&db.code),
            _ => false,
        };
    }
    false
}

fn pg_connection_error(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(db) = e.as_db_error() {
        use tokio_postgres::error::Severity;
        let fatal = matches!(
            db.parsed_severity(),
            Some(Severity::Fatal) | Some(Severity::Panic)
        );
        return fatal && connection_sqlstate(db.code().code());
    }
    // Connecting, reading or writing failed at the socket.
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// Connection exceptions (class 08), the server shutting down or starting (57P01-57P03), and
/// too many connections (53300), when the server sent them as FATAL (it closed the connection).
fn connection_sqlstate(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300")
}

#[cfg(test)]
mod tests {
    use super::is_connection_error;

    /// A MySQL connection that failed or closed is an outage (503, realtime's
    /// `DATABASE_CONNECTION_ERROR`); a server error never is, whatever its number: a statement
    /// can SIGNAL any (red team rt8 L3: a subscribe while MariaDB was down answered
    /// INTERNAL_ERROR).
    #[test]
    fn mysql_connection_failures_are_outages_and_server_errors_are_not() {
        let refused = mysql_async::Error::Io(mysql_async::IoError::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        assert!(is_connection_error(&refused));
        let closed = mysql_async::Error::Driver(mysql_async::DriverError::ConnectionClosed);
        assert!(is_connection_error(&closed));
        let signalled = mysql_async::Error::Server(mysql_async::ServerError {
            code: 1040,
            message: "Too many connections".into(),
            state: "08004".into(),
        });
        assert!(!is_connection_error(&signalled));
        let through_anyhow = anyhow::Error::from(refused).context("subscribing");
        assert!(through_anyhow.chain().any(is_connection_error));
    }
}

/// A request body of which no byte arrived for this many seconds (`body_idle_timeout_secs`):
/// the error a body stream ends with, which every domain reading one (an upload's form) passes
/// on as the API's 408 `REQUEST_TIMEOUT`.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("no byte of the request body arrived for {0} s")]
pub struct BodyStalled(pub u64);
