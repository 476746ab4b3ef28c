//! The data sets in `shared/data` (`SOURCES.md` there gives origin, columns and counts), read into the
//! shapes the KillrVideo APIs take.
//!
//! - `pmcfadin_astra_killrvideo_data/`: the classic movie data set: 43,800 users (movie-credit names, no
//!   emails) and 1,011 movie trailers (YouTube watch URLs, tags as CQL set literals). Its CSVs use backslash
//!   escapes.
//! - `killrvideo-data/data_csv/`: 500 real DataStax YouTube videos (`videos_cleaned.csv`), 150 users with
//!   emails, and synthetic comments, per-user ratings and play counts. Those three files name the videos by the
//!   ids of the upstream `videos.csv` (not copied); its rows are in the same order as `videos_cleaned.csv`
//!   and `video_playback_stats.csv` (one row per video), which `latest_videos.csv` confirms by name for 100 of
//!   them: [`Dataset::load`] maps the ids row by row and fails if that check does not hold.

use std::{collections::HashMap, path::Path};

use anyhow::{Context, bail};

/// One user to create.
#[derive(Clone, Debug)]
pub struct User {
    /// UUID text.
    pub id: String,
    /// First name.
    pub first_name: String,
    /// Last name.
    pub last_name: String,
    /// Email (made up from the name and id where the data set has none).
    pub email: String,
}

/// One YouTube video to submit.
#[derive(Clone, Debug)]
pub struct Video {
    /// UUID text.
    pub id: String,
    /// Uploader's UUID text.
    pub user_id: String,
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Tags.
    pub tags: Vec<String>,
    /// The 11-character YouTube id.
    pub youtube_id: String,
}

/// One comment.
#[derive(Clone, Debug)]
pub struct Comment {
    /// Video UUID text.
    pub video_id: String,
    /// Author UUID text.
    pub user_id: String,
    /// Version-1 UUID text.
    pub comment_id: String,
    /// Text.
    pub text: String,
}

/// One rating.
#[derive(Clone, Debug)]
pub struct Rating {
    /// Video UUID text.
    pub video_id: String,
    /// User UUID text.
    pub user_id: String,
    /// 1..=5.
    pub rating: i32,
}

/// Everything to load, in load order.
#[derive(Debug, Default)]
pub struct Dataset {
    /// Users (uploaders always included).
    pub users: Vec<User>,
    /// Videos: the 1,011 trailers, then the 500 YouTube videos.
    pub videos: Vec<Video>,
    /// Comments on the YouTube videos.
    pub comments: Vec<Comment>,
    /// Ratings of the YouTube videos.
    pub ratings: Vec<Rating>,
    /// Play counts by video id.
    pub plays: Vec<(String, u64)>,
}

/// The YouTube id in a watch URL (`…watch?v=ID`), an embed URL (`…/embed/ID`) or a bare id.
pub fn youtube_id(location: &str) -> String {
    let l = location.trim();
    if let Some((_, rest)) = l.split_once("v=") {
        return rest.split(['&', '#']).next().unwrap_or_default().to_owned();
    }
    if let Some((_, rest)) = l.split_once("/embed/") {
        return rest
            .split(['?', '/', '#'])
            .next()
            .unwrap_or_default()
            .to_owned();
    }
    l.to_owned()
}

/// The elements of a CQL set literal: `{'a', 'b'}` or `{"a","b"}`.
pub fn set_literal(s: &str) -> Vec<String> {
    s.trim()
        .trim_start_matches('{')
        .trim_end_matches('}')
        .split(',')
        .map(|t| {
            t.trim()
                .trim_matches(|c| c == '\'' || c == '"')
                .trim()
                .to_owned()
        })
        .filter(|t| !t.is_empty())
        .collect()
}

/// An email for a user the data set gives none: `first.last.<8 hex of id>@users.killrvideo.example`.
pub fn made_up_email(first: &str, last: &str, id: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_lowercase()
    };
    let mut local = [clean(first), clean(last)]
        .into_iter()
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(".");
    if local.is_empty() {
        local = "user".into();
    }
    let tag: String = id
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .take(8)
        .collect();
    format!("{local}.{tag}@users.killrvideo.example")
}

