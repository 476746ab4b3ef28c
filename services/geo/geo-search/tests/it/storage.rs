//! Every RPC of geo-search in process, on a fresh database of the real PostgreSQL with PostGIS.

use geo_search::{GeoSearch, MIGRATIONS};
use keel_common::{error::Failure, testsuite};
use keel_protos::geo::{
    AddThingRequest, DeleteThingRequest, SearchRequest, search_server::Search as _,
};
use tonic::{Code, Request};

async fn service() -> GeoSearch {
    let db = testsuite::postgres().await;
    let (pool, _) = testsuite::open(&db, &MIGRATIONS).await;
    GeoSearch::new(pool)
}

fn dry<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert("dry-run", "true".parse().unwrap());
    r
}

async fn add(svc: &GeoSearch, name: &str, wkt: &str) -> i64 {
    svc.add_thing(Request::new(AddThingRequest {
        name: name.into(),
        wkt: wkt.into(),
        ..Default::default()
    }))
    .await
    .unwrap_or_else(|e| panic!("{name}: {e:?}"))
    .into_inner()
    .id
}

/// A square of `side` degrees with its south-west corner at (`lng`, `lat`).
fn square(lng: f64, lat: f64, side: f64) -> String {
    let (e, n) = (lng + side, lat + side);
    format!("POLYGON(({lng} {lat}, {e} {lat}, {e} {n}, {lng} {n}, {lng} {lat}))")
}

async fn names(svc: &GeoSearch, r: SearchRequest) -> Vec<String> {
    svc.search(Request::new(r))
        .await
        .unwrap()
        .into_inner()
        .responses
        .into_iter()
        .map(|r| r.response)
        .collect()
}

fn at(lat: f32, lng: f32) -> SearchRequest {
    SearchRequest {
        lat,
        lng,
        ..Default::default()
    }
}

fn named(query: &str) -> SearchRequest {
    SearchRequest {
        query: query.into(),
        any_location: true,
        ..Default::default()
    }
}

async fn count(svc: &GeoSearch) -> i32 {
    svc.monitor(Request::new(()))
        .await
        .unwrap()
        .into_inner()
        .n_things
}

#[tokio::test]
async fn things_are_found_by_the_point_inside_them_and_by_name() {
    let svc = service().await;
    add(&svc, "Paris", &square(2.0, 48.0, 1.0)).await;
    add(&svc, "Ile-de-France", &square(1.0, 47.0, 3.0)).await;
    add(
        &svc,
        "Tokyo islands",
        "MULTIPOLYGON(((139 35, 140 35, 140 36, 139 36, 139 35)), ((141 37, 142 37, 142 38, 141 38, 141 37)))",
    )
    .await;
    add(&svc, "100% Real_Name", &square(-10.0, -10.0, 1.0)).await;
    assert_eq!(count(&svc).await, 4);

    assert_eq!(
        names(&svc, at(48.5, 2.5)).await,
        ["Ile-de-France", "Paris"],
        "every polygon containing the point, by name"
    );
    assert_eq!(
        names(&svc, at(37.5, 141.5)).await,
        ["Tokyo islands"],
        "either part of a multipolygon"
    );
    assert!(
        names(&svc, at(2.5, 48.5)).await.is_empty(),
        "longitude first: (lat 2.5, lng 48.5) is in the Indian Ocean"
    );
    assert_eq!(
        names(&svc, at(48.0, 2.5)).await,
        ["Ile-de-France"],
        "a point on Paris's edge is not inside it (ST_Contains)"
    );
    assert!(names(&svc, at(0.0, 0.0)).await.is_empty());

    let mut both = at(48.5, 2.5);
    both.query = "PAR".into();
    assert_eq!(
        names(&svc, both).await,
        ["Paris"],
        "point and name, case-insensitive"
    );
    assert_eq!(names(&svc, named("tokyo")).await, ["Tokyo islands"]);
    assert_eq!(
        names(&svc, named("%")).await,
        ["100% Real_Name"],
        "% is a character, not a wildcard"
    );
    assert_eq!(names(&svc, named("_")).await, ["100% Real_Name"], "so is _");
    assert_eq!(
        names(&svc, named("")).await.len(),
        4,
        "no point, no name: everything"
    );
}

