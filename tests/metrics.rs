//! `mora-cache serve --metrics`: a scrape parsed by a Prometheus text-format
//! parser has every family with its type, and the counters and gauges move
//! as workflows run, models are evicted and requests are refused; `/healthz`
//! answers probes; idle connections never keep a scrape waiting.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use mora::{embed_workflow, one_line_failure, test_model_dir, wait_until, Env};
use mora_common::connection::Connection;
use mora_common::manifest::WeightDType;
use mora_common::protocol::{Device, Request, Response};
use mora_common::{ModelSource, ResolvedModel};
use prometheus_parse::{Scrape, Value};

/// The metrics URL's `HOST:PORT`, as the daemon logs it at start.
fn metrics_addr(env: &Env) -> String {
    let mut addr = None;
    let logged = wait_until(Duration::from_secs(20), || {
        addr = env.daemon_log().split_once("url=http://").and_then(|(_, rest)| {
            rest.split_whitespace().next()?.strip_suffix("/metrics").map(str::to_string)
        });
        addr.is_some()
    });
    assert!(logged, "the daemon did not log its metrics address: {}", env.daemon_log());
    addr.unwrap()
}

/// A plain HTTP/1.1 request; returns the status line, the headers and the body.
/// A daemon that does not answer within 30 s fails the test.
fn http(addr: &str, request_line: &str) -> (String, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics port");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "{request_line}\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("read the reply");
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no end of head: {reply:?}"));
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_string(), body.to_string())
}

struct Metrics(Scrape);

impl Metrics {
    fn scrape(addr: &str) -> Metrics {
        let (status, headers, body) = http(addr, "GET /metrics HTTP/1.1");
        assert_eq!(status, "HTTP/1.1 200 OK", "{headers}\n{body}");
        assert!(headers.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8"), "{headers}");
        let parsed = Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("parse the scrape");
        assert!(!parsed.samples.is_empty(), "{body}");
        Metrics(parsed)
    }

    /// The samples of `name` whose labels include every one of `labels`.
    fn find(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&prometheus_parse::Sample> {
        self.0
            .samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .collect()
    }

    /// The value of the one sample of `name` with `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found = self.find(name, labels);
        assert_eq!(found.len(), 1, "{name}{labels:?}: {found:?}");
        match found[0].value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            ref other => panic!("{name} is not a number: {other:?}"),
        }
    }

    fn cpu(&self, name: &str) -> f64 {
        self.value(name, &[("device", "cpu")])
    }
}

/// Bytes the daemon holds for the model in `dir`, in f32.
fn segment_bytes(dir: &Path) -> u64 {
    let model = ResolvedModel { name: "probe".into(), dir: dir.to_path_buf(), weights: vec![dir.join("model.safetensors")] };
    mora_cache::checkpoint::plan(&model, WeightDType::F32, Device::Cpu).expect("plan").bytes()
}

