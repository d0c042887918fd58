//! The SQL both backends speak: values, parameters and rows that mean the same on SQLite and
//! PostgreSQL. Statements are written once, with `?1`-style parameters (PostgreSQL is sent
//! `$1`), in the SQL the two share (`INSERT … ON CONFLICT`, `RETURNING`, `LIMIT`).
//!
//! Values are loosely typed like SQLite's: an integer parameter is sent as whatever integer type
//! PostgreSQL inferred for its place (`INTEGER`, `BIGINT`), and an integer column reads as
//! `i64` whatever its width, so a family's tables work unchanged on both.

use crate::StorageError;

/// A value as both backends store it.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlValue {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl SqlValue {
    fn kind(&self) -> &'static str {
        match self {
            Self::Null => "NULL",
            Self::Int(_) => "an integer",
            Self::Real(_) => "a real",
            Self::Text(_) => "text",
            Self::Blob(_) => "bytes",
        }
    }
}

/// A statement parameter.
pub trait ToSql {
    fn to_sql(&self) -> SqlValue;
}

macro_rules! int_to_sql {
    ($($t:ty),*) => {$(
        impl ToSql for $t {
            fn to_sql(&self) -> SqlValue {
                SqlValue::Int(i64::from(*self))
            }
        }
    )*};
}
int_to_sql!(i64, i32, u32, u16, u8, bool);

impl ToSql for f64 {
    fn to_sql(&self) -> SqlValue {
        SqlValue::Real(*self)
    }
}

impl ToSql for str {
    fn to_sql(&self) -> SqlValue {
        SqlValue::Text(self.to_owned())
    }
}

impl ToSql for String {
    fn to_sql(&self) -> SqlValue {
        SqlValue::Text(self.clone())
    }
}

impl ToSql for [u8] {
    fn to_sql(&self) -> SqlValue {
        SqlValue::Blob(self.to_vec())
    }
}

impl ToSql for Vec<u8> {
    fn to_sql(&self) -> SqlValue {
        SqlValue::Blob(self.clone())
    }
}

impl<T: ToSql> ToSql for Option<T> {
    fn to_sql(&self) -> SqlValue {
        self.as_ref().map_or(SqlValue::Null, ToSql::to_sql)
    }
}

impl<T: ToSql + ?Sized> ToSql for &T {
    fn to_sql(&self) -> SqlValue {
        (**self).to_sql()
    }
}

