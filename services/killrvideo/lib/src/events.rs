//! The KillrVideo events the read models consume (spec §10.2), decoded and validated once, at the edge, into
//! domain values: the read models' storage takes these, never the wire messages.

use keel_common::events::HandlerError;
use keel_protos::killrvideo::{
    ratings::events::UserRatedVideo, video_catalog::events::YouTubeVideoAdded,
};
use prost::Message;
use uuid::Uuid;

use crate::{ids, time};

/// `YouTubeVideoAdded` (`topic-kv-videoCreation`): a video was submitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VideoAdded {
    /// The video.
    pub video_id: Uuid,
    /// Its uploader.
    pub user_id: Uuid,
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Thumbnail URL.
    pub preview_image_location: String,
    /// Tags as sent.
    pub tags: Vec<String>,
    /// `added_date` in milliseconds since the epoch (the time it was decoded when the event has none).
    pub added_ms: i64,
}

impl VideoAdded {
    /// Decodes and validates a `YouTubeVideoAdded` payload.
    ///
    /// # Errors
    /// [`HandlerError::Malformed`] for bytes that are not the message, or a missing or invalid video or user id.
    pub fn decode(payload: &[u8]) -> Result<Self, HandlerError> {
        let e = YouTubeVideoAdded::decode(payload)?;
        let video_id = ids::required("video_id", e.video_id.as_ref()).map_err(|_| {
            HandlerError::Malformed("YouTubeVideoAdded without a valid video_id".into())
        })?;
        let user_id = ids::required("user_id", e.user_id.as_ref()).map_err(|_| {
            HandlerError::Malformed("YouTubeVideoAdded without a valid user_id".into())
        })?;
        Ok(Self {
            video_id,
            user_id,
            added_ms: e
                .added_date
                .as_ref()
                .map(time::to_millis)
                .unwrap_or_else(time::now_ms),
            name: e.name,
            description: e.description,
            preview_image_location: e.preview_image_location,
            tags: e.tags,
        })
    }
}

/// `UserRatedVideo` (`topic-kv-videoRating`): a user rated a video.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VideoRated {
    /// The video.
    pub video_id: Uuid,
    /// The user.
    pub user_id: Uuid,
    /// 1..=5 as sent.
    pub rating: i32,
    /// `rating_timestamp` in milliseconds since the epoch; 0 when the event has none. Orders ratings of one
    /// user and video: an older one arriving late does not replace a newer one.
    pub rated_ms: i64,
}

impl VideoRated {
    /// Decodes and validates a `UserRatedVideo` payload.
    ///
    /// # Errors
    /// [`HandlerError::Malformed`] for bytes that are not the message, or a missing or invalid id.
    pub fn decode(payload: &[u8]) -> Result<Self, HandlerError> {
        let e = UserRatedVideo::decode(payload)?;
        let bad = |_| HandlerError::Malformed("UserRatedVideo without valid ids".into());
        Ok(Self {
            video_id: ids::required("video_id", e.video_id.as_ref()).map_err(bad)?,
            user_id: ids::required("user_id", e.user_id.as_ref()).map_err(bad)?,
            rating: e.rating,
            rated_ms: e.rating_timestamp.as_ref().map_or(0, time::to_millis),
        })
    }
}
