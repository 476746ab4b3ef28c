//! Dynamic SQL with numbered parameters, for queries whose conditions depend on the request (start points,
//! paging cursors, `IN` lists). Only placeholders are generated into the text; every value is bound.

use sqlx::{Any, AssertSqlSafe, any::AnyArguments, query::Query};

/// A bound value.
#[derive(Clone, Debug)]
pub enum Value {
    /// TEXT.
    Text(String),
    /// BIGINT.
    Int(i64),
}

/// SQL text plus its values, placeholders numbered `$1…` in order of use.
#[derive(Clone, Debug, Default)]
pub struct Sql {
    text: String,
    values: Vec<Value>,
}

impl Sql {
    /// Starts with `text` (no placeholders).
    pub fn new(text: &str) -> Self {
        Self {
            text: text.to_owned(),
            values: Vec::new(),
        }
    }

    /// Appends literal SQL.
    pub fn push(&mut self, text: &str) -> &mut Self {
        self.text.push_str(text);
        self
    }

    /// Binds `value` and returns its placeholder (`$N`), to be written into the text with [`Self::push`].
    pub fn bind(&mut self, value: impl Into<Value>) -> String {
        self.values.push(value.into());
        format!("${}", self.values.len())
    }

    /// `$a, $b, …` for a list (an `IN (…)` body).
    pub fn bind_list<V: Into<Value>>(&mut self, values: impl IntoIterator<Item = V>) -> String {
        values
            .into_iter()
            .map(|v| self.bind(v))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The sqlx query, values bound.
    pub fn query(self) -> Query<'static, Any, AnyArguments> {
        let mut q = sqlx::query(AssertSqlSafe(self.text));
        for v in self.values {
            q = match v {
                Value::Text(s) => q.bind(s),
                Value::Int(i) => q.bind(i),
            };
        }
        q
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Text(s)
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Text(s.to_owned())
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Int(i)
    }
}

impl From<uuid::Uuid> for Value {
    fn from(id: uuid::Uuid) -> Self {
        Value::Text(id.hyphenated().to_string())
    }
}

/// Column `index` of `row`, a UUID stored as canonical text, as a [`uuid::Uuid`]: storage hands domain types
/// to its callers, never the text form.
///
/// # Errors
/// The column is missing, not text, or not a UUID (a decode error).
pub fn uuid_at(row: &sqlx::any::AnyRow, index: usize) -> Result<uuid::Uuid, sqlx::Error> {
    use sqlx::Row;
    let text: String = row.try_get(index)?;
    uuid::Uuid::parse_str(&text).map_err(|e| sqlx::Error::ColumnDecode {
        index: index.to_string(),
        source: Box::new(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_in_order_of_use() {
        let mut sql = Sql::new("SELECT * FROM t WHERE a = ");
        let a = sql.bind(1i64);
        sql.push(&a).push(" AND b IN (");
        let list = sql.bind_list(["x", "y"]);
        sql.push(&list).push(")");
        assert_eq!(sql.text, "SELECT * FROM t WHERE a = $1 AND b IN ($2, $3)");
        assert_eq!(sql.values.len(), 3);
    }
}