fn reader(
    path: &Path,
    backslash_escapes: bool,
    headers: bool,
) -> anyhow::Result<csv::Reader<std::fs::File>> {
    let mut b = csv::ReaderBuilder::new();
    b.has_headers(headers).flexible(true);
    if backslash_escapes {
        b.escape(Some(b'\\')).double_quote(false);
    }
    b.from_path(path)
        .with_context(|| format!("cannot read {}", path.display()))
}

fn rows(path: &Path, backslash_escapes: bool) -> anyhow::Result<Vec<csv::StringRecord>> {
    reader(path, backslash_escapes, true)?
        .records()
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad CSV in {}", path.display()))
}

/// Rows of a CSV with a header, as maps by column name.
fn table(path: &Path) -> anyhow::Result<Vec<HashMap<String, String>>> {
    let mut r = reader(path, false, true)?;
    let headers: Vec<String> = r.headers()?.iter().map(|h| h.trim().to_owned()).collect();
    r.records()
        .map(|rec| {
            let rec = rec.with_context(|| format!("bad CSV in {}", path.display()))?;
            Ok(headers
                .iter()
                .cloned()
                .zip(rec.iter().map(str::to_owned))
                .collect())
        })
        .collect()
}

fn get<'a>(row: &'a HashMap<String, String>, col: &str) -> &'a str {
    row.get(col).map(String::as_str).unwrap_or_default().trim()
}

