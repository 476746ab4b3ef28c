//! KillrVideo `SearchService` (spec `killrvideo-semantics.md` §8): SearchVideos and GetQuerySuggestions over
//! a read model of its own, built from `YouTubeVideoAdded` events (`topic-kv-videoCreation`) consumed in
//! consumer group `search`.
//!
//! - SearchVideos matches the query's words, case-insensitively, against name, tag and description words,
//!   ranking videos that match more words first, then name > tags > description (the Solr edismax weights of
//!   the references), then newest; `paging_state` is an opaque offset, at most [`MAX_OFFSET`]; a query holds at
//!   most [`MAX_QUERY_CHARS`] characters and [`MAX_QUERY_WORDS`] distinct words (INVALID_ARGUMENT past them).
//! - GetQuerySuggestions: sorted unique lowercase tags and name words starting with the query, at most
//!   `page_size` (the web asks for 5); the query is echoed.
//! - Indexing is idempotent: a redelivered event leaves the index as it was.

mod index;

use keel_common::db::Pool;
use keel_common::{
    Resources, Server, Service, ServiceError, Storage,
    events::{Event, HandlerError},
};
use keel_protos::killrvideo::search::{
    GetQuerySuggestionsRequest, GetQuerySuggestionsResponse, SearchResultsVideoPreview,
    SearchVideosRequest, SearchVideosResponse,
    search_service_server::{SearchService, SearchServiceServer},
};
use killrvideo::{events::VideoAdded, ids, paging, required_text, time, topics};
use tonic::{Request, Response, Status};

pub use index::{Hit, Index};

/// Consul service name, database name and consumer group.
pub const SERVICE: &str = "search";

/// The migrations of this service's database.
pub static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The gRPC handler and the event handler, over one [`Index`].
#[derive(Clone, Debug)]
pub struct Search {
    index: Index,
}

impl Search {
    /// The service over `pool` (already migrated).
    pub fn new(pool: Pool) -> Self {
        Self {
            index: Index::new(pool),
        }
    }
}

impl Service for Search {
    const NAME: &'static str = SERVICE;
    type Settings = ();

    fn storage() -> Storage {
        Storage::database(&MIGRATIONS)
    }

    fn consumes() -> &'static [&'static str] {
        &[topics::YOUTUBE_VIDEO_ADDED]
    }

    async fn open(r: Resources<()>) -> anyhow::Result<Self> {
        let db = r.database()?;
        Ok(Self::new(db.pool))
    }

    /// Applies one event to the index.
    ///
    /// # Errors
    /// [`HandlerError::Malformed`] for an undecodable event or one without a video id; database failures are
    /// transient.
    async fn handle(&self, event: Event) -> Result<(), HandlerError> {
        self.index.add(&VideoAdded::decode(&event.payload)?).await?;
        Ok(())
    }

    fn add_to(self, server: Server) -> Server {
        server.add_service(SearchServiceServer::new(self))
    }
}

/// Longest query, in characters (bounds the work one call can ask for).
pub const MAX_QUERY_CHARS: usize = 512;
/// Most distinct words a query may hold.
pub const MAX_QUERY_WORDS: usize = 32;
/// Paging scope of search results.
pub const SEARCH_SCOPE: &str = "search.videos";
/// Deepest result a search may page to: deeper pages cost the database more than any client needs.
pub const MAX_OFFSET: usize = 10_000;

/// INVALID_ARGUMENT on `query` when it is longer than [`MAX_QUERY_CHARS`] or has more than
/// [`MAX_QUERY_WORDS`] distinct words.
fn check_query(query: &str) -> Result<(), ServiceError> {
    killrvideo::limits::chars("query", query, MAX_QUERY_CHARS)?;
    let words: std::collections::BTreeSet<String> = killrvideo::words(query).collect();
    if words.len() > MAX_QUERY_WORDS {
        return Err(ServiceError::invalid(
            "query",
            format!("{} distinct words: at most {MAX_QUERY_WORDS}", words.len()),
        ));
    }
    Ok(())
}

#[tonic::async_trait]
impl SearchService for Search {
    async fn search_videos(
        &self,
        request: Request<SearchVideosRequest>,
    ) -> Result<Response<SearchVideosResponse>, Status> {
        let r = request.into_inner();
        required_text("query", &r.query, "search videos")?;
        check_query(&r.query)?;
        let size = paging::page_size(r.page_size, "search videos request")?;
        let offset: usize = paging::decode(SEARCH_SCOPE, &r.paging_state)?.unwrap_or(0);
        if offset > MAX_OFFSET {
            return Err(ServiceError::invalid(
                "paging_state",
                "not a paging state returned by this service",
            )
            .into());
        }
        let hits = self
            .index
            .search(&r.query, offset, size + 1)
            .await
            .map_err(ServiceError::from)?;
        // The next page starts after this one; there is one exactly when the extra row came back.
        let (hits, paging_state) =
            paging::page(hits, size, SEARCH_SCOPE, |_| offset.saturating_add(size));
        Ok(Response::new(SearchVideosResponse {
            query: r.query,
            videos: hits
                .into_iter()
                .map(|h| SearchResultsVideoPreview {
                    video_id: Some(ids::uuid(h.video_id)),
                    added_date: Some(time::to_timestamp(h.added_ms)),
                    name: h.name,
                    preview_image_location: h.preview_image_location,
                    user_id: Some(ids::uuid(h.user_id)),
                })
                .collect(),
            paging_state,
        }))
    }

    async fn get_query_suggestions(
        &self,
        request: Request<GetQuerySuggestionsRequest>,
    ) -> Result<Response<GetQuerySuggestionsResponse>, Status> {
        let r = request.into_inner();
        required_text("query", &r.query, "get query suggestions")?;
        check_query(&r.query)?;
        let size = paging::page_size(r.page_size, "get query suggestions request")?;
        let suggestions = self
            .index
            .suggest(&r.query.trim().to_lowercase(), size)
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(GetQuerySuggestionsResponse {
            query: r.query,
            suggestions,
        }))
    }
}
