//! Ids on the wire (`killrvideo::ids`): any text is a UUID of the right kind or INVALID_ARGUMENT, and the
//! time of any version-1 UUID is read without overflow.
#![no_main]

use keel_protos::killrvideo::common::{TimeUuid, Uuid as PbUuid};
use killrvideo::ids;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, [u8; 16])| {
    let (text, bytes) = input;
    let id = PbUuid { value: text.to_owned() };
    let time = TimeUuid { value: text.to_owned() };
    if let Ok(u) = ids::required("video_id", Some(&id)) {
        assert_eq!(ids::optional("video_id", Some(&id)).ok().flatten(), Some(u));
    }
    if let Ok(u) = ids::required_time("comment_id", Some(&time)) {
        assert!(ids::v1_millis(&u).is_some(), "a time UUID has a time: {text}");
    }
    let _ = ids::optional_time("comment_id", Some(&time));
    let any = uuid::Uuid::from_bytes(bytes);
    let _ = ids::v1_millis(&any);
    let _ = ids::v1_sort_key(&any);
});
