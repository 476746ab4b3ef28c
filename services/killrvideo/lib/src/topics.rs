//! Kafka topics of the KillrVideo events, as the reference services name them (spec §10.2). The payload is the
//! raw serialized protobuf event, no key, no envelope: the consumer knows the type from the topic.

/// `killrvideo.user_management.events.UserCreated`.
pub const USER_CREATED: &str = "topic-kv-userCreation";
/// `killrvideo.video_catalog.events.YouTubeVideoAdded`.
pub const YOUTUBE_VIDEO_ADDED: &str = "topic-kv-videoCreation";
/// `killrvideo.comments.events.UserCommentedOnVideo`.
pub const USER_COMMENTED_ON_VIDEO: &str = "topic-kv-commentCreation";
/// `killrvideo.ratings.events.UserRatedVideo`.
pub const USER_RATED_VIDEO: &str = "topic-kv-videoRating";