#[tokio::test]
async fn results_come_a_page_at_a_time() {
    let svc = service().await;
    for i in 0..25 {
        add(
            &svc,
            &format!("Zone {i:02}"),
            &square(10.0, 10.0, 1.0 + f64::from(i) / 10.0),
        )
        .await;
    }
    let page = |n: i32| {
        let svc = svc.clone();
        async move {
            let mut r = at(10.5, 10.5);
            r.page_number = n;
            r.result_per_page = 10;
            svc.search(Request::new(r)).await.unwrap().into_inner()
        }
    };
    let (p1, p2, p3) = (page(1).await, page(2).await, page(3).await);
    assert_eq!(p1.responses.first().unwrap().response, "Zone 00");
    assert_eq!(p2.responses.first().unwrap().response, "Zone 10");
    assert_eq!(
        (p1.responses.len(), p2.responses.len(), p3.responses.len()),
        (10, 10, 5)
    );
    assert!(p1.has_more && p2.has_more && !p3.has_more);
    assert_eq!(page(0).await, p1, "page 0 is the first page too");
    let too_deep = svc
        .search(Request::new(SearchRequest {
            page_number: 1000,
            result_per_page: 100,
            any_location: true,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(too_deep.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn bad_polygons_and_bad_points_are_invalid_arguments_naming_the_field() {
    let svc = service().await;
    let field_of = |e: tonic::Status| {
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let f = Failure::from(&e);
        (f.bad_fields[0].0.clone(), f.bad_fields[0].1.clone())
    };
    for (wkt, says) in [
        ("POLYGON((0 0, 1 1", "not WKT"),
        ("POINT(1 2)", "POINT: expected POLYGON"),
        ("POLYGON((0 0, 1 1, 1 0, 0 1, 0 0))", "Self-intersection"),
        (&square(190.0, 0.0, 1.0), "longitude -180..180"),
        ("", "required"),
    ] {
        let err = svc
            .add_thing(Request::new(AddThingRequest {
                name: "x".into(),
                wkt: wkt.to_owned(),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        let (field, description) = field_of(err);
        assert_eq!(field, "wkt", "{wkt}");
        assert!(description.contains(says), "{wkt}: {description}");
    }
    let no_name = svc
        .add_thing(Request::new(AddThingRequest {
            name: " ".into(),
            wkt: square(0.0, 0.0, 1.0),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(field_of(no_name).0, "name");
    let bad_lat = svc.search(Request::new(at(95.0, 0.0))).await.unwrap_err();
    assert_eq!(field_of(bad_lat).0, "lat");
    assert_eq!(count(&svc).await, 0, "nothing stored");
}

/// `make_valid` stores what PostGIS repairs of an invalid polygon (a bow tie: its two triangles), checked like
/// any other shape: one with no area left is still refused.
#[tokio::test]
async fn invalid_polygons_are_stored_repaired_when_asked() {
    let svc = service().await;
    let bow_tie = "POLYGON((0 0, 2 2, 2 0, 0 2, 0 0))";
    let made_valid = |name: &str, wkt: &str| {
        Request::new(AddThingRequest {
            name: name.into(),
            wkt: wkt.into(),
            make_valid: true,
        })
    };
    let refused = svc
        .add_thing(Request::new(AddThingRequest {
            name: "bow tie".into(),
            wkt: bow_tie.into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    svc.add_thing(made_valid("bow tie", bow_tie)).await.unwrap();
    let names = |r: tonic::Response<keel_protos::geo::SearchResponses>| {
        r.into_inner()
            .responses
            .into_iter()
            .map(|t| t.response)
            .collect::<Vec<_>>()
    };
    // Inside the west and the east triangles; not in the notch above the crossing.
    assert_eq!(
        names(svc.search(Request::new(at(1.0, 0.5))).await.unwrap()),
        ["bow tie"]
    );
    assert_eq!(
        names(svc.search(Request::new(at(1.0, 1.5))).await.unwrap()),
        ["bow tie"]
    );
    assert!(names(svc.search(Request::new(at(0.5, 1.0))).await.unwrap()).is_empty());
    let flat = svc
        .add_thing(made_valid("flat", "POLYGON((0 0, 1 1, 2 2, 0 0))"))
        .await
        .unwrap_err();
    assert_eq!(flat.code(), Code::InvalidArgument, "{flat:?}");
    assert!(flat.message().contains("no area left"), "{flat:?}");
    assert_eq!(count(&svc).await, 1);
}

#[tokio::test]
async fn things_are_deleted_and_dry_runs_change_nothing() {
    let svc = service().await;
    let dry_add = svc
        .add_thing(dry(AddThingRequest {
            name: "maybe".into(),
            wkt: square(0.0, 0.0, 1.0),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dry_add.id, 0);
    assert_eq!(count(&svc).await, 0, "a dry run stores nothing");
    let bad_dry = svc
        .add_thing(dry(AddThingRequest {
            name: "maybe".into(),
            wkt: "POINT(0 0)".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(
        bad_dry.code(),
        Code::InvalidArgument,
        "a dry run still validates"
    );

    let id = add(&svc, "doomed", &square(0.0, 0.0, 1.0)).await;
    svc.delete_thing(dry(DeleteThingRequest { id }))
        .await
        .unwrap();
    assert_eq!(count(&svc).await, 1, "a dry-run delete deletes nothing");
    svc.delete_thing(Request::new(DeleteThingRequest { id }))
        .await
        .unwrap();
    assert_eq!(count(&svc).await, 0);
    let again = svc
        .delete_thing(Request::new(DeleteThingRequest { id }))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound);
}

/// Size limits: a polygon of more than 10,000 vertices, a WKT text over 1 MiB and a name over 256 characters
/// are INVALID_ARGUMENT naming the field; nothing is stored.
#[tokio::test]
async fn oversized_things_are_refused() {
    let svc = service().await;
    let ring = |n: usize| {
        let pts: Vec<String> = (0..n)
            .map(|i| {
                let a = i as f64 / n as f64 * std::f64::consts::TAU;
                format!("{} {}", 10.0 + a.cos(), 10.0 + a.sin())
            })
            .chain(std::iter::once(format!("{} {}", 11.0, 10.0)))
            .collect();
        format!("POLYGON(({}))", pts.join(","))
    };
    let cases = [
        ("wkt", "big".to_owned(), ring(10_001)),
        (
            "wkt",
            "huge".to_owned(),
            format!("POLYGON(({}))", "0 0,".repeat(300_000)),
        ),
        ("name", "n".repeat(257), square(10.0, 10.0, 1.0)),
    ];
    for (field, name, wkt) in cases {
        let err = svc
            .add_thing(Request::new(AddThingRequest {
                name,
                wkt,
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{field}: {}",
            err.message()
        );
        assert!(err.message().starts_with(field), "{}", err.message());
    }
    assert_eq!(count(&svc).await, 0);
    add(&svc, "just fits", &ring(9_999)).await;
}
