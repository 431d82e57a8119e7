//! Generated hostile input for the wire format (issue 11 item 1): the frame decoder and the call
//! decoder must turn any bytes into frames, calls or a named error — never a panic, a hang or
//! unbounded memory.
//!
//! Default budget: `ASD_PROPTEST_CASES` cases per property (256 when unset), so that
//! `cargo test` stays fast; set it to e.g. 20000 for a long run.

use asd_protocol::frame::encode;
use asd_protocol::{
    Call, EntryKind, FrameDecoder, FrameError, Method, Mode, Reply, RequestError, ServiceError,
};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use serde_json::{Map, Value};

fn config() -> ProptestConfig {
    let cases = std::env::var("ASD_PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        // Failures become explicit regression tests, not files next to the sources.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Every error a call can get is a named varlink error declared in the IDL.
fn assert_named(e: &ServiceError) {
    let name = e.name();
    let (iface, short) = name.rsplit_once('.').expect("qualified error name");
    let idl = match iface {
        "io.asd.Helper" => asd_protocol::HELPER_IDL,
        "org.varlink.service" => asd_protocol::SERVICE_IDL,
        other => panic!("error of an unknown interface {other}: {e:?}"),
    };
    assert!(
        idl.contains(&format!("error {short} (")),
        "{name} is not declared"
    );
    // And it survives the trip to the client.
    assert_eq!(&ServiceError::from_wire(&name, e.parameters()), e);
}

/// What the helper does with one frame, up to the dispatcher: a method or a named error.
fn decode(frame: &[u8]) -> Result<Method, ServiceError> {
    let call = Call::parse(frame).map_err(|e| ServiceError::InvalidRequest {
        reason: e.to_string(),
    })?;
    Method::from_call(&call)
}

fn check_frame(frame: &[u8]) {
    match decode(frame) {
        Ok(m) => {
            // A call that decodes re-encodes to the same method.
            let again = encode(&m.to_call().to_json());
            let back = decode(&again[..again.len() - 1]).expect("re-encoded call decodes");
            assert_eq!(back, m);
        }
        Err(e) => assert_named(&e),
    }
    // The reply decoder (the client's side) must be just as robust.
    let _ = Reply::parse(frame);
}

fn any_mode() -> impl Strategy<Value = Mode> {
    prop_oneof![Just(Mode::Copy), Just(Mode::Overlay)]
}

fn any_kind() -> impl Strategy<Value = EntryKind> {
    prop_oneof![Just(EntryKind::Dir), Just(EntryKind::File)]
}

/// Strings as hostile callers send them: paths with `..`, `//`, trailing `/`, NUL, control
/// characters, non-ASCII, and long ones.
fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "(/|\\.\\.|\\.|//|[a-z]{1,8}|\\x00|\u{202e}|é|\\n|\"|\\\\){0,12}",
        2 => any::<String>(),
        1 => (1usize..6000).prop_map(|n| format!("/{}", "a".repeat(n))),
        1 => Just(String::new()),
    ]
}

fn any_method() -> impl Strategy<Value = Method> {
    any_method_with(|| hostile_string().boxed())
}

/// Methods with short strings (for the properties that are quadratic in the stream's length).
fn short_method() -> impl Strategy<Value = Method> {
    any_method_with(|| {
        hostile_string()
            .prop_map(|s| s.chars().take(48).collect())
            .boxed()
    })
}

fn any_method_with(s: fn() -> BoxedStrategy<String>) -> impl Strategy<Value = Method> {
    prop_oneof![
        Just(Method::GetInfo),
        Just(Method::ListMounts),
        s().prop_map(|interface| Method::GetInterfaceDescription { interface }),
        s().prop_map(|volatile| Method::PrepareArea { volatile }),
        (s(), any_mode()).prop_map(|(target, mode)| Method::BindBackup { target, mode }),
        s().prop_map(|target| Method::MountOverlay { target }),
        (s(), any_mode()).prop_map(|(target, mode)| Method::Cover { target, mode }),
        s().prop_map(|target| Method::Detach { target }),
        (s(), any::<bool>()).prop_map(|(target, frozen)| Method::Freeze { target, frozen }),
        (s(), s(), any_kind()).prop_map(|(target, name, kind)| Method::MakeBeside {
            target,
            name,
            kind
        }),
        (s(), s(), s()).prop_map(|(target, from, to)| Method::RenameBeside { target, from, to }),
        (s(), s()).prop_map(|(target, name)| Method::RemoveBeside { target, name }),
    ]
}