#[test]
fn a_scrape_has_every_family_and_its_counters_move_as_workflows_run() {
    // Room for the test model and a little more, so a second model is refused while it is pinned.
    let model_bytes = segment_bytes(&test_model_dir());
    let budget = (model_bytes + (8 << 20)).to_string();
    let env = Env::with_daemon_args("metrics", &["--metrics", "127.0.0.1:0", "--max-memory", &budget]);
    let addr = metrics_addr(&env);

    let m = Metrics::scrape(&addr);
    for (name, is_type) in [
        ("mora_resident_bytes", (|v| matches!(v, Value::Gauge(_))) as fn(&Value) -> bool),
        ("mora_loading_bytes", |v| matches!(v, Value::Gauge(_))),
        ("mora_budget_bytes", |v| matches!(v, Value::Gauge(_))),
        ("mora_models_resident", |v| matches!(v, Value::Gauge(_))),
        ("mora_models_loading", |v| matches!(v, Value::Gauge(_))),
        ("mora_leases_open", |v| matches!(v, Value::Gauge(_))),
        ("mora_clients_connected", |v| matches!(v, Value::Gauge(_))),
        ("mora_build_info", |v| matches!(v, Value::Gauge(_))),
        ("mora_loads_total", |v| matches!(v, Value::Counter(_))),
        ("mora_loaded_bytes_total", |v| matches!(v, Value::Counter(_))),
        ("mora_cache_hits_total", |v| matches!(v, Value::Counter(_))),
        ("mora_evictions_total", |v| matches!(v, Value::Counter(_))),
        ("mora_refusals_total", |v| matches!(v, Value::Counter(_))),
        ("mora_load_duration_seconds", |v| matches!(v, Value::Histogram(_))),
    ] {
        let samples = m.find(name, &[]);
        assert!(!samples.is_empty(), "no {name}");
        assert!(samples.iter().all(|s| is_type(&s.value)), "{name} has the wrong type: {samples:?}");
        assert!(m.0.docs.contains_key(name), "{name} has no HELP");
    }
    assert_eq!(m.value("mora_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    assert_eq!(m.cpu("mora_budget_bytes"), budget.parse::<f64>().unwrap());
    assert_eq!(m.cpu("mora_resident_bytes"), 0.0);
    assert_eq!(m.value("mora_loads_total", &[("device", "cpu"), ("result", "ok")]), 0.0);
    assert_eq!(m.value("mora_evictions_total", &[("device", "cpu"), ("reason", "requested")]), 0.0);
    assert_eq!(m.value("mora_refusals_total", &[("reason", "budget")]), 0.0);
    let buckets = m.find("mora_load_duration_seconds", &[("device", "cpu")]);
    let Value::Histogram(b) = &buckets[0].value else { unreachable!() };
    assert!(b.iter().any(|c| c.less_than == 0.01) && b.iter().any(|c| c.less_than == 600.0), "{b:?}");

    // A cold run loads the model; a warm one is a hit.
    let wf = env.workflow("embed.toml", &embed_workflow(&["a cat", "a dog"]));
    let out = env.exec(&wf, "cold", &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m = Metrics::scrape(&addr);
    assert_eq!(m.value("mora_loads_total", &[("device", "cpu"), ("result", "ok")]), 1.0);
    assert_eq!(m.value("mora_loads_total", &[("device", "cpu"), ("result", "error")]), 0.0);
    assert_eq!(m.cpu("mora_loaded_bytes_total"), model_bytes as f64);
    assert_eq!(m.cpu("mora_load_duration_seconds_count"), 1.0);
    assert_eq!(m.cpu("mora_cache_hits_total"), 0.0);
    assert_eq!(m.cpu("mora_resident_bytes"), env.resident_bytes() as f64);
    assert_eq!(m.cpu("mora_resident_bytes"), model_bytes as f64);
    assert_eq!(m.cpu("mora_models_resident"), 1.0);
    assert_eq!(m.cpu("mora_leases_open"), 0.0);
    let out = env.exec(&wf, "warm", &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m = Metrics::scrape(&addr);
    assert_eq!(m.cpu("mora_cache_hits_total"), 1.0);
    assert_eq!(m.value("mora_loads_total", &[("device", "cpu"), ("result", "ok")]), 1.0);

    // A client holding a lease: connected, leased, and its model cannot be evicted.
    let conn = Connection::connect(&env.socket, "metrics test").expect("connect");
    let (resp, _fds) = conn
        .call(&Request::Acquire {
            source: ModelSource::Dir { path: test_model_dir(), variant: None },
            dtype: WeightDType::F32,
            device: Device::Cpu,
            keep_alive: None,
        })
        .expect("acquire");
    assert!(matches!(resp, Response::Acquired(_)), "{resp:?}");
    // Earlier admin connections close on their own time: wait for them.
    assert!(
        wait_until(Duration::from_secs(10), || Metrics::scrape(&addr).value("mora_clients_connected", &[]) == 1.0),
        "{:?}",
        Metrics::scrape(&addr).find("mora_clients_connected", &[])
    );
    let m = Metrics::scrape(&addr);
    assert_eq!(m.cpu("mora_leases_open"), 1.0);
    assert_eq!(m.cpu("mora_cache_hits_total"), 2.0, "the same bytes under a directory name are a hit");
    let line = one_line_failure(&env.admin(&["evict", "sentence-transformers/all-MiniLM-L6-v2"]));
    assert!(line.contains("leased by pid"), "{line}");
    assert_eq!(Metrics::scrape(&addr).value("mora_refusals_total", &[("reason", "leased")]), 1.0);
    drop(conn);
    assert!(
        wait_until(Duration::from_secs(10), || {
            let m = Metrics::scrape(&addr);
            m.cpu("mora_leases_open") == 0.0 && m.value("mora_clients_connected", &[]) == 0.0
        }),
        "the lease or the connection outlived the client"
    );

    // Pinned: refused eviction, and a second model that does not fit is refused too.
    env.admin_ok(&["pin", "sentence-transformers/all-MiniLM-L6-v2"]);
    let line = one_line_failure(&env.admin(&["evict", "sentence-transformers/all-MiniLM-L6-v2"]));
    assert!(line.contains("is pinned"), "{line}");
    let other = env.synth("other", "bert", "16MiB", 7);
    let line = one_line_failure(&env.admin(&["load", other.to_str().unwrap()]));
    assert!(line.contains("needs") && line.contains("budget"), "{line}");
    let m = Metrics::scrape(&addr);
    assert_eq!(m.value("mora_refusals_total", &[("reason", "pinned")]), 1.0);
    assert_eq!(m.value("mora_refusals_total", &[("reason", "budget")]), 1.0);
    assert_eq!(m.value("mora_loads_total", &[("device", "cpu"), ("result", "ok")]), 1.0, "a refused load never starts");

    // Unpinned and evicted: counted by reason, and the gauges fall back to zero.
    env.admin_ok(&["unpin", "sentence-transformers/all-MiniLM-L6-v2"]);
    env.admin_ok(&["evict", "sentence-transformers/all-MiniLM-L6-v2"]);
    let m = Metrics::scrape(&addr);
    assert_eq!(m.value("mora_evictions_total", &[("device", "cpu"), ("reason", "requested")]), 1.0);
    assert_eq!(m.value("mora_evictions_total", &[("device", "cpu"), ("reason", "budget")]), 0.0);
    assert_eq!(m.cpu("mora_resident_bytes"), 0.0);
    assert_eq!(m.cpu("mora_models_resident"), 0.0);

    // The other model now fits; loading it, and clearing, count as well.
    env.admin_ok(&["load", other.to_str().unwrap()]);
    env.admin_ok(&["clear"]);
    let m = Metrics::scrape(&addr);
    assert_eq!(m.value("mora_loads_total", &[("device", "cpu"), ("result", "ok")]), 2.0);
    assert_eq!(m.value("mora_evictions_total", &[("device", "cpu"), ("reason", "clear")]), 1.0);
    assert_eq!(m.cpu("mora_load_duration_seconds_count"), 2.0);

    // Other paths and methods are refused; the daemon keeps serving both sides.
    assert!(http(&addr, "GET / HTTP/1.1").0.starts_with("HTTP/1.1 404 "));
    assert!(http(&addr, "POST /metrics HTTP/1.1").0.starts_with("HTTP/1.1 405 "));
    assert!(env.admin(&["ps"]).status.success());
    Metrics::scrape(&addr);
}

#[test]
fn a_metrics_address_that_cannot_be_bound_is_one_line_at_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for (bad, says) in [(addr.as_str(), "in use"), ("no-port-here", "HOST:PORT")] {
        let env = Env::new("metrics-bind");
        let out = env.command("mora-cache").args(["serve", "--socket"]).arg(&env.socket).args(["--metrics", bad]).output().unwrap();
        let line = one_line_failure(&out);
        assert!(line.starts_with(&format!("mora-cache: error: cannot serve metrics on {bad}: ")), "{line}");
        assert!(line.contains(says), "{line}");
        assert!(!env.socket.exists(), "the socket of a daemon that did not start is left behind");
    }
}

/// The TCP state the kernel's tables give a listening socket.
const LISTEN: &str = "0A";

/// The TCP sockets among a process's descriptors: each one's local port and
/// state, as the kernel's tables (`/proc/PID/net/tcp`, `tcp6`) list them.
fn tcp_sockets(pid: u32) -> Vec<(u16, String)> {
    let held = socket_inodes(pid);
    ["tcp", "tcp6"]
        .iter()
        .flat_map(|table| std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default().lines().skip(1).map(str::to_string).collect::<Vec<_>>())
        .filter_map(|row| {
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let cols: Vec<&str> = row.split_whitespace().collect();
            let port = u16::from_str_radix(cols.get(1)?.rsplit_once(':')?.1, 16).ok()?;
            let state = cols.get(3)?.to_string();
            held.contains(*cols.get(9)?).then_some((port, state))
        })
        .collect()
}

/// TCP sockets in LISTEN state among a process's descriptors.
fn tcp_listeners(pid: u32) -> usize {
    tcp_sockets(pid).iter().filter(|(_, state)| state == LISTEN).count()
}

#[test]
fn without_the_flag_no_port_is_open() {
    let env = Env::with_daemon("metrics-off");
    env.admin_ok(&["ps"]);
    assert!(!env.daemon_log().contains("serving metrics"), "{}", env.daemon_log());
    assert_eq!(tcp_listeners(env.daemon_pid().unwrap()), 0);
    // The same check sees the port of a daemon that serves metrics.
    let on = Env::with_daemon_args("metrics-on", &["--metrics", "127.0.0.1:0"]);
    metrics_addr(&on);
    assert_eq!(tcp_listeners(on.daemon_pid().unwrap()), 1);
}

/// Sockets among a process's descriptors.
fn open_sockets(pid: u32) -> usize {
    socket_inodes(pid).len()
}

/// The inodes of the sockets a process holds open.
fn socket_inodes(pid: u32) -> std::collections::HashSet<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the daemon's descriptors")
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|t| Some(t.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.to_string()))
        .collect()
}

/// How many connections to the metrics port `addr` the daemon has accepted
/// and holds: its TCP sockets on that local port, the listener left out.
/// Counted this way, a socket the daemon opens or closes for anything else
/// (a client of its own socket that has not yet hung up) cannot move the
/// figure.
fn accepted_connections(pid: u32, addr: &str) -> usize {
    let port = addr.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).expect("a port in the metrics address");
    tcp_sockets(pid).iter().filter(|(p, state)| *p == port && state != LISTEN).count()
}