/// The parameters of a statement, in order (`params![a, b]`).
pub type Params<'p> = &'p [&'p dyn ToSql];

/// Parameters for a statement: `params![id, owner]`.
#[macro_export]
macro_rules! params {
    () => { &[] as &[&dyn $crate::sql::ToSql] };
    ($($p:expr),+ $(,)?) => { &[$(&$p as &dyn $crate::sql::ToSql),+] as &[&dyn $crate::sql::ToSql] };
}
pub use crate::params;

/// A value read from a row.
pub trait FromSql: Sized {
    /// `None` when `value` is not of this type.
    fn from_sql(value: &SqlValue) -> Option<Self>;
    const WHAT: &'static str;
}

impl FromSql for i64 {
    fn from_sql(value: &SqlValue) -> Option<Self> {
        if let SqlValue::Int(i) = value { Some(*i) } else { None }
    }
    const WHAT: &'static str = "an integer";
}

impl FromSql for bool {
    fn from_sql(value: &SqlValue) -> Option<Self> {
        i64::from_sql(value).map(|i| i != 0)
    }
    const WHAT: &'static str = "a boolean";
}

impl FromSql for f64 {
    fn from_sql(value: &SqlValue) -> Option<Self> {
        match value {
            SqlValue::Real(f) => Some(*f),
            SqlValue::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
    const WHAT: &'static str = "a real";
}

impl FromSql for String {
    fn from_sql(value: &SqlValue) -> Option<Self> {
        if let SqlValue::Text(s) = value { Some(s.clone()) } else { None }
    }
    const WHAT: &'static str = "text";
}

impl FromSql for Vec<u8> {
    fn from_sql(value: &SqlValue) -> Option<Self> {
        if let SqlValue::Blob(b) = value { Some(b.clone()) } else { None }
    }
    const WHAT: &'static str = "bytes";
}

impl<T: FromSql> FromSql for Option<T> {
    fn from_sql(value: &SqlValue) -> Option<Self> {
        match value {
            SqlValue::Null => Some(None),
            v => T::from_sql(v).map(Some),
        }
    }
    const WHAT: &'static str = T::WHAT;
}

/// One row a query answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Row(pub(crate) Vec<SqlValue>);

impl Row {
    /// Column `i` (from 0) as a `T`.
    ///
    /// # Errors
    /// [`StorageError::Corrupt`] when there is no such column or it holds another type.
    pub fn get<T: FromSql>(&self, i: usize) -> Result<T, StorageError> {
        let value =
            self.0.get(i).ok_or_else(|| StorageError::Corrupt(format!("the row has no column {i}")))?;
        T::from_sql(value).ok_or_else(|| {
            StorageError::Corrupt(format!("column {i} holds {}, not {}", value.kind(), T::WHAT))
        })
    }
}

/// `sql` with `?N` parameters as PostgreSQL writes them (`$N`); quoted text is left alone.
pub(crate) fn numbered_dollars(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quoted = false;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\'' {
            quoted = !quoted;
        }
        if c == '?' && !quoted && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

/// A family's migration as PostgreSQL runs it: SQLite's `INTEGER` is 64 bits, PostgreSQL's
/// 32, so the type is written `BIGINT` there (whole words outside quoted text; the rest as
/// written).
pub(crate) fn postgres_ddl(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quoted = false;
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        out.push_str(if word.eq_ignore_ascii_case("INTEGER") { "BIGINT" } else { word });
        word.clear();
    };
    for c in sql.chars() {
        if !quoted && (c.is_ascii_alphanumeric() || c == '_') {
            word.push(c);
            continue;
        }
        flush(&mut word, &mut out);
        if c == '\'' {
            quoted = !quoted;
        }
        out.push(c);
    }
    flush(&mut word, &mut out);
    out
}

// ---- SQLite --------------------------------------------------------------------------------

impl rusqlite::ToSql for SqlValue {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            Self::Null => ValueRef::Null,
            Self::Int(i) => ValueRef::Integer(*i),
            Self::Real(f) => ValueRef::Real(*f),
            Self::Text(s) => ValueRef::Text(s.as_bytes()),
            Self::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

pub(crate) fn sqlite_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    use rusqlite::types::ValueRef;
    let n = row.as_ref().column_count();
    let mut values = Vec::with_capacity(n);
    for i in 0..n {
        values.push(match row.get_ref(i)? {
            ValueRef::Null => SqlValue::Null,
            ValueRef::Integer(i) => SqlValue::Int(i),
            ValueRef::Real(f) => SqlValue::Real(f),
            ValueRef::Text(t) => SqlValue::Text(String::from_utf8_lossy(t).into_owned()),
            ValueRef::Blob(b) => SqlValue::Blob(b.to_vec()),
        });
    }
    Ok(Row(values))
}

pub(crate) fn sqlite_params(params: Params<'_>) -> Vec<SqlValue> {
    params.iter().map(|p| p.to_sql()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_numbered_for_postgres_outside_quoted_text() {
        assert_eq!(
            numbered_dollars("SELECT a FROM t WHERE b = ?1 AND c = '?2' AND d = ?12"),
            "SELECT a FROM t WHERE b = $1 AND c = '?2' AND d = $12"
        );
    }

    #[test]
    fn families_integers_are_64_bits_on_postgres() {
        assert_eq!(
            postgres_ddl("CREATE TABLE t (a INTEGER NOT NULL, integers TEXT DEFAULT 'INTEGER', b integer)"),
            "CREATE TABLE t (a BIGINT NOT NULL, integers TEXT DEFAULT 'INTEGER', b BIGINT)"
        );
    }

    #[test]
    fn a_column_of_another_type_is_a_clear_error() {
        let row = Row(vec![SqlValue::Text("x".into()), SqlValue::Null]);
        assert_eq!(row.get::<String>(0).unwrap(), "x");
        assert_eq!(row.get::<Option<i64>>(1).unwrap(), None);
        let e = row.get::<i64>(0).unwrap_err().to_string();
        assert!(e.contains("column 0 holds text, not an integer"), "{e}");
        assert!(row.get::<i64>(5).is_err());
    }
}