/// JSON fragments that break or stretch a call when spliced in.
fn token() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"\0".to_vec()),
        Just(b"\xff".to_vec()),
        Just(b"\xc0\x80".to_vec()),
        Just(b"\xed\xa0\x80".to_vec()),
        Just(br#"\ud800"#.to_vec()),
        Just(br#"\u0000"#.to_vec()),
        Just(b"1e999999".to_vec()),
        Just(b"-0".to_vec()),
        Just(b"123456789012345678901234567890123456789".to_vec()),
        Just(b"18446744073709551616".to_vec()),
        Just(b"null".to_vec()),
        Just(b"true".to_vec()),
        Just(b"[".to_vec()),
        Just(b"]".to_vec()),
        Just(b"{".to_vec()),
        Just(b"}".to_vec()),
        Just(b"\"".to_vec()),
        Just(b",".to_vec()),
        Just(b":".to_vec()),
        Just(br#""method":"io.asd.Helper.Detach","#.to_vec()),
        Just(br#""parameters":{},"#.to_vec()),
        Just(br#""target":"/etc","#.to_vec()),
        Just(br#""oneway":true,"#.to_vec()),
        Just(br#""more":1,"#.to_vec()),
        (1usize..300).prop_map(|n| "[".repeat(n).into_bytes()),
        proptest::collection::vec(any::<u8>(), 1..8),
    ]
}

#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Truncate(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Flip(i, b)),
        (any::<usize>(), token()).prop_map(|(i, t)| Edit::Insert(i, t)),
        (any::<usize>(), 1usize..16).prop_map(|(i, n)| Edit::Delete(i, n)),
        any::<usize>().prop_map(Edit::Truncate),
    ]
}

fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let len = bytes.len();
        let at = |i: usize| if len == 0 { 0 } else { i % (len + 1) };
        match e {
            Edit::Flip(i, b) if len > 0 => bytes[i % len] = *b,
            Edit::Flip(..) => {}
            Edit::Insert(i, t) => {
                let p = at(*i);
                bytes.splice(p..p, t.iter().copied());
            }
            Edit::Delete(i, n) => {
                let p = at(*i);
                let end = (p + n).min(len);
                bytes.drain(p..end);
            }
            Edit::Truncate(i) => bytes.truncate(at(*i)),
        }
    }
    bytes
}

/// Feeds `stream` to a decoder in the given chunks, calling `next_frame` after every feed (as
/// the helper and the client do); returns the frames, or the first framing error.
fn frames_of(stream: &[u8], cuts: &[usize], max: usize) -> Result<Vec<Vec<u8>>, FrameError> {
    let mut d = FrameDecoder::new(max);
    let mut out = Vec::new();
    let mut start = 0;
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
    bounds.sort_unstable();
    bounds.push(stream.len());
    for end in bounds {
        d.feed(&stream[start..end]);
        start = end;
        while let Some(f) = d.next_frame()? {
            out.push(f);
        }
    }
    d.finish()?;
    Ok(out)
}

proptest! {
    #![proptest_config(config())]

    /// Any bytes: a call, or a named error.
    #[test]
    fn random_bytes_decode_to_a_call_or_a_named_error(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048)
    ) {
        check_frame(&bytes);
    }

    /// Random JSON-looking text (keys the decoder knows, values of every type).
    #[test]
    fn random_json_objects(
        keys in proptest::collection::vec(
            prop_oneof![
                Just("method"), Just("parameters"), Just("oneway"), Just("more"),
                Just("upgrade"), Just("target"), Just("mode"), Just("frozen"), Just("x"),
            ],
            0..6,
        ),
        values in proptest::collection::vec(
            prop_oneof![
                Just(r#""io.asd.Helper.BindBackup""#.to_string()),
                Just(r#""org.varlink.service.GetInfo""#.to_string()),
                Just(r#"{"target":"/home/a/x","mode":"copy"}"#.to_string()),
                Just(r#"{"target":"/home/a/x","mode":"copy","mode":7}"#.to_string()),
                Just("1e400".to_string()),
                Just("-1".to_string()),
                Just("340282366920938463463374607431768211456".to_string()),
                Just("true".to_string()),
                Just("null".to_string()),
                Just("[]".to_string()),
                Just(r#""\u0000""#.to_string()),
                Just(r#""\udfff""#.to_string()),
                hostile_string().prop_map(|s| Value::String(s).to_string()),
            ],
            6,
        ),
    ) {
        let body: Vec<String> = keys
            .iter()
            .zip(&values)
            .map(|(k, v)| format!("\"{k}\":{v}"))
            .collect();
        check_frame(format!("{{{}}}", body.join(",")).as_bytes());
    }

    /// Every method with hostile strings survives encode → frame → decode unchanged, as one frame.
    #[test]
    fn valid_calls_round_trip(m in any_method(), oneway in any::<bool>()) {
        let mut call = m.to_call();
        call.oneway = oneway;
        let bytes = encode(&call.to_json());
        prop_assert_eq!(bytes.iter().filter(|&&b| b == 0).count(), 1);
        let frames = frames_of(&bytes, &[], usize::MAX).unwrap();
        prop_assert_eq!(frames.len(), 1);
        let back = Call::parse(&frames[0]).unwrap();
        prop_assert_eq!(&back, &call);
        prop_assert_eq!(Method::from_call(&back).unwrap(), m);
    }

    /// Valid calls with random edits: still a call or a named error.
    #[test]
    fn mutated_calls_decode_or_fail_named(
        m in any_method(),
        edits in proptest::collection::vec(edit(), 1..6),
    ) {
        let bytes = encode(&m.to_call().to_json());
        let mutated = apply(bytes[..bytes.len() - 1].to_vec(), &edits);
        check_frame(&mutated);
        // A mutated stream (with NULs spliced in, say) splits into frames that all decode to a
        // call or a named error.
        let mut stream = mutated;
        stream.push(0);
        for f in frames_of(&stream, &[], 64 * 1024).unwrap_or_default() {
            check_frame(&f);
        }
    }

    /// Nesting far beyond serde_json's recursion limit: an error, not a stack overflow.
    #[test]
    fn deep_nesting_is_an_error(
        depth in 0usize..20_000,
        open in prop_oneof![Just("["), Just("{\"a\":"), Just("{\"parameters\":")],
        close in any::<bool>(),
    ) {
        let mut s = format!("{{\"method\":\"io.asd.Helper.Detach\",\"parameters\":{{\"target\":{}", open.repeat(depth));
        if close {
            s.push_str(&"]".repeat(depth));
        }
        s.push_str("}}");
        check_frame(s.as_bytes());
    }

    /// Huge, negative, fractional and exponent numbers wherever a value goes.
    #[test]
    fn huge_numbers_are_named_errors(
        digits in "-?[0-9]{1,400}(\\.[0-9]{1,50})?([eE][+-]?[0-9]{1,6})?",
        slot in 0usize..5,
    ) {
        let s = match slot {
            0 => format!(r#"{{"method":{digits}}}"#),
            1 => format!(r#"{{"method":"io.asd.Helper.Freeze","parameters":{{"target":"/x","frozen":{digits}}}}}"#),
            2 => format!(r#"{{"method":"io.asd.Helper.BindBackup","parameters":{{"target":{digits},"mode":"copy"}}}}"#),
            3 => format!(r#"{{"method":"io.asd.Helper.ListMounts","oneway":{digits}}}"#),
            _ => digits.clone(),
        };
        prop_assert!(decode(s.as_bytes()).is_err());
        check_frame(s.as_bytes());
    }

    /// Invalid UTF-8 (raw bytes or lone surrogate escapes) inside a string is `NotJson`.
    #[test]
    fn invalid_utf8_in_strings_is_not_json(
        prefix in "[a-z/]{0,10}",
        bad in prop_oneof![
            Just(b"\xff".to_vec()), Just(b"\xc3".to_vec()), Just(b"\xc0\xaf".to_vec()),
            Just(b"\xed\xa0\x80".to_vec()), Just(b"\xf4\x90\x80\x80".to_vec()),
            Just(br"\ud800".to_vec()), Just(br"\udc00x".to_vec()),
        ],
        suffix in "[a-z/]{0,10}",
    ) {
        let mut s = br#"{"method":"io.asd.Helper.Detach","parameters":{"target":"/"#.to_vec();
        s.extend_from_slice(prefix.as_bytes());
        s.extend_from_slice(&bad);
        s.extend_from_slice(suffix.as_bytes());
        s.extend_from_slice(br#""}}"#);
        prop_assert!(matches!(Call::parse(&s), Err(RequestError::NotJson(_))), "{:?}", String::from_utf8_lossy(&s));
    }

    /// An escaped NUL stays inside the string (and the frame); a raw NUL ends the frame there,
    /// and both halves fail with named errors.
    #[test]
    fn nul_inside_strings(a in "[a-z/]{0,20}", b in "[a-z/]{0,20}") {
        let target = format!("/{a}\0{b}");
        let m = Method::Detach { target: target.clone() };
        let bytes = encode(&m.to_call().to_json());
        let frames = frames_of(&bytes, &[], 1024).unwrap();
        prop_assert_eq!(frames.len(), 1);
        prop_assert_eq!(decode(&frames[0]).unwrap(), m);

        let raw = format!("{{\"method\":\"io.asd.Helper.Detach\",\"parameters\":{{\"target\":\"{target}\"}}}}\0");
        let frames = frames_of(raw.as_bytes(), &[], 1024).unwrap_or_default();
        prop_assert_eq!(frames.len(), 2);
        for f in &frames {
            prop_assert!(decode(f).is_err());
            check_frame(f);
        }
    }

    /// Duplicate keys: the last one wins, at every level, consistently (what serde_json does;
    /// nothing between the client and the helper reads the JSON with another parser).
    #[test]
    fn duplicate_keys_last_wins(
        first in any_method(),
        second in any_method(),
    ) {
        let (a, b) = (first.to_call(), second.to_call());
        let s = format!(
            r#"{{"method":{},"parameters":{},"method":{},"parameters":{}}}"#,
            Value::String(a.method.clone()),
            Value::Object(a.parameters.clone()),
            Value::String(b.method.clone()),
            Value::Object(b.parameters.clone()),
        );
        prop_assert_eq!(decode(s.as_bytes()).unwrap(), second);
        // Inside parameters too.
        let mut params = String::from("{");
        for (k, v) in a.parameters.iter().chain(b.parameters.iter()) {
            params.push_str(&format!("{}:{},", Value::String(k.clone()), v));
        }
        params.pop();
        if params.is_empty() { params.push('{'); }
        params.push('}');
        let s = format!(r#"{{"method":{},"parameters":{params}}}"#, Value::String(b.method.clone()));
        let call = Call::parse(s.as_bytes()).unwrap();
        let mut want: Map<String, Value> = a.parameters.clone();
        want.extend(b.parameters.clone());
        prop_assert_eq!(call.parameters, want);
    }

    /// Frames split at every byte boundary, and coalesced into one read, come out identical.
    #[test]
    fn split_and_coalesced_frames(
        calls in proptest::collection::vec(short_method(), 1..5),
    ) {
        let mut stream = Vec::new();
        let mut want = Vec::new();
        for m in &calls {
            let b = encode(&m.to_call().to_json());
            want.push(b[..b.len() - 1].to_vec());
            stream.extend_from_slice(&b);
        }
        // Coalesced: everything in one read.
        prop_assert_eq!(&frames_of(&stream, &[], 64 * 1024).unwrap(), &want);
        // One byte per read.
        let every: Vec<usize> = (0..stream.len()).collect();
        prop_assert_eq!(&frames_of(&stream, &every, 64 * 1024).unwrap(), &want);
        // Every single split point.
        for cut in 0..=stream.len() {
            prop_assert_eq!(&frames_of(&stream, &[cut], 64 * 1024).unwrap(), &want);
        }
        for (f, m) in want.iter().zip(&calls) {
            prop_assert_eq!(&decode(f).unwrap(), m);
        }
        // A stream cut short inside a frame is `Truncated`, never a frame.
        let cut = stream.len() - 1;
        let truncated = frames_of(&stream[..cut], &[], 64 * 1024);
        prop_assert!(matches!(truncated, Err(FrameError::Truncated { .. })), "{:?}", truncated);
    }

    /// Random chunking of random bytes: the same frames (or the same error) as one big read.
    #[test]
    fn chunking_does_not_change_the_outcome(
        stream in proptest::collection::vec(prop_oneof![3 => any::<u8>(), 1 => Just(0u8)], 0..3000),
        cuts in proptest::collection::vec(any::<usize>(), 0..40),
        max in 1usize..400,
    ) {
        let whole = frames_of(&stream, &[], max);
        let chunked = frames_of(&stream, &cuts, max);
        match (&whole, &chunked) {
            (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
            // The first frame over the limit is refused whichever way it arrives; how much of a
            // truncated tail was seen is the only thing chunking may change.
            (Err(FrameError::TooLarge { .. }), Err(FrameError::TooLarge { .. })) => {}
            (Err(FrameError::Truncated { .. }), Err(FrameError::Truncated { .. })) => {}
            _ => prop_assert!(false, "{whole:?} vs {chunked:?}"),
        }
        if let Ok(frames) = whole {
            for f in &frames {
                prop_assert!(f.len() <= max && !f.contains(&0));
                check_frame(f);
            }
        }
    }

    /// Oversized frames: a frame of exactly the limit passes, one byte more is `TooLarge`, with
    /// or without its NUL, however it is split.
    #[test]
    fn oversized_frames_are_refused(
        max in 1usize..2000,
        extra in 0usize..3,
        nul in any::<bool>(),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut stream = vec![b'x'; max + extra];
        if nul {
            stream.push(0);
        }
        let got = frames_of(&stream, &cuts, max);
        match (extra, nul) {
            (0, true) => prop_assert_eq!(got.unwrap(), vec![vec![b'x'; max]]),
            (0, false) => prop_assert!(matches!(got, Err(FrameError::Truncated { .. })), "{:?}", got),
            _ => prop_assert_eq!(got, Err(FrameError::TooLarge { limit: max })),
        }
    }
}

/// The helper's limit: a 64 KiB message is refused before its end arrives (no NUL needed), so a
/// client cannot make the helper buffer more than the limit plus one read.
#[test]
fn default_limit_refuses_an_endless_message() {
    let mut d = FrameDecoder::new(asd_protocol::DEFAULT_MAX_MESSAGE);
    let chunk = vec![b' '; 16 * 1024];
    let mut fed = 0;
    loop {
        d.feed(&chunk);
        fed += chunk.len();
        match d.next_frame() {
            Ok(None) => assert!(fed <= asd_protocol::DEFAULT_MAX_MESSAGE),
            Err(FrameError::TooLarge { .. }) => break,
            other => panic!("{other:?}"),
        }
    }
    assert!(fed <= asd_protocol::DEFAULT_MAX_MESSAGE + chunk.len());
}
