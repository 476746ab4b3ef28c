//! Generated gRPC code for every `.proto` in `protos/`, compiled once for the whole workspace.
//!
//! - [`killrvideo`]: the KillrVideo service tier, wire-identical to `killrvideo-service-protos@90c9c87`
//!   (`shared/spec/killrvideo-api.md`): same packages, services, rpcs, messages and field numbers.
//! - [`rpc`]: the cache and accounts services of the "gRPC in production" talk (`shared/seeds/003`).
//! - [`keel`]: the stack's own example service, used to prove the platform end to end.
//! - [`video_service`]: the video lab of `shared/seeds/002`, with every kind of streaming call.
//!
//! `tonic` and `prost` are re-exported so every crate builds against the one version the code was generated for.
//! [`FILE_DESCRIPTOR_SET`] is the encoded `google.protobuf.FileDescriptorSet` of all of them (imports included),
//! which the server offers through gRPC reflection.
#![allow(missing_docs, clippy::all)]

pub use prost;
pub use prost_types;
pub use tonic;

/// Encoded `FileDescriptorSet` of every proto in `protos/` plus their imports (`google/protobuf/timestamp.proto`).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));

/// The KillrVideo service tier (`shared/spec/killrvideo-api.md`).
/// The geo-search service of `shared/seeds/001` (its search.proto has no package: service `Search`).
pub mod geo {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));
}

pub mod killrvideo {
    /// `killrvideo.common`: `Uuid` and `TimeUuid`, carried as canonical lowercase hyphenated strings.
    pub mod common {
        include!(concat!(env!("OUT_DIR"), "/killrvideo.common.rs"));
    }
    /// `killrvideo.user_management`.
    pub mod user_management {
        include!(concat!(env!("OUT_DIR"), "/killrvideo.user_management.rs"));
        /// `killrvideo.user_management.events`, published on `topic-kv-userCreation`.
        pub mod events {
            include!(concat!(
                env!("OUT_DIR"),
                "/killrvideo.user_management.events.rs"
            ));
        }
    }
    /// `killrvideo.video_catalog`.
    pub mod video_catalog {
        include!(concat!(env!("OUT_DIR"), "/killrvideo.video_catalog.rs"));
        /// `killrvideo.video_catalog.events`, `YouTubeVideoAdded` published on `topic-kv-videoCreation`.
        pub mod events {
            include!(concat!(
                env!("OUT_DIR"),
                "/killrvideo.video_catalog.events.rs"
            ));
        }
    }
    /// `killrvideo.comments`.
    pub mod comments {
        include!(concat!(env!("OUT_DIR"), "/killrvideo.comments.rs"));
        /// `killrvideo.comments.events`, published on `topic-kv-commentCreation`.
        pub mod events {
            include!(concat!(env!("OUT_DIR"), "/killrvideo.comments.events.rs"));
        }
    }
    /// `killrvideo.ratings`.
    pub mod ratings {
        include!(concat!(env!("OUT_DIR"), "/killrvideo.ratings.rs"));
        /// `killrvideo.ratings.events`, published on `topic-kv-videoRating`.
        pub mod events {
            include!(concat!(env!("OUT_DIR"), "/killrvideo.ratings.events.rs"));
        }
    }
    /// `killrvideo.statistics`.
    pub mod statistics {
        include!(concat!(env!("OUT_DIR"), "/killrvideo.statistics.rs"));
    }
    /// `killrvideo.search`.
    pub mod search {
        include!(concat!(env!("OUT_DIR"), "/killrvideo.search.rs"));
    }
    /// `killrvideo.suggested_videos`.
    pub mod suggested_videos {
        include!(concat!(env!("OUT_DIR"), "/killrvideo.suggested_videos.rs"));
    }
    /// `killrvideo.uploads`.
    pub mod uploads {
        include!(concat!(env!("OUT_DIR"), "/killrvideo.uploads.rs"));
        /// `killrvideo.uploads.events` (no implementation publishes them yet).
        pub mod events {
            include!(concat!(env!("OUT_DIR"), "/killrvideo.uploads.events.rs"));
        }
    }
}

