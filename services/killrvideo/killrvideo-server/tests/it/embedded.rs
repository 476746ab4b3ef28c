//! The embedded default end to end, over real gRPC on one port: all eight services in one process, SQLite
//! files, the in-process event bus. What a KillrVideo client does, in the order the web front end does it.

use std::time::Duration;

use keel_protos::killrvideo::{
    comments::{
        CommentOnVideoRequest, GetVideoCommentsRequest,
        comments_service_client::CommentsServiceClient,
    },
    common::TimeUuid,
    ratings::{GetRatingRequest, RateVideoRequest, ratings_service_client::RatingsServiceClient},
    search::{
        GetQuerySuggestionsRequest, SearchVideosRequest, search_service_client::SearchServiceClient,
    },
    statistics::{
        GetNumberOfPlaysRequest, RecordPlaybackStartedRequest,
        statistics_service_client::StatisticsServiceClient,
    },
    suggested_videos::{
        GetRelatedVideosRequest, suggested_video_service_client::SuggestedVideoServiceClient,
    },
    uploads::{GetUploadDestinationRequest, uploads_service_client::UploadsServiceClient},
    user_management::{
        CreateUserRequest, GetUserProfileRequest, VerifyCredentialsRequest,
        user_management_service_client::UserManagementServiceClient,
    },
    video_catalog::{
        GetLatestVideoPreviewsRequest, GetVideoRequest, SubmitYouTubeVideoRequest,
        video_catalog_service_client::VideoCatalogServiceClient,
    },
};
use killrvideo::testsuite::{eventually, pb};
use tonic::Code;
use uuid::Uuid;

