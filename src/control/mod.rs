//! Every query on the control database's schema (`fluxbase.*`), one file per table: typed rows
//! in, typed rows out, each function taking the client or transaction it runs on. The domains
//! decide what to do with the rows; nothing here knows HTTP.

pub mod api_keys;
pub mod buckets;
pub mod deliveries;
pub mod files;
pub mod instance;
pub mod invitations;
pub mod members;
pub mod projects;
pub mod sessions;
pub mod teardowns;
pub mod users;
pub mod webhooks;

/// Text columns read and written as enums: an unknown value fails the query (an error, never a
/// panic), and a value written is always one the schema's CHECK accepts.
macro_rules! text_enum {
    ($($t:ty),* $(,)?) => {$(
        impl<'a> tokio_postgres::types::FromSql<'a> for $t {
            fn from_sql(
                ty: &tokio_postgres::types::Type,
                raw: &'a [u8],
            ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
                let text = <&str as tokio_postgres::types::FromSql>::from_sql(ty, raw)?;
                <$t>::parse(text).ok_or_else(|| {
                    format!("unknown {} {text:?}", stringify!($t)).into()
                })
            }

            fn accepts(ty: &tokio_postgres::types::Type) -> bool {
                <&str as tokio_postgres::types::FromSql>::accepts(ty)
            }
        }

        impl tokio_postgres::types::ToSql for $t {
            fn to_sql(
                &self,
                ty: &tokio_postgres::types::Type,
                out: &mut bytes::BytesMut,
            ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
                self.as_str().to_sql(ty, out)
            }

            fn accepts(ty: &tokio_postgres::types::Type) -> bool {
                <&str as tokio_postgres::types::ToSql>::accepts(ty)
            }

            tokio_postgres::types::to_sql_checked!();
        }
    )*};
}

text_enum!(
    crate::auth::Scope,
    crate::auth::MemberRole,
    crate::projects::ProjectStatus,
    crate::team::InviteStatus,
);
