//! Enums mirrored by PostgreSQL enums, each value's name written once.

/// Declares a fieldless enum mirrored by a PostgreSQL enum of the given type, each variant's
/// name written once: its serde name, its sqlx name, `as_str`, `parse`, `Display` and `ALL`
/// (in declaration order, which must be the database enum's) all come from it, so they agree
/// by construction. Tests compare `ALL` with the database's labels.
///
/// The names are taken as `tt`, not `literal`: a `literal` fragment reaches derives wrapped
/// in an invisible group, which serde and sqlx read but utoipa silently ignores (the OpenAPI
/// document then said `"Completed"`; `http::tests` guards it).
macro_rules! db_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident in $sql:tt {
            $( $(#[$vmeta:meta])* $variant:ident = $text:tt ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, sqlx::Type)]
        #[sqlx(type_name = $sql)]
        $vis enum $name {
            $( $(#[$vmeta])* #[serde(rename = $text)] #[sqlx(rename = $text)] $variant, )*
        }

        impl $name {
            /// Every value, in the order of the database enum.
            pub const ALL: [Self; [$($text),*].len()] = [$(Self::$variant),*];

            /// The name used in the API, the database and metric labels.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)*
                }
            }

            /// The value `as_str` names, if any.
            pub fn parse(name: &str) -> Option<Self> {
                Self::ALL.into_iter().find(|v| v.as_str() == name)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(self.as_str())
            }
        }
    };
}
