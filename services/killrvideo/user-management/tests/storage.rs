//! Every RPC of the user-management service, in process, on SQLite and on the real PostgreSQL.

use keel_protos::killrvideo::user_management::{
    CreateUserRequest, GetUserProfileRequest, VerifyCredentialsRequest, events::UserCreated,
    user_management_service_server::UserManagementService,
};
use killrvideo::testsuite::pb;
use killrvideo::testsuite::{self, TestDatabase};
use prost::Message;
use tonic::{Code, Request};
use user_management::{BAD_CREDENTIALS, MIGRATIONS, UserManagement};
use uuid::Uuid;

async fn service(db: &TestDatabase) -> (UserManagement, keel_common::db::Pool) {
    let (pool, outbox) = testsuite::open(db, &MIGRATIONS).await;
    (UserManagement::new(pool.clone(), outbox), pool)
}

fn create(id: Uuid, email: &str, password: &str) -> Request<CreateUserRequest> {
    Request::new(CreateUserRequest {
        user_id: pb(id),
        first_name: "Ada".into(),
        last_name: "Lovelace".into(),
        email: email.into(),
        password: password.into(),
    })
}

#[tokio::test]
async fn create_verify_and_profiles() {
    for db in testsuite::databases().await {
        let (svc, pool) = service(&db).await;
        let b = db.backend;
        let id = Uuid::new_v4();
        svc.create_user(create(id, "ada@example.com", "s3cret pass"))
            .await
            .unwrap();

        // The UserCreated event was queued in the same transaction.
        let events = testsuite::queued_events(&pool, "topic-kv-userCreation").await;
        assert_eq!(events.len(), 1, "{b}");
        let e = UserCreated::decode(events[0].as_slice()).unwrap();
        assert_eq!(
            (e.user_id.unwrap().value, e.email.as_str()),
            (id.to_string(), "ada@example.com"),
            "{b}"
        );
        assert!(e.timestamp.is_some(), "{b}");

        let ok = svc
            .verify_credentials(Request::new(VerifyCredentialsRequest {
                email: "ada@example.com".into(),
                password: "s3cret pass".into(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ok.user_id.unwrap().value, id.to_string(), "{b}");

        for (email, password) in [
            ("ada@example.com", "wrong"),
            ("nobody@example.com", "s3cret pass"),
        ] {
            let err = svc
                .verify_credentials(Request::new(VerifyCredentialsRequest {
                    email: email.into(),
                    password: password.into(),
                }))
                .await
                .unwrap_err();
            assert_eq!(
                (err.code(), err.message()),
                (Code::Unauthenticated, BAD_CREDENTIALS),
                "{b} {email}"
            );
        }
        let err = svc
            .verify_credentials(Request::new(VerifyCredentialsRequest {
                email: "".into(),
                password: "x".into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{b}");

        let other = Uuid::new_v4();
        svc.create_user(create(other, "bob@example.com", "pw"))
            .await
            .unwrap();
        let profiles = svc
            .get_user_profile(Request::new(GetUserProfileRequest {
                user_ids: vec![
                    pb(other).unwrap(),
                    pb(Uuid::new_v4()).unwrap(),
                    pb(id).unwrap(),
                ],
            }))
            .await
            .unwrap()
            .into_inner()
            .profiles;
        let got: Vec<_> = profiles
            .iter()
            .map(|p| (p.user_id.clone().unwrap().value, p.email.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (other.to_string(), "bob@example.com".into()),
                (id.to_string(), "ada@example.com".into())
            ],
            "{b}: found users only, in request order"
        );
        assert_eq!(profiles[1].first_name, "Ada");

        let none = svc
            .get_user_profile(Request::new(GetUserProfileRequest::default()))
            .await
            .unwrap();
        assert!(none.into_inner().profiles.is_empty(), "{b}");
        let err = svc
            .get_user_profile(Request::new(GetUserProfileRequest {
                user_ids: (0..21).map(|_| pb(Uuid::new_v4()).unwrap()).collect(),
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{b}");
        assert!(
            err.message()
                .contains("Cannot get more than 20 user profiles at once"),
            "{b}"
        );

        // Passwords are stored as argon2id hashes, never in clear.
        let stored: String = sqlx::query_scalar(
            "SELECT password FROM user_credentials WHERE email = 'ada@example.com'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert!(stored.starts_with("$argon2id$"), "{b}: {stored}");
    }
}

#[tokio::test]
async fn duplicate_email_is_already_exists_even_under_concurrent_creates() {
    for db in testsuite::databases().await {
        let (svc, pool) = service(&db).await;
        let b = db.backend;
        let results = futures::future::join_all((0..4).map(|_| {
            let svc = svc.clone();
            async move {
                svc.create_user(create(Uuid::new_v4(), "twin@example.com", "pw"))
                    .await
            }
        }))
        .await;
        assert_eq!(
            results.iter().filter(|r| r.is_ok()).count(),
            1,
            "{b}: exactly one create wins"
        );
        for err in results.into_iter().filter_map(Result::err) {
            assert_eq!(err.code(), Code::AlreadyExists, "{b}");
            assert!(
                err.message()
                    .contains("Exception creating user because it already exists"),
                "{b}: {}",
                err.message()
            );
        }
        assert_eq!(
            testsuite::queued_events(&pool, "topic-kv-userCreation")
                .await
                .len(),
            1,
            "{b}"
        );

        // The same user id with another email is refused too, and leaves no orphan credentials.
        let id = Uuid::new_v4();
        svc.create_user(create(id, "first@example.com", "pw"))
            .await
            .unwrap();
        let err = svc
            .create_user(create(id, "second@example.com", "pw"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::AlreadyExists, "{b}");
        let orphans: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM user_credentials WHERE email = 'second@example.com'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(orphans, 0, "{b}");
    }
}

#[tokio::test]
async fn create_user_validates_its_fields() {
    let db = testsuite::sqlite().await;
    let (svc, _) = service(&db).await;
    for (req, field) in [
        (
            CreateUserRequest {
                user_id: None,
                ..create(Uuid::new_v4(), "a@b.c", "pw").into_inner()
            },
            "user_id",
        ),
        (
            CreateUserRequest {
                email: " ".into(),
                ..create(Uuid::new_v4(), "a@b.c", "pw").into_inner()
            },
            "email",
        ),
        (
            CreateUserRequest {
                password: "".into(),
                ..create(Uuid::new_v4(), "a@b.c", "pw").into_inner()
            },
            "password",
        ),
    ] {
        let err = svc.create_user(Request::new(req)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message()
                .contains(&format!("{field} should be provided")),
            "{}",
            err.message()
        );
    }
}

/// Instances of a service starting together against one database all come up: one migrates, the others wait
/// for it (a race on `CREATE TABLE IF NOT EXISTS` made all but one fail, on the real PostgreSQL).
#[tokio::test]
async fn instances_starting_together_all_migrate_the_shared_database() {
    for db in testsuite::databases().await {
        let opened = futures::future::join_all((0..4).map(|_| {
            keel_common::db::connect_url(
                &db.url,
                2,
                std::time::Duration::from_secs(10),
                &MIGRATIONS,
            )
        }))
        .await;
        for r in &opened {
            assert!(r.is_ok(), "{}: {:?}", db.backend, r.as_ref().err());
        }
    }
}

/// A megabyte-long password or email is INVALID_ARGUMENT before any hashing (argon2's work per call stays
/// bounded), on create and on verify alike.
#[tokio::test]
async fn oversized_credentials_are_refused_before_hashing() {
    let db = testsuite::sqlite().await;
    let (svc, _) = service(&db).await;
    let huge = "p".repeat(1 << 20);
    let err = svc
        .create_user(Request::new(CreateUserRequest {
            user_id: pb(Uuid::new_v4()),
            first_name: "Ada".into(),
            last_name: "Lovelace".into(),
            email: "ada@example.com".into(),
            password: huge.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("password:"), "{}", err.message());
    let err = svc
        .verify_credentials(Request::new(VerifyCredentialsRequest {
            email: format!("{huge}@example.com"),
            password: "x".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("email:"), "{}", err.message());
    assert!(err.message().len() < 1024);
}

/// Failed logins are limited per email: after five wrong passwords the next attempt, even with the right
/// password, is RESOURCE_EXHAUSTED with RetryInfo and no hashing; another email is unaffected.
#[tokio::test]
async fn failed_logins_are_limited_per_email() {
    use tonic_types::StatusExt;
    let db = testsuite::sqlite().await;
    let (svc, _) = service(&db).await;
    for (email, password) in [
        ("eve@example.com", "right"),
        ("bob@example.com", "also-right"),
    ] {
        svc.create_user(create(Uuid::new_v4(), email, password))
            .await
            .unwrap();
    }
    let login = |email: &str, password: &str| {
        svc.verify_credentials(Request::new(VerifyCredentialsRequest {
            email: email.into(),
            password: password.into(),
        }))
    };
    for _ in 0..5 {
        let err = login("eve@example.com", "wrong").await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    let limited = login("eve@example.com", "right").await.unwrap_err();
    assert_eq!(
        limited.code(),
        Code::ResourceExhausted,
        "{}",
        limited.message()
    );
    let retry = limited
        .get_error_details()
        .retry_info()
        .unwrap()
        .retry_delay;
    assert!(
        retry.unwrap() > std::time::Duration::from_secs(60),
        "{retry:?}"
    );
    login("bob@example.com", "also-right")
        .await
        .expect("another email is not limited");
}

/// Password hashes run at most `max_concurrent_hashes` at once, however many calls arrive together.
#[tokio::test]
async fn password_hashing_is_bounded() {
    let db = testsuite::sqlite().await;
    let (pool, outbox) = testsuite::open(&db, &MIGRATIONS).await;
    let guard = user_management::Guard::new(user_management::GuardSettings {
        max_concurrent_hashes: 1,
        ..Default::default()
    });
    let svc = UserManagement::with_guard(pool, outbox, guard);
    let creates = (0..6).map(|i| {
        svc.create_user(create(
            Uuid::new_v4(),
            &format!("user{i}@example.com"),
            "password",
        ))
    });
    for r in futures::future::join_all(creates).await {
        r.unwrap();
    }
    assert_eq!(svc.guard().peak_concurrent_hashes(), 1);
}

/// The service's section is `user_management`, which a shell can set: its values are read and checked with the
/// platform's before anything is bound.
#[test]
fn its_settings_are_read_from_user_management_variables() {
    let app = keel_common::App::of::<UserManagement>();
    let env = keel_common::config::Env::default()
        .with("KEEL_USER_MANAGEMENT__FAILED_LOGINS_PER_EMAIL", "0")
        .with("KEEL_USER_MANAGEMENT__FAILED_LOGIN_WINDOW", "1m");
    let err = app.settings(&env).unwrap_err();
    assert_eq!(
        err.0[0].key, "user_management.failed_logins_per_email",
        "{err}"
    );
    let ok = keel_common::config::Env::default()
        .with("KEEL_USER_MANAGEMENT__FAILED_LOGINS_PER_EMAIL", "3");
    let report = app.effective(&app.settings(&ok).unwrap());
    assert!(
        report
            .iter()
            .any(|(k, v)| k == "user_management.failed_logins_per_email" && v == "3"),
        "{report:?}"
    );
}
