//! The search index: written from events, read by the RPCs.

use std::collections::BTreeMap;

use keel_common::db::Pool;
use killrvideo::{
    events::VideoAdded,
    sql::{Sql, uuid_at},
    words,
};
use sqlx::Row;

/// Weight of a word found in the name, a tag, the description.
pub const NAME_WEIGHT: i64 = 4;
/// See [`NAME_WEIGHT`].
pub const TAG_WEIGHT: i64 = 2;
/// See [`NAME_WEIGHT`].
pub const DESCRIPTION_WEIGHT: i64 = 1;

/// Words too common to suggest.
const STOP_WORDS: &[&str] = &[
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "from", "in", "into", "is",
    "it", "of", "on", "or", "the", "to", "with",
];

/// One hit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hit {
    /// The video.
    pub video_id: uuid::Uuid,
    /// Milliseconds since the epoch.
    pub added_ms: i64,
    /// Name.
    pub name: String,
    /// Thumbnail.
    pub preview_image_location: String,
    /// Uploader.
    pub user_id: uuid::Uuid,
}

/// The term weights of a video.
pub fn terms(name: &str, tags: &[String], description: &str) -> BTreeMap<String, i64> {
    let mut weights: BTreeMap<String, i64> = BTreeMap::new();
    let mut add = |text: &str, w: i64| {
        let mut seen = std::collections::BTreeSet::new();
        for word in words(text) {
            if seen.insert(word.clone()) {
                *weights.entry(word).or_default() += w;
            }
        }
    };
    add(name, NAME_WEIGHT);
    add(&tags.join(" "), TAG_WEIGHT);
    add(description, DESCRIPTION_WEIGHT);
    weights
}

/// Suggestions a video contributes: its lowercase tags and the name words of 3 letters or more.
pub fn suggestions(name: &str, tags: &[String]) -> Vec<String> {
    let mut out: Vec<String> = tags
        .iter()
        .map(|t| t.trim().to_lowercase())
        .filter(|t| !t.is_empty())
        .chain(words(name).filter(|w| w.chars().count() >= 3 && !STOP_WORDS.contains(&w.as_str())))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The index tables.
#[derive(Clone, Debug)]
pub struct Index {
    pool: Pool,
}

impl Index {
    /// The index over a migrated `pool`.
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    /// Indexes a video; applying the same event again leaves the index as it was (idempotent).
    ///
    /// # Errors
    /// Database failures.
    pub async fn add(&self, e: &VideoAdded) -> Result<(), sqlx::Error> {
        let video_id = e.video_id.hyphenated().to_string();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO search_videos (videoid, userid, name, preview_image_location, added_ms) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (videoid) DO UPDATE SET userid = excluded.userid, \
             name = excluded.name, preview_image_location = excluded.preview_image_location, \
             added_ms = excluded.added_ms",
        )
        .bind(&video_id)
        .bind(e.user_id.hyphenated().to_string())
        .bind(&e.name)
        .bind(&e.preview_image_location)
        .bind(e.added_ms)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM search_terms WHERE videoid = $1")
            .bind(&video_id)
            .execute(&mut *tx)
            .await?;
        for (term, weight) in terms(&e.name, &e.tags, &e.description) {
            sqlx::query("INSERT INTO search_terms (term, videoid, weight) VALUES ($1, $2, $3)")
                .bind(term)
                .bind(&video_id)
                .bind(weight)
                .execute(&mut *tx)
                .await?;
        }
        for s in suggestions(&e.name, &e.tags) {
            sqlx::query(
                "INSERT INTO search_suggestions (term) VALUES ($1) ON CONFLICT (term) DO NOTHING",
            )
            .bind(s)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    /// Videos matching any word of `query`: most words matched first, then highest weight, then newest.
    ///
    /// # Errors
    /// Database failures.
    pub async fn search(
        &self,
        query: &str,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<Hit>, sqlx::Error> {
        let mut terms: Vec<String> = words(query).collect();
        terms.sort();
        terms.dedup();
        if terms.is_empty() {
            return Ok(Vec::new());
        }
        let mut sql = Sql::new(
            "SELECT v.videoid, v.added_ms, v.name, v.preview_image_location, v.userid \
             FROM search_terms t JOIN search_videos v ON v.videoid = t.videoid WHERE t.term IN (",
        );
        let list = sql.bind_list(terms);
        sql.push(&list);
        let (l, o) = (sql.bind(limit as i64), sql.bind(offset as i64));
        sql.push(&format!(
            ") GROUP BY v.videoid, v.added_ms, v.name, v.preview_image_location, v.userid \
             ORDER BY COUNT(*) DESC, SUM(t.weight) DESC, v.added_ms DESC, v.videoid LIMIT {l} OFFSET {o}"
        ));
        sql.query()
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| {
                Ok(Hit {
                    video_id: uuid_at(r, 0)?,
                    added_ms: r.try_get(1)?,
                    name: r.try_get(2)?,
                    preview_image_location: r.try_get(3)?,
                    user_id: uuid_at(r, 4)?,
                })
            })
            .collect()
    }

    /// Up to `limit` suggestions starting with `prefix` (lowercase), in ascending order.
    ///
    /// # Errors
    /// Database failures.
    pub async fn suggest(&self, prefix: &str, limit: usize) -> Result<Vec<String>, sqlx::Error> {
        let pattern: String = prefix
            .chars()
            .flat_map(|c| match c {
                '!' | '%' | '_' => vec!['!', c],
                c => vec![c],
            })
            .chain(std::iter::once('%'))
            .collect();
        sqlx::query("SELECT term FROM search_suggestions WHERE term LIKE $1 ESCAPE '!' ORDER BY term LIMIT $2")
            .bind(pattern)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_add_up_per_field_and_suggestions_are_tags_and_name_words() {
        let t = terms(
            "Star Wars: The Force",
            &["star wars".into(), "sci-fi".into()],
            "a star is born",
        );
        assert_eq!(t["star"], NAME_WEIGHT + TAG_WEIGHT + DESCRIPTION_WEIGHT);
        assert_eq!(t["wars"], NAME_WEIGHT + TAG_WEIGHT);
        assert_eq!(t["sci"], TAG_WEIGHT);
        assert_eq!(
            suggestions("Star Wars: The Force", &["Star Wars".into()]),
            vec!["force", "star", "star wars", "wars"]
        );
    }
}
