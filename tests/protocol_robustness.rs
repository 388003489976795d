//! Whatever a peer writes to the socket, the daemon keeps serving others.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use mora::Env;
use mora_common::frame;
use mora_common::protocol::{ErrorKind, Hello, HelloReply, Request, Response, HELLO_MAGIC, MAX_FRAME_BYTES, PROTOCOL_VERSION};

fn connect(env: &Env) -> UnixStream {
    let s = UnixStream::connect(&env.socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Reads until the daemon closes the connection; panics if it does not.
fn assert_closed(mut s: UnixStream) {
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("daemon did not close the connection: {e}"),
        }
    }
}

fn handshake(s: &UnixStream) {
    frame::write_message(s, &Hello { magic: HELLO_MAGIC, version: PROTOCOL_VERSION, client: "test".into() }).unwrap();
    let reply: HelloReply = frame::read_message(s, &mut Vec::new()).unwrap();
    assert!(reply.accepted, "{}", reply.message);
}

fn assert_still_serving(env: &mut Env) {
    assert!(env.daemon_alive(), "daemon died: {}", env.daemon_log());
    let ps = env.command("mora-cache").args(["ps", "--json"]).output().unwrap();
    assert!(ps.status.success(), "daemon no longer answers: {}", String::from_utf8_lossy(&ps.stderr));
}

#[test]
fn garbage_bytes_close_that_connection_only() {
    let mut env = Env::with_daemon("garbage");
    let mut s = connect(&env);
    s.write_all(b"\x05\x00\x00\x00GET / HTTP/1.1\r\n\r\n").unwrap();
    assert_closed(s);
    let mut s = connect(&env);
    s.write_all(&[0xff; 64]).unwrap();
    drop(s);
    assert_still_serving(&mut env);
}

#[test]
fn oversized_frame_length_is_refused_without_allocating() {
    let mut env = Env::with_daemon("oversize");
    let mut s = connect(&env);
    s.write_all(&u32::MAX.to_le_bytes()).unwrap();
    assert_closed(s);
    // Also after a good handshake.
    let mut s = connect(&env);
    handshake(&s);
    s.write_all(&((MAX_FRAME_BYTES + 1) as u32).to_le_bytes()).unwrap();
    assert_closed(s);
    assert_still_serving(&mut env);
}

#[test]
fn wrong_protocol_version_is_told_to_restart_the_daemon() {
    let mut env = Env::with_daemon("version");
    let s = connect(&env);
    frame::write_message(&s, &Hello { magic: HELLO_MAGIC, version: PROTOCOL_VERSION + 98, client: "future".into() })
        .unwrap();
    let reply: HelloReply = frame::read_message(&s, &mut Vec::new()).unwrap();
    assert!(!reply.accepted);
    assert_eq!(reply.version, PROTOCOL_VERSION);
    let expected = format!(
        "daemon speaks protocol {PROTOCOL_VERSION}, client speaks {}: restart the daemon",
        PROTOCOL_VERSION + 98
    );
    assert!(reply.message.starts_with(&expected), "{}", reply.message);
    assert_closed(s);
    assert_still_serving(&mut env);
}

#[test]
fn malformed_request_gets_an_error_and_the_connection_goes_on() {
    let mut env = Env::with_daemon("malformed");
    let mut s = connect(&env);
    handshake(&s);
    s.write_all(&4u32.to_le_bytes()).unwrap();
    s.write_all(&[0xee, 0xee, 0xee, 0xee]).unwrap();
    match frame::read_message::<Response>(&s, &mut Vec::new()).unwrap() {
        Response::Error(e) => assert_eq!(e.kind, ErrorKind::BadRequest, "{}", e.message),
        other => panic!("expected an error, got {other:?}"),
    }
    frame::write_message(&s, &Request::List).unwrap();
    assert!(matches!(frame::read_message::<Response>(&s, &mut Vec::new()).unwrap(), Response::Status(_)));
    // Releasing a lease this connection never took is refused, not fatal.
    frame::write_message(&s, &Request::Release { lease: 12345 }).unwrap();
    assert!(matches!(frame::read_message::<Response>(&s, &mut Vec::new()).unwrap(), Response::Error(_)));
    assert_still_serving(&mut env);
}

#[test]
fn a_second_daemon_does_not_steal_a_live_socket() {
    let mut env = Env::with_daemon("second");
    let out = env.command("mora-cache").args(["serve"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another daemon is serving"), "{err}");
    assert!(err.contains(&format!("pid {}", env.daemon_pid().unwrap())), "{err}");
    assert_still_serving(&mut env);
}

#[test]
fn a_killed_daemons_stale_socket_is_replaced() {
    let mut env = Env::with_daemon("stale");
    let pid = env.daemon_pid().unwrap();
    rustix::process::kill_process(rustix::process::Pid::from_raw(pid as i32).unwrap(), rustix::process::Signal::KILL)
        .unwrap();
    assert!(mora::wait_until(Duration::from_secs(10), || !env.daemon_alive()));
    assert!(env.socket.exists(), "SIGKILL leaves the socket file behind");
    env.start_daemon();
    assert_still_serving(&mut env);
}

#[test]
fn stop_shuts_the_daemon_down_cleanly() {
    let mut env = Env::with_daemon("stop");
    let out = env.command("mora-cache").arg("stop").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(mora::wait_until(Duration::from_secs(10), || !env.daemon_alive()), "daemon still running");
    assert!(!env.socket.exists());
    let ps = env.command("mora-cache").args(["ps"]).output().unwrap();
    let line = mora::one_line_failure(&ps);
    assert!(line.contains("no cache daemon is listening at"), "{line}");
}

#[test]
fn a_silent_connection_does_not_hold_up_other_clients() {
    let mut env = Env::with_daemon("silent");
    // Connected, never says hello: the daemon serves everyone else meanwhile.
    let silent: Vec<UnixStream> = (0..8).map(|_| connect(&env)).collect();
    assert_still_serving(&mut env);
    let s = connect(&env);
    handshake(&s);
    frame::write_message(&s, &Request::List).unwrap();
    assert!(matches!(frame::read_message::<Response>(&s, &mut Vec::new()).unwrap(), Response::Status(_)));
    drop(silent);
    assert_still_serving(&mut env);
}

#[test]
fn a_client_of_another_uid_is_refused() {
    // Needs root (to become another user) and setpriv (util-linux).
    if !rustix::process::getuid().is_root() {
        mora::skipped("protocol_robustness: a_client_of_another_uid_is_refused", "tests do not run as root, so no client of another uid can be made");
        return;
    }
    if std::process::Command::new("setpriv").arg("--version").output().is_err() {
        mora::skipped("protocol_robustness: a_client_of_another_uid_is_refused", "setpriv (util-linux) is not installed");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let env = Env::with_daemon("other-uid");
    // Let uid 65534 reach the socket and run our binary, so that what refuses
    // it is the daemon's peer check, not file permissions.
    let bin_dir = env.scratch.join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let ps = bin_dir.join("mora-cache");
    std::fs::copy(mora::bin("mora-cache"), &ps).unwrap();
    for (p, mode) in [(&env.scratch.path, 0o711), (&bin_dir, 0o755), (&ps, 0o755), (&env.socket.parent().unwrap().to_path_buf(), 0o711), (&env.socket, 0o666)] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&ps)
        .arg("--socket")
        .arg(&env.socket)
        .arg("ps")
        .output()
        .unwrap();
    let line = mora::one_line_failure(&out);
    assert!(line.contains("refused this client") && line.contains("serves uid 0 only, and you are uid 65534"), "{line}");
    // The owner is still served.
    assert!(env.ps().is_empty());
}
