//! Every KillrVideo method path of `shared/spec/killrvideo-api.md` §2.1 exists in the generated code, and the
//! descriptor set offered for reflection names each service. The spec's list is read from the spec itself when
//! `../shared` is beside the checkout, and from the copy below otherwise, so a typo in a proto fails here.

use keel_protos::prost::Message;
use keel_protos::prost_types::FileDescriptorSet;

/// §2.1 of the spec, live RPCs only (the removed SampleDataService is not served).
const SPEC_PATHS: &[&str] = &[
    "/killrvideo.user_management.UserManagementService/CreateUser",
    "/killrvideo.user_management.UserManagementService/VerifyCredentials",
    "/killrvideo.user_management.UserManagementService/GetUserProfile",
    "/killrvideo.video_catalog.VideoCatalogService/SubmitUploadedVideo",
    "/killrvideo.video_catalog.VideoCatalogService/SubmitYouTubeVideo",
    "/killrvideo.video_catalog.VideoCatalogService/GetVideo",
    "/killrvideo.video_catalog.VideoCatalogService/GetVideoPreviews",
    "/killrvideo.video_catalog.VideoCatalogService/GetLatestVideoPreviews",
    "/killrvideo.video_catalog.VideoCatalogService/GetUserVideoPreviews",
    "/killrvideo.comments.CommentsService/CommentOnVideo",
    "/killrvideo.comments.CommentsService/GetUserComments",
    "/killrvideo.comments.CommentsService/GetVideoComments",
    "/killrvideo.ratings.RatingsService/RateVideo",
    "/killrvideo.ratings.RatingsService/GetRating",
    "/killrvideo.ratings.RatingsService/GetUserRating",
    "/killrvideo.statistics.StatisticsService/RecordPlaybackStarted",
    "/killrvideo.statistics.StatisticsService/GetNumberOfPlays",
    "/killrvideo.search.SearchService/SearchVideos",
    "/killrvideo.search.SearchService/GetQuerySuggestions",
    "/killrvideo.suggested_videos.SuggestedVideoService/GetRelatedVideos",
    "/killrvideo.suggested_videos.SuggestedVideoService/GetSuggestedForUser",
    "/killrvideo.uploads.UploadsService/GetUploadDestination",
    "/killrvideo.uploads.UploadsService/MarkUploadComplete",
    "/killrvideo.uploads.UploadsService/GetStatusOfVideo",
];

/// The method paths listed in the spec's §2.1 code block, when the spec is available.
fn spec_paths_from_shared() -> Option<Vec<String>> {
    let spec = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/spec/killrvideo-api.md"
    ))
    .ok()?;
    let paths: Vec<String> = spec
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("/killrvideo.") && !l.contains('{'))
        .map(str::to_owned)
        .collect();
    Some(paths)
}

fn descriptor_paths() -> Vec<String> {
    let fds = FileDescriptorSet::decode(keel_protos::FILE_DESCRIPTOR_SET)
        .expect("descriptor set decodes");
    let mut out = Vec::new();
    for file in &fds.file {
        for svc in &file.service {
            for m in &svc.method {
                out.push(format!("/{}.{}/{}", file.package(), svc.name(), m.name()));
            }
        }
    }
    out
}

#[test]
fn every_spec_method_path_is_in_the_descriptor_set() {
    let have = descriptor_paths();
    let mut want: Vec<String> = SPEC_PATHS.iter().map(|s| s.to_string()).collect();
    if let Some(from_spec) = spec_paths_from_shared() {
        assert_eq!(from_spec.len(), 24, "spec §2.1 lists 24 live method paths");
        want = from_spec;
    }
    for path in &want {
        assert!(
            have.contains(path),
            "method path {path} missing from generated code"
        );
    }
}

/// The generated clients call exactly these paths: a renamed rpc would still compile against the descriptor
/// test above but not here.
#[test]
fn generated_clients_expose_the_spec_services() {
    use keel_protos::killrvideo::*;
    use keel_protos::tonic::server::NamedService;
    let names = [
        <user_management::user_management_service_server::UserManagementServiceServer<()> as NamedService>::NAME,
        <video_catalog::video_catalog_service_server::VideoCatalogServiceServer<()> as NamedService>::NAME,
        <comments::comments_service_server::CommentsServiceServer<()> as NamedService>::NAME,
        <ratings::ratings_service_server::RatingsServiceServer<()> as NamedService>::NAME,
        <statistics::statistics_service_server::StatisticsServiceServer<()> as NamedService>::NAME,
        <search::search_service_server::SearchServiceServer<()> as NamedService>::NAME,
        <suggested_videos::suggested_video_service_server::SuggestedVideoServiceServer<()> as NamedService>::NAME,
        <uploads::uploads_service_server::UploadsServiceServer<()> as NamedService>::NAME,
    ];
    for name in names {
        let prefix = format!("/{name}/");
        assert!(
            SPEC_PATHS.iter().any(|p| p.starts_with(&prefix)),
            "service {name} not in the spec"
        );
    }
}

#[test]
fn field_numbers_match_the_spec_for_paging_state() {
    let fds = FileDescriptorSet::decode(keel_protos::FILE_DESCRIPTOR_SET).unwrap();
    // paging_state is field 16 in every request (spec §2).
    let mut seen = 0;
    for file in &fds.file {
        for msg in &file.message_type {
            for f in &msg.field {
                if f.name() == "paging_state" && msg.name().ends_with("Request") {
                    assert_eq!(
                        f.number(),
                        16,
                        "{}.{} must be field 16",
                        msg.name(),
                        f.name()
                    );
                    seen += 1;
                }
            }
        }
    }
    assert_eq!(
        seen, 7,
        "seven request messages carry paging_state (spec §3)"
    );
}

#[test]
fn empty_responses_encode_to_zero_bytes() {
    use keel_protos::killrvideo::*;
    assert!(
        user_management::CreateUserResponse {}
            .encode_to_vec()
            .is_empty()
    );
    assert!(ratings::RateVideoResponse {}.encode_to_vec().is_empty());
    // YOUTUBE is the proto3 default: a YouTube video carries no field 6 on the wire.
    let v = video_catalog::GetVideoResponse {
        location_type: video_catalog::VideoLocationType::Youtube as i32,
        ..Default::default()
    };
    assert!(v.encode_to_vec().is_empty());
}