/// `rpc`: the cache and accounts services of `shared/seeds/003_grpc_in_production_cache.txt`.
pub mod rpc {
    include!(concat!(env!("OUT_DIR"), "/rpc.rs"));
}

/// The stack's own protos.
/// `video_service`: the video lab of `shared/seeds/002` (`services/examples/video-lab`), every kind of call.
pub mod video_service {
    include!(concat!(env!("OUT_DIR"), "/video_service.rs"));
}

pub mod keel {
    /// Example services.
    pub mod example {
        /// `keel.example.v1`: the echo service of `services/examples/echo`.
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/keel.example.v1.rs"));
        }
    }
}

/// Codec settings every generated server type offers, so the platform can apply gzip and message size limits
/// to any service in one place.
pub trait ServerCodec: Sized {
    /// Accepts gzip-compressed requests (the client chooses, per call); with `send`, also compresses responses
    /// for clients that accept gzip.
    fn gzip(self, send: bool) -> Self;
    /// Largest decoded request and encoded response message, in bytes.
    fn limits(self, max_decoding: usize, max_encoding: usize) -> Self;
}

macro_rules! server_codec {
    ($($server:ident <- $handler:path),* $(,)?) => {$(
        impl<T: $handler> ServerCodec for $server<T> {
            fn gzip(self, send: bool) -> Self {
                let gzip = tonic::codec::CompressionEncoding::Gzip;
                let server = self.accept_compressed(gzip);
                if send { server.send_compressed(gzip) } else { server }
            }
            fn limits(self, max_decoding: usize, max_encoding: usize) -> Self {
                self.max_decoding_message_size(max_decoding).max_encoding_message_size(max_encoding)
            }
        }
    )*};
}

use geo::search_server::SearchServer as GeoSearchServer;
use keel::example::v1::echo_server::EchoServer;
use killrvideo::comments::comments_service_server::CommentsServiceServer;
use killrvideo::ratings::ratings_service_server::RatingsServiceServer;
use killrvideo::search::search_service_server::SearchServiceServer;
use killrvideo::statistics::statistics_service_server::StatisticsServiceServer;
use killrvideo::suggested_videos::suggested_video_service_server::SuggestedVideoServiceServer;
use killrvideo::uploads::uploads_service_server::UploadsServiceServer;
use killrvideo::user_management::user_management_service_server::UserManagementServiceServer;
use killrvideo::video_catalog::video_catalog_service_server::VideoCatalogServiceServer;
use rpc::accounts_server::AccountsServer;
use rpc::cache_server::CacheServer;
use video_service::video_service_server::VideoServiceServer;

server_codec! {
    EchoServer <- keel::example::v1::echo_server::Echo,
    CommentsServiceServer <- killrvideo::comments::comments_service_server::CommentsService,
    RatingsServiceServer <- killrvideo::ratings::ratings_service_server::RatingsService,
    SearchServiceServer <- killrvideo::search::search_service_server::SearchService,
    StatisticsServiceServer <- killrvideo::statistics::statistics_service_server::StatisticsService,
    SuggestedVideoServiceServer <- killrvideo::suggested_videos::suggested_video_service_server::SuggestedVideoService,
    UploadsServiceServer <- killrvideo::uploads::uploads_service_server::UploadsService,
    UserManagementServiceServer <- killrvideo::user_management::user_management_service_server::UserManagementService,
    VideoCatalogServiceServer <- killrvideo::video_catalog::video_catalog_service_server::VideoCatalogService,
    AccountsServer <- rpc::accounts_server::Accounts,
    CacheServer <- rpc::cache_server::Cache,
    GeoSearchServer <- geo::search_server::Search,
    VideoServiceServer <- video_service::video_service_server::VideoService,
}
