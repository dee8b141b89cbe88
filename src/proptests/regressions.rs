//! One test per defect the properties above found, named after the fault.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::time::Duration;

use crate::cli::{parse_duration, parse_size};
use crate::command::{Placeholders, Program};
use crate::contract::{environment, Contract, WorkerVars};

fn contract() -> Contract {
    Contract { sockets: true, launcher_pid: 1, identity: None, watchdog: None }
}

fn binds() -> Vec<crate::socket::BindSpec> {
    vec!["http=127.0.0.1:8080".parse().unwrap()]
}

const W: WorkerVars<'static> = WorkerVars { slot: 0, gen: 1, notify_socket: None };

#[test]
fn placeholder_expansion_mangled_non_utf8_arguments() {
    // Any argument holding a '{' made every argument go through a lossy UTF-8 conversion.
    let command: Vec<OsString> = vec![
        "/bin/sh".into(),
        OsString::from_vec(b"--name=caf\xe9".to_vec()),
        OsString::from_vec(b"\x80{port}".to_vec()),
    ];
    let program = Program::resolve(&command).unwrap();
    let argv = program.argv(&Placeholders { fds: &[7], port: 8080, slot: 2 });
    assert_eq!(argv[1].as_bytes(), b"--name=caf\xe9");
    assert_eq!(argv[2].as_bytes(), b"\x808080");
}

#[test]
fn environment_mangled_non_utf8_names() {
    let inherited = vec![(OsString::from_vec(b"CAF\xc9".to_vec()), OsString::from_vec(b"cr\xe8me".to_vec()))];
    let env = environment(&inherited, &contract(), &binds(), &W);
    assert!(env.iter().any(|e| e.as_bytes() == b"CAF\xc9=cr\xe8me"), "{env:?}");
}

#[test]
fn environment_panicked_on_a_name_no_environment_can_hold() {
    // A name with a NUL (or an '=' past its first byte) cannot be passed: it is left out
    // instead of panicking (NUL) or turning into another variable ("PORT=1" -> PORT).
    let inherited: Vec<(OsString, OsString)> = vec![
        (OsString::from_vec(b"A\0B".to_vec()), "x".into()),
        ("PORT=1".into(), "2".into()),
        ("=C:".into(), "kept".into()),
    ];
    let env = environment(&inherited, &contract(), &binds(), &W);
    assert!(!env.iter().any(|e| e.as_bytes().starts_with(b"A")), "{env:?}");
    assert_eq!(env.iter().filter(|e| e.as_bytes().starts_with(b"PORT=")).count(), 1, "{env:?}");
    assert!(env.iter().any(|e| e.as_bytes() == b"=C:=kept"), "{env:?}");
}

#[test]
fn size_with_a_repeated_unit_suffix_was_accepted() {
    for bad in ["1MBb", "1MBB", "1MiBiB", "1GIBB", "2000000iB", "2000000BB"] {
        assert!(parse_size(bad).is_err(), "{bad}");
    }
    for (good, bytes) in [("1MB", 1u64 << 20), ("1mib", 1 << 20), ("2000000B", 2_000_000), ("1g", 1 << 30)] {
        assert_eq!(parse_size(good), Ok(bytes), "{good}");
    }
}

#[test]
fn duration_in_ms_drifted_by_float_rounding() {
    assert_eq!(parse_duration("9737498469ms"), Ok(Duration::from_millis(9_737_498_469)));
    assert_eq!(parse_duration("1.000000001s"), Ok(Duration::new(1, 1)));
    assert_eq!(parse_duration("0.1s"), Ok(Duration::from_millis(100)));
    assert_eq!(parse_duration(".5"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("2.5m"), Ok(Duration::from_secs(150)));
    for bad in [".", "1.2.3s", "", "s", "366d", "8761h", "1e3s"] {
        assert!(parse_duration(bad).is_err(), "{bad}");
    }
}
