//! The control protocol's decoders of outside input (issue 16): a request line as the server
//! reads it off the socket ([`decode`]), `scale`'s number, and an answer as the client reads
//! and renders it. Any input: no panic, and a refusal is one line naming its cause. Valid
//! input: requests and answers round-trip through the wire format.

use proptest::prelude::*;
use serde_json::{Map, Number, Value};

use crate::control::protocol::{decode, Body, Reply, Request, Response};
use crate::control::{table, wire};
use crate::event::Scale;

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| Number::from_f64(f).map(Value::Number)),
        any::<String>().prop_map(Value::String),
        "(status|scale|roll|stop|reexec|workers|cmd|id|[+-]?[0-9]{1,3})".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(("(cmd|workers|id|ok|pid|workers|[a-z]{1,6})", inner), 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn scale() -> impl Strategy<Value = Scale> {
    prop_oneof![
        (0usize..=u32::MAX as usize).prop_map(Scale::To),
        (-(u32::MAX as i64)..=u32::MAX as i64).prop_map(Scale::By)
    ]
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        Just(Request::Status),
        scale().prop_map(|workers| Request::Scale { workers }),
        Just(Request::Roll),
        Just(Request::Stop),
        Just(Request::Reexec),
    ]
}

/// What the server does with a line: decode, and the refusal's answer line.
fn answer_to(line: &str) -> Option<String> {
    match decode(line) {
        Ok(_) => None,
        Err(refused) => Some(Response::failure(refused.id, refused.error).line()),
    }
}

fn assert_one_line(answer: &str) -> Result<(), TestCaseError> {
    prop_assert!(answer.ends_with('\n') && answer.matches('\n').count() == 1, "{answer:?}");
    let v: Value = serde_json::from_str(answer).map_err(|e| TestCaseError::fail(format!("{e}: {answer}")))?;
    prop_assert_eq!(v.get("ok"), Some(&Value::Bool(false)));
    prop_assert!(v.get("error").and_then(Value::as_str).is_some_and(|e| !e.is_empty()), "{answer}");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn a_request_line_of_any_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        // As the server reads it: lossy UTF-8.
        let line = String::from_utf8_lossy(&bytes);
        if let Some(answer) = answer_to(&line) {
            assert_one_line(&answer)?;
        }
    }

    #[test]
    fn json_with_a_byte_changed_or_cut_never_panics(
        v in json_value(), at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<bool>()
    ) {
        let mut text = wire::to_line(&v).into_bytes();
        let i = at.index(text.len() + 1);
        if cut { text.truncate(i) } else { text.insert(i, byte) }
        let line = String::from_utf8_lossy(&text);
        if let Some(answer) = answer_to(&line) {
            assert_one_line(&answer)?;
            let said: Value = serde_json::from_str(&answer).unwrap();
            let error = said["error"].as_str().unwrap();
            if let Some(rest) = error.strip_prefix("invalid request: invalid JSON at byte ") {
                let at: usize = rest.split(':').next().unwrap().parse().unwrap();
                prop_assert!(at <= line.len(), "{error} for {line:?}");
            }
        }
    }

    #[test]
    fn any_json_object_is_a_request_or_a_refusal(v in json_value()) {
        if let Some(answer) = answer_to(&wire::to_line(&v)) {
            assert_one_line(&answer)?;
        }
    }

    #[test]
    fn valid_requests_round_trip_with_their_id(r in request(), id in prop::option::of(json_value())) {
        let Value::Object(mut members) = serde_json::to_value(&r).unwrap() else { panic!("an object") };
        if let Some(id) = &id {
            members.insert("id".into(), id.clone());
        }
        let line = wire::to_line(&Value::Object(members));
        let (got_id, got) = decode(&line).map_err(|r| TestCaseError::fail(r.error))?;
        prop_assert_eq!(got, r);
        // The id as read off the line (serde_json reads a float to within an ULP or so; what
        // it read is what is echoed).
        let read: Value = serde_json::from_str(&line).unwrap();
        prop_assert_eq!(got_id.as_ref(), read.get("id"));
        prop_assert_eq!(got_id.is_some(), id.is_some());
    }

    #[test]
    fn scale_round_trips_and_any_text_never_panics(s in scale(), text in any::<String>()) {
        prop_assert_eq!(s.to_string().parse::<Scale>(), Ok(s));
        if let Ok(parsed) = text.parse::<Scale>() {
            prop_assert_eq!(parsed.to_string().parse::<Scale>(), Ok(parsed));
        }
    }

    #[test]
    fn answers_are_one_line_and_read_back(error in any::<String>(), id in prop::option::of(json_value()), f in any::<f64>()) {
        let line = Response::failure(id, error.clone()).line();
        prop_assert!(line.ends_with('\n') && line.matches('\n').count() == 1, "{line:?}");
        let v: Value = serde_json::from_str(&line).unwrap();
        prop_assert_eq!(v["error"].as_str(), Some(error.as_str()));
        let scaled = Response::success(None, Body::Scaled { pid: 7, desired: 3 }).line();
        let reply: Reply = serde_json::from_str(&scaled).unwrap();
        prop_assert_eq!((reply.ok, reply.pid, reply.desired), (true, 7, 3));
        // A number as the wire writes it reads back as that very number (serde_json's
        // float_roundtrip feature; without it a float could read an ULP or two off, and a
        // subnormal one further: -2.30948679883954e-309 did).
        if f.is_finite() {
            let back: f64 = serde_json::from_str(&wire::to_line(&f)).unwrap();
            prop_assert_eq!(back, f, "{} read back as {}", f, back);
        }
    }

    #[test]
    fn any_answer_reads_or_is_unreadable_and_renders_without_panic(v in json_value()) {
        let _ = serde_json::from_value::<Reply>(v.clone());
        let table = table::render(&v);
        prop_assert!(table.ends_with('\n'));
    }
}