#[tokio::test]
async fn a_user_signs_up_submits_comments_rates_plays_and_finds_videos_on_one_port() {
    let ch = crate::support::start_embedded().await.1;
    let mut users = UserManagementServiceClient::new(ch.clone());
    let mut videos = VideoCatalogServiceClient::new(ch.clone());
    let mut comments = CommentsServiceClient::new(ch.clone());
    let mut ratings = RatingsServiceClient::new(ch.clone());
    let mut stats = StatisticsServiceClient::new(ch.clone());
    let mut search = SearchServiceClient::new(ch.clone());
    let suggested = SuggestedVideoServiceClient::new(ch.clone());

    let user = Uuid::new_v4();
    users
        .create_user(CreateUserRequest {
            user_id: pb(user),
            first_name: "Luke".into(),
            last_name: "Tillman".into(),
            email: "luke@example.com".into(),
            password: "killrvideo".into(),
        })
        .await
        .unwrap();
    let dup = users
        .create_user(CreateUserRequest {
            user_id: pb(Uuid::new_v4()),
            email: "luke@example.com".into(),
            password: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    let login = users
        .verify_credentials(VerifyCredentialsRequest {
            email: "luke@example.com".into(),
            password: "killrvideo".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(login.user_id, pb(user));
    let profile = users
        .get_user_profile(GetUserProfileRequest {
            user_ids: vec![pb(user).unwrap()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(profile.profiles[0].first_name, "Luke");

    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    for (id, name, tags) in [
        (
            a,
            "Star Wars: The Force Awakens",
            vec!["star wars", "sci-fi"],
        ),
        (
            b,
            "Rogue One: A Star Wars Story",
            vec!["star wars", "rebels"],
        ),
    ] {
        videos
            .submit_you_tube_video(SubmitYouTubeVideoRequest {
                video_id: pb(id),
                user_id: pb(user),
                name: name.into(),
                description: format!("{name} trailer"),
                tags: tags.into_iter().map(String::from).collect(),
                you_tube_video_id: "sGbxmsDFVnE".into(),
            })
            .await
            .unwrap();
    }
    // Read-your-writes: visible at once.
    let v = videos
        .get_video(GetVideoRequest { video_id: pb(a) })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.location, "sGbxmsDFVnE");
    let latest = videos
        .get_latest_video_previews(GetLatestVideoPreviewsRequest {
            page_size: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(latest.video_previews.len(), 2);
    assert_eq!(latest.video_previews[0].video_id, pb(b), "newest first");

    let comment_id = Uuid::now_v1(&[1, 2, 3, 4, 5, 6]);
    comments
        .comment_on_video(CommentOnVideoRequest {
            video_id: pb(a),
            user_id: pb(user),
            comment_id: Some(TimeUuid {
                value: comment_id.to_string(),
            }),
            comment: "Chewie, we're home".into(),
        })
        .await
        .unwrap();
    let c = comments
        .get_video_comments(GetVideoCommentsRequest {
            video_id: pb(a),
            page_size: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.comments[0].comment, "Chewie, we're home");

    ratings
        .rate_video(RateVideoRequest {
            video_id: pb(a),
            user_id: pb(user),
            rating: 5,
        })
        .await
        .unwrap();
    let r = ratings
        .get_rating(GetRatingRequest { video_id: pb(a) })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.ratings_count, r.ratings_total), (1, 5));

    for _ in 0..3 {
        stats
            .record_playback_started(RecordPlaybackStartedRequest { video_id: pb(a) })
            .await
            .unwrap();
    }
    let plays = stats
        .get_number_of_plays(GetNumberOfPlaysRequest {
            video_ids: vec![pb(a).unwrap(), pb(b).unwrap()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        plays.stats.iter().map(|s| s.views).collect::<Vec<_>>(),
        vec![3, 0]
    );

    // Search and suggestions follow through events, within seconds.
    let found = eventually("both videos searchable", Duration::from_secs(10), || {
        let mut s = search.clone();
        async move {
            let r = s
                .search_videos(SearchVideosRequest {
                    query: "star wars".into(),
                    page_size: 10,
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner();
            (r.videos.len() == 2).then_some(r)
        }
    })
    .await;
    assert_eq!(found.query, "star wars");
    let sugg = search
        .get_query_suggestions(GetQuerySuggestionsRequest {
            query: "sta".into(),
            page_size: 5,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        sugg.suggestions.contains(&"star wars".to_string()),
        "{:?}",
        sugg.suggestions
    );
    let related = eventually(
        "related videos by shared tag",
        Duration::from_secs(10),
        || {
            let mut s = suggested.clone();
            async move {
                let r = s
                    .get_related_videos(GetRelatedVideosRequest {
                        video_id: pb(a),
                        page_size: 4,
                        ..Default::default()
                    })
                    .await
                    .ok()?
                    .into_inner();
                (!r.videos.is_empty()).then_some(r)
            }
        },
    )
    .await;
    assert_eq!(related.videos[0].video_id, pb(b));

    let up = UploadsServiceClient::new(ch)
        .get_upload_destination(GetUploadDestinationRequest {
            file_name: "x.mp4".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(up.code(), Code::Unimplemented);
}

/// `dry-run: true` on every KillrVideo mutating call: validated, answered as it would be, nothing written.
#[tokio::test]
async fn dry_runs_of_mutating_calls_write_nothing() {
    fn dry<T>(m: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(m);
        r.metadata_mut().insert("dry-run", "true".parse().unwrap());
        r
    }
    let ch = crate::support::start_embedded().await.1;
    let mut users = UserManagementServiceClient::new(ch.clone());
    let mut videos = VideoCatalogServiceClient::new(ch.clone());
    let mut comments = CommentsServiceClient::new(ch.clone());
    let mut ratings = RatingsServiceClient::new(ch.clone());
    let mut stats = StatisticsServiceClient::new(ch.clone());
    let (user, video) = (Uuid::new_v4(), Uuid::new_v4());
    let create = CreateUserRequest {
        user_id: pb(user),
        first_name: "D".into(),
        last_name: "R".into(),
        email: "dry@example.com".into(),
        password: "pw".into(),
    };
    users.create_user(dry(create.clone())).await.unwrap();
    let err = users
        .verify_credentials(VerifyCredentialsRequest {
            email: "dry@example.com".into(),
            password: "pw".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::Unauthenticated,
        "the dry run created no user"
    );
    let bad = users
        .create_user(dry(CreateUserRequest {
            email: "".into(),
            ..create.clone()
        }))
        .await
        .unwrap_err();
    assert_eq!(
        bad.code(),
        Code::InvalidArgument,
        "a dry run still validates"
    );
    users.create_user(create.clone()).await.unwrap();
    let taken = users
        .create_user(dry(CreateUserRequest {
            user_id: pb(Uuid::new_v4()),
            ..create
        }))
        .await
        .unwrap_err();
    assert_eq!(
        taken.code(),
        Code::AlreadyExists,
        "a dry run reports what would happen"
    );

    videos
        .submit_you_tube_video(dry(SubmitYouTubeVideoRequest {
            video_id: pb(video),
            user_id: pb(user),
            name: "n".into(),
            description: "d".into(),
            tags: vec![],
            you_tube_video_id: "abc".into(),
        }))
        .await
        .unwrap();
    assert_eq!(
        videos
            .get_video(GetVideoRequest {
                video_id: pb(video)
            })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    comments
        .comment_on_video(dry(CommentOnVideoRequest {
            video_id: pb(video),
            user_id: pb(user),
            comment_id: Some(TimeUuid {
                value: Uuid::now_v1(&[1, 2, 3, 4, 5, 6]).to_string(),
            }),
            comment: "c".into(),
        }))
        .await
        .unwrap();
    let c = comments
        .get_video_comments(GetVideoCommentsRequest {
            video_id: pb(video),
            page_size: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(c.comments.is_empty());
    ratings
        .rate_video(dry(RateVideoRequest {
            video_id: pb(video),
            user_id: pb(user),
            rating: 5,
        }))
        .await
        .unwrap();
    let r = ratings
        .get_rating(GetRatingRequest {
            video_id: pb(video),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.ratings_count, 0);
    stats
        .record_playback_started(dry(RecordPlaybackStartedRequest {
            video_id: pb(video),
        }))
        .await
        .unwrap();
    let plays = stats
        .get_number_of_plays(GetNumberOfPlaysRequest {
            video_ids: vec![pb(video).unwrap()],
        })
        .await
        .unwrap();
    assert_eq!(plays.into_inner().stats[0].views, 0);
}