/// Raises this process's soft limit on open files to at least `want` (up to
/// its hard limit), before it starts the daemon, which inherits it.
fn raise_open_files(want: u64) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    let hard = limit.maximum.unwrap_or(u64::MAX);
    assert!(hard >= want, "this test needs {want} open files; the hard limit is {hard}");
    if limit.current.is_some_and(|soft| soft < want) {
        limit.current = Some(want);
        setrlimit(Resource::Nofile, limit).expect("raise the soft limit on open files");
    }
}

#[test]
fn a_thousand_idle_connections_leave_scrapes_and_probes_answered() {
    // What any local user can open. The endpoint this replaced had 16
    // slots: 32 idle connections made every scrape fail until they closed.
    const IDLE: usize = 1000;
    raise_open_files(2 * IDLE as u64 + 512);
    let env = Env::with_daemon_args("metrics-idle", &["--metrics", "127.0.0.1:0"]);
    let addr = metrics_addr(&env);
    let pid = env.daemon_pid().unwrap();
    assert_eq!(accepted_connections(pid, &addr), 0, "connections to the metrics port before the test opened any");
    // Opened a hundred at a time, each hundred accepted before the next: a
    // thousand at once overflow the listen backlog on a loaded machine, and
    // the retried handshakes can take longer than the idle ones' 10 s
    // deadline, so that they are never all open together.
    let mut idle: Vec<TcpStream> = Vec::with_capacity(IDLE);
    for _ in 0..IDLE / 100 {
        idle.extend((0..100).map(|_| TcpStream::connect(&addr).expect("open an idle connection")));
        let accepted = || accepted_connections(pid, &addr) >= idle.len();
        assert!(
            wait_until(Duration::from_secs(5), accepted),
            "after {} connections the daemon has accepted {} (it holds {} sockets)",
            idle.len(),
            accepted_connections(pid, &addr),
            open_sockets(pid)
        );
    }
    // Every one of them accepted and held open by the daemon.
    let held = || accepted_connections(pid, &addr) >= IDLE;
    assert!(held(), "the daemon holds {} of the {IDLE} idle connections", accepted_connections(pid, &addr));

    // Answered at once, not after the idle ones' 10 s deadline.
    let started = Instant::now();
    let m = Metrics::scrape(&addr);
    assert_eq!(m.value("mora_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    let (status, headers, body) = http(&addr, "GET /healthz HTTP/1.1");
    assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", "ok"), "{headers}");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(8), "a scrape and a probe took {took:?} beside {IDLE} idle connections");
    assert!(held(), "idle connections were closed to make room");
    drop(idle);
    // The daemon's own socket served all along.
    env.admin_ok(&["ps"]);
}
