//! systemd socket activation: the daemon serves a listening socket it is
//! handed (`LISTEN_PID`, `LISTEN_FDS`, descriptor 3) instead of binding its
//! own, under the same lock, and leaves the socket file to its owner.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::Duration;

use mora::{bin, local_embed_workflow, wait_until, Env};

#[test]
fn an_inherited_listening_socket_is_served_and_left_in_place() {
    let env = Env::new("activation");
    let dir = env.scratch.join("run");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    // What systemd does for a .socket unit: bind and listen, then start the
    // service with the socket on descriptor 3.
    let listener = std::os::unix::net::UnixListener::bind(&env.socket).unwrap();
    let inode = std::fs::metadata(&env.socket).unwrap().ino();
    // A descriptor number other than 3, so that dup2 onto 3 clears close-on-exec.
    let high = rustix::io::fcntl_dupfd_cloexec(&listener, 10).unwrap();
    let high_raw = high.as_raw_fd();
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" serve", bin("mora-cache").to_str().unwrap()])
        .env_remove("MORA_SOCKET")
        .env("XDG_RUNTIME_DIR", env.scratch.join("elsewhere"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(env.scratch.join("daemon.log")).unwrap());
    // SAFETY: dup2 is async-signal-safe; descriptor 3 is the target number,
    // never closed by this child before exec.
    unsafe {
        cmd.pre_exec(move || {
            let mut three = OwnedFd::from_raw_fd(3);
            let r = rustix::io::dup2(rustix::fd::BorrowedFd::borrow_raw(high_raw), &mut three);
            std::mem::forget(three);
            r.map_err(Into::into)
        });
    }
    let mut daemon = cmd.spawn().unwrap();
    drop(high);
    let socket = env.socket.clone();
    assert!(
        wait_until(Duration::from_secs(20), || env.admin(&["ps"]).status.success()),
        "no answer on the inherited socket: {}",
        env.daemon_log()
    );
    // It serves the socket it was given, under the usual lock, and runs work.
    assert_eq!(std::fs::metadata(&socket).unwrap().ino(), inode, "the daemon must not rebind");
    let lock = std::fs::read_to_string(mora_common::paths::lock_path(&socket)).unwrap();
    assert_eq!(lock.trim().parse::<u32>().unwrap(), daemon.id());
    let model = env.synth("bert", "bert", "1MiB", 1);
    let wf = env.workflow("embed.toml", &local_embed_workflow(&model));
    let out = env.exec(&wf, "out", &["--no-autostart"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Stopped, it leaves the socket file to the service manager.
    env.admin_ok(&["stop"]);
    assert!(daemon.wait().unwrap().success(), "{}", env.daemon_log());
    assert!(socket.exists(), "the socket file belongs to the service manager");
    drop(listener);
}

#[test]
fn the_systemd_units_agree_with_the_daemon() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd");
    let socket = std::fs::read_to_string(root.join("mora-cache.socket")).unwrap();
    let service = std::fs::read_to_string(root.join("mora-cache.service")).unwrap();
    let value = |unit: &str, key: &str| {
        unit.lines().find_map(|l| l.strip_prefix(&format!("{key}="))).unwrap_or_else(|| panic!("no {key}= in {unit}")).to_string()
    };
    // The client's default path, and the daemon's own permissions.
    assert_eq!(value(&socket, "ListenStream"), "%t/mora/cache.sock");
    assert_eq!(mora_common::paths::socket_path(None).file_name().unwrap(), "cache.sock");
    assert_eq!(value(&socket, "SocketMode"), "0600");
    assert_eq!(value(&socket, "DirectoryMode"), "0700");
    // Every option the service passes is one `mora-cache serve` takes.
    let exec = value(&service, "ExecStart");
    let mut words = exec.split_whitespace();
    assert!(words.next().unwrap().ends_with("/mora-cache"), "{exec}");
    assert_eq!(words.next(), Some("serve"));
    let help = std::process::Command::new(bin("mora-cache")).args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in words.filter(|w| w.starts_with("--")) {
        assert!(help.contains(flag), "`mora-cache serve` has no {flag}: {help}");
    }
    assert_eq!(value(&service, "Requires"), "mora-cache.socket");
}