impl Dataset {
    /// Reads the data sets under `dir` (the `shared/data` folder). `max_users` limits the 43,800 movie-data
    /// users (the trailers' uploaders are always included).
    ///
    /// # Errors
    /// A file is missing or malformed, or the video-id alignment check fails.
    pub fn load(dir: &Path, max_users: Option<usize>) -> anyhow::Result<Self> {
        let mut d = Dataset::default();
        let movies = dir.join("pmcfadin_astra_killrvideo_data");
        let yt = dir.join("killrvideo-data/data_csv");

        // Trailers: videoid, added_date, description, location, location_type, name, preview, tags, user_id.
        let mut uploaders = std::collections::HashSet::new();
        for r in rows(&movies.join("videos.csv"), true)? {
            let f = |i: usize| r.get(i).unwrap_or_default().trim().to_owned();
            uploaders.insert(f(8));
            d.videos.push(Video {
                id: f(0),
                user_id: f(8),
                name: f(5),
                description: f(2),
                tags: set_literal(&f(7)),
                youtube_id: youtube_id(&f(3)),
            });
        }
        // Movie users: userid, created_date (empty), email (empty), firstname, lastname.
        let mut taken = 0usize;
        for r in rows(&movies.join("users.csv"), true)? {
            let f = |i: usize| r.get(i).unwrap_or_default().trim().to_owned();
            let id = f(0);
            if uuid::Uuid::parse_str(&id).is_err() {
                continue;
            }
            let is_uploader = uploaders.contains(&id);
            if !is_uploader && max_users.is_some_and(|m| taken >= m) {
                continue;
            }
            taken += usize::from(!is_uploader);
            let (first, last) = (f(3), f(4));
            d.users.push(User {
                email: made_up_email(&first, &last, &id),
                id,
                first_name: first,
                last_name: last,
            });
        }

        // YouTube users with their emails.
        let mut known: std::collections::HashSet<String> =
            d.users.iter().map(|u| u.id.clone()).collect();
        for r in table(&yt.join("users.csv"))? {
            let id = get(&r, "userid").to_owned();
            known.insert(id.clone());
            d.users.push(User {
                id,
                first_name: get(&r, "firstname").into(),
                last_name: get(&r, "lastname").into(),
                email: get(&r, "email").into(),
            });
        }
        // The 500 YouTube videos, in file order.
        let yt_videos = table(&yt.join("videos_cleaned.csv"))?;
        for r in &yt_videos {
            let user = get(r, "userid").to_owned();
            if known.insert(user.clone()) {
                d.users.push(User {
                    email: made_up_email("creator", "", &user),
                    id: user.clone(),
                    first_name: "KillrVideo".into(),
                    last_name: "Creator".into(),
                });
            }
            d.videos.push(Video {
                id: get(r, "videoid").into(),
                user_id: user,
                name: get(r, "name").into(),
                description: get(r, "description").into(),
                tags: set_literal(get(r, "tags")),
                youtube_id: youtube_id(get(r, "location")),
            });
        }

        // Upstream video ids → ours, row by row, checked against latest_videos.csv by name.
        let plays = table(&yt.join("video_playback_stats.csv"))?;
        if plays.len() != yt_videos.len() {
            bail!(
                "video_playback_stats.csv has {} rows, videos_cleaned.csv {}",
                plays.len(),
                yt_videos.len()
            );
        }
        let map: HashMap<String, usize> = plays
            .iter()
            .enumerate()
            .map(|(i, r)| (get(r, "videoid").to_owned(), i))
            .collect();
        for r in table(&yt.join("latest_videos.csv"))? {
            let i = map.get(get(&r, "videoid")).copied();
            let ours = i.map(|i| get(&yt_videos[i], "name"));
            if ours != Some(get(&r, "name")) {
                bail!(
                    "the video id alignment does not hold for {:?} ({:?})",
                    get(&r, "name"),
                    ours
                );
            }
        }
        let ours = |upstream: &str| {
            map.get(upstream)
                .map(|i| get(&yt_videos[*i], "videoid").to_owned())
        };
        for r in &plays {
            let views: u64 = get(r, "views").parse().unwrap_or(0);
            d.plays
                .push((ours(get(r, "videoid")).unwrap_or_default(), views));
        }
        for r in table(&yt.join("comments.csv"))? {
            if let Some(video_id) = ours(get(&r, "videoid")) {
                d.comments.push(Comment {
                    video_id,
                    user_id: get(&r, "userid").into(),
                    comment_id: get(&r, "commentid").into(),
                    text: get(&r, "comment").into(),
                });
            }
        }
        for r in table(&yt.join("video_ratings_by_user.csv"))? {
            if let Some(video_id) = ours(get(&r, "videoid")) {
                d.ratings.push(Rating {
                    video_id,
                    user_id: get(&r, "userid").into(),
                    rating: get(&r, "rating").parse().unwrap_or(0),
                });
            }
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn youtube_ids_tags_and_emails() {
        assert_eq!(
            youtube_id("http://www.youtube.com/watch?v=KVIPIgE3Fnc"),
            "KVIPIgE3Fnc"
        );
        assert_eq!(
            youtube_id("https://www.youtube.com/embed/L7V_woT8mbQ"),
            "L7V_woT8mbQ"
        );
        assert_eq!(
            youtube_id("https://www.youtube.com/watch?v=abc&t=10"),
            "abc"
        );
        assert_eq!(
            set_literal("{'aunt', 'blood on shirt'}"),
            vec!["aunt", "blood on shirt"]
        );
        assert_eq!(
            set_literal(r#"{"astra","datastax"}"#),
            vec!["astra", "datastax"]
        );
        assert!(set_literal("").is_empty());
        assert_eq!(
            made_up_email("Kenny", "(not", "bbe83e78-0516-428d"),
            "kenny.not.bbe83e78@users.killrvideo.example"
        );
    }

    /// The real files: counts as `shared/data/SOURCES.md` gives them, and the id alignment holds.
    #[test]
    fn the_shared_data_sets_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
        let d = Dataset::load(&dir, None).unwrap();
        assert_eq!(d.videos.len(), 1_011 + 500);
        assert!(d.users.len() >= 43_800 + 150, "{}", d.users.len());
        assert_eq!(d.comments.len(), 771);
        assert_eq!(d.ratings.len(), 884);
        assert_eq!(d.plays.len(), 500);
        assert!(d.videos.iter().all(|v| !v.youtube_id.is_empty()));
        // One trailer's "YouTube" location is a Vimeo URL; it is submitted as it is (the API takes any id).
        assert_eq!(
            d.videos
                .iter()
                .filter(|v| v.youtube_id.contains('/'))
                .count(),
            1
        );
        let limited = Dataset::load(&dir, Some(10)).unwrap();
        assert_eq!(
            limited.users.len(),
            d.users.len() - 43_800 + 10 + 3,
            "10 + the 3 trailer uploaders"
        );
    }
}
