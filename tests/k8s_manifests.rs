//! The Kubernetes manifests (`deploy/k8s/`): parsed, checked against each
//! other (the daemon's pods and the client Jobs must agree on the socket
//! directory, the uid, the hub cache and, on GPUs, the namespaces and GPUs
//! they share) and against the binaries (every flag they pass exists, the
//! probe answers only while a daemon serves, the example Job runs its
//! workflow against a daemon and never starts one of its own).
//!
//! No cluster is needed: the last test plays a node on this machine, each
//! volume of a pod mapped to a scratch directory (the hub cache to the test
//! model's), and runs the containers' own command lines there.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use mora::{bin, root, test_hub, wait_until, Scratch};
use mora_common::units::parse_size;

const DAEMONSETS: [&str; 2] = ["mora-cache", "mora-cache-gpu"];
const JOBS: [&str; 2] = ["mora-embed", "mora-embed-gpu"];
/// The GPU daemon and the client that uses it.
const GPU_PAIR: (&str, &str) = ("mora-cache-gpu", "mora-embed-gpu");
const CPU_PAIR: (&str, &str) = ("mora-cache", "mora-embed");

// ---------------------------------------------------------------------------
// Reading the manifests

fn k8s_dir() -> PathBuf {
    root().join("deploy").join("k8s")
}

/// Every object of every `deploy/k8s/*.yaml`, with the file it came from.
struct Manifests {
    objects: Vec<(String, Value)>,
}

fn manifests() -> Manifests {
    let mut files: Vec<PathBuf> = std::fs::read_dir(k8s_dir())
        .expect("deploy/k8s exists")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", k8s_dir().display());
    let mut objects = Vec::new();
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(&file).expect("read manifest");
        for doc in serde_norway::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc).unwrap_or_else(|e| panic!("{name}: not YAML: {e}"));
            if !v.is_null() {
                objects.push((name.clone(), v));
            }
        }
    }
    Manifests { objects }
}

impl Manifests {
    fn get(&self, kind: &str, name: &str) -> &Value {
        self.objects
            .iter()
            .map(|(_, v)| v)
            .find(|v| v["kind"] == kind && v["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} named {name} in deploy/k8s"))
    }

    fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().map(|(_, v)| v).filter(|v| v["kind"] == kind).collect()
    }
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("expected a string, got {v}"))
}

fn pod(workload: &Value) -> &Value {
    let p = &workload["spec"]["template"]["spec"];
    assert!(p.is_object(), "{} has no pod template", workload["metadata"]["name"]);
    p
}

fn list(v: &Value) -> Vec<&Value> {
    v.as_array().map(|a| a.iter().collect()).unwrap_or_default()
}

/// The pod's one container (the daemon, or the Job's client).
fn main_container(pod: &Value) -> &Value {
    let cs = list(&pod["containers"]);
    assert_eq!(cs.len(), 1, "expected one container, got {}", cs.len());
    cs[0]
}

/// `command` + `args`, as the kubelet runs them.
fn argv(c: &Value) -> Vec<String> {
    list(&c["command"]).into_iter().chain(list(&c["args"])).map(|a| s(a).to_string()).collect()
}

fn env<'a>(c: &'a Value, name: &str) -> Option<&'a str> {
    list(&c["env"]).into_iter().find(|e| e["name"] == name).map(|e| s(&e["value"]))
}

/// The value of `--flag=V` or `--flag V`.
fn flag_value(argv: &[String], flag: &str) -> Option<String> {
    let eq = format!("{flag}=");
    argv.iter().enumerate().find_map(|(i, a)| {
        if let Some(v) = a.strip_prefix(&eq) {
            Some(v.to_string())
        } else if a == flag {
            argv.get(i + 1).cloned()
        } else {
            None
        }
    })
}

/// A container's setting from its own securityContext, else the pod's.
fn security<'a>(pod: &'a Value, c: &'a Value, key: &str) -> &'a Value {
    let own = &c["securityContext"][key];
    if own.is_null() {
        &pod["securityContext"][key]
    } else {
        own
    }
}

struct Mount<'a> {
    path: String,
    read_only: bool,
    volume: &'a Value,
}

fn mounts<'a>(pod: &'a Value, c: &'a Value) -> Vec<Mount<'a>> {
    list(&c["volumeMounts"])
        .into_iter()
        .map(|m| {
            let name = s(&m["name"]);
            let volume = list(&pod["volumes"])
                .into_iter()
                .find(|v| v["name"] == name)
                .unwrap_or_else(|| panic!("volumeMount {name} has no volume"));
            Mount { path: s(&m["mountPath"]).to_string(), read_only: m["readOnly"] == true, volume }
        })
        .collect()
}

/// The mount a path lies in (the longest mount path that holds it).
fn mount_of<'a>(pod: &'a Value, c: &'a Value, path: &str) -> Option<Mount<'a>> {
    mounts(pod, c)
        .into_iter()
        .filter(|m| path == m.path || path.starts_with(&format!("{}/", m.path.trim_end_matches('/'))))
        .max_by_key(|m| m.path.len())
}

/// Where `path` (inside the container) is on the node, through a hostPath
/// volume; with the mount, for its other settings.
fn on_host<'a>(pod: &'a Value, c: &'a Value, path: &str) -> (String, Mount<'a>) {
    let m = mount_of(pod, c, path).unwrap_or_else(|| panic!("{path} is in no volume of the container"));
    let host = m.volume["hostPath"]["path"]
        .as_str()
        .unwrap_or_else(|| panic!("{path} is in volume {}, which is not a hostPath", m.volume["name"]));
    let rest = &path[m.path.len()..];
    (format!("{}{rest}", host.trim_end_matches('/')), m)
}

/// A Kubernetes quantity in bytes (`14Gi`, `512Mi`, `2G`, `1000`).
fn quantity_bytes(q: &Value) -> u64 {
    let text = match q {
        Value::Number(n) => return n.as_u64().expect("a whole number of bytes"),
        other => s(other),
    };
    let units: [(&str, u64); 12] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("Pi", 1 << 50),
        ("Ei", 1 << 60),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
        ("P", 1_000_000_000_000_000),
        ("E", 1_000_000_000_000_000_000),
    ];
    for (suffix, mult) in units {
        if let Some(n) = text.strip_suffix(suffix) {
            return n.parse::<u64>().unwrap_or_else(|_| panic!("quantity {text}")) * mult;
        }
    }
    text.parse().unwrap_or_else(|_| panic!("quantity {text}: not a whole number of bytes"))
}

// ---------------------------------------------------------------------------
// What the binaries accept

/// The workspace binary a command line runs (`mora-cache`, or a path to it).
fn mora_binary(program: &str) -> Option<&str> {
    Path::new(program).file_name()?.to_str().filter(|n| *n == "mora-cache" || *n == "mora-exec")
}

/// Whether `name ARGS... --help` exits 0: clap parses (and converts) every
/// argument before the `--help` at the end, so an unknown flag or a bad value
/// fails, and nothing runs. Returns stderr's first line on failure.
fn cli_accepts(name: &str, args: &[String]) -> Result<(), String> {
    // After `--`, `--help` would be an argument like any other.
    if args.iter().any(|a| a == "--") {
        return Err("`--` in the arguments: this check cannot see past it".into());
    }
    let name = mora_binary(name).unwrap_or_else(|| panic!("{name} is not a workspace binary"));
    let out = Command::new(bin(name)).args(args).arg("--help").output().expect("run the binary");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).lines().next().unwrap_or("").to_string())
    }
}

/// Every command line a manifest runs with `mora-cache` or `mora-exec`: the
/// containers' and their exec probes'.
fn mora_command_lines(m: &Manifests) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for (file, obj) in &m.objects {
        let p = &obj["spec"]["template"]["spec"];
        for c in list(&p["initContainers"]).into_iter().chain(list(&p["containers"])) {
            let at = format!("{file}: {}/{}", obj["metadata"]["name"].as_str().unwrap_or("?"), s(&c["name"]));
            let mut lines = vec![(at.clone(), argv(c))];
            for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
                let cmd = &c[probe]["exec"]["command"];
                if !cmd.is_null() {
                    lines.push((format!("{at} {probe}"), list(cmd).into_iter().map(|a| s(a).to_string()).collect()));
                }
            }
            out.extend(lines.into_iter().filter(|(_, a)| a.first().is_some_and(|b| mora_binary(b).is_some())));
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The tests

#[test]
fn quantities_and_flags_read_as_kubernetes_and_clap_do() {
    assert_eq!(quantity_bytes(&Value::from("14Gi")), 14 << 30);
    assert_eq!(quantity_bytes(&Value::from("512Mi")), 512 << 20);
    assert_eq!(quantity_bytes(&Value::from("2G")), 2_000_000_000);
    assert_eq!(quantity_bytes(&Value::from(1024)), 1024);
    let a: Vec<String> = ["serve", "--max-memory=8GiB", "--keep-alive", "30m"].map(String::from).to_vec();
    assert_eq!(flag_value(&a, "--max-memory").as_deref(), Some("8GiB"));
    assert_eq!(flag_value(&a, "--keep-alive").as_deref(), Some("30m"));
    assert_eq!(flag_value(&a, "--metrics"), None);
    // The flag check below can fail: an unknown flag and a bad value are refused.
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert!(cli_accepts("mora-cache", &args(&["serve", "--max-memory=8GiB"])).is_ok());
    assert!(cli_accepts("mora-cache", &args(&["serve", "--no-such-flag"])).is_err());
    assert!(cli_accepts("mora-cache", &args(&["serve", "--max-memory=lots"])).is_err());
    assert!(cli_accepts("mora-exec", &args(&["run", "wf.toml", "--no-autostart"])).is_ok());
    assert!(cli_accepts("mora-exec", &args(&["run", "wf.toml", "--no-autostarts"])).is_err());
}

#[test]
fn every_manifest_parses_with_its_kind_version_and_namespace() {
    let m = manifests();
    let found: BTreeSet<(String, String, String)> = m
        .objects
        .iter()
        .map(|(_, v)| (s(&v["kind"]).to_string(), s(&v["metadata"]["name"]).to_string(), s(&v["apiVersion"]).to_string()))
        .collect();
    let expected: BTreeSet<(String, String, String)> = [
        ("Namespace", "mora", "v1"),
        ("DaemonSet", "mora-cache", "apps/v1"),
        ("DaemonSet", "mora-cache-gpu", "apps/v1"),
        ("ConfigMap", "mora-workflows", "v1"),
        ("Job", "mora-embed", "batch/v1"),
        ("Job", "mora-embed-gpu", "batch/v1"),
    ]
    .iter()
    .map(|(k, n, a)| (k.to_string(), n.to_string(), a.to_string()))
    .collect();
    assert_eq!(found, expected, "the objects of deploy/k8s");

    let ns = m.get("Namespace", "mora");
    for (file, v) in &m.objects {
        if v["kind"] != "Namespace" {
            assert_eq!(v["metadata"]["namespace"], ns["metadata"]["name"], "{file}: {} is outside the namespace", v["metadata"]["name"]);
        }
        // Kubernetes takes strings only for these; YAML makes `true` or `9477` something else.
        for meta in [&v["metadata"], &v["spec"]["template"]["metadata"]] {
            for field in ["labels", "annotations"] {
                for (k, val) in meta[field].as_object().into_iter().flatten() {
                    assert!(val.is_string(), "{file}: {field} {k} = {val} is not a string");
                }
            }
        }
        let p = &v["spec"]["template"]["spec"];
        for c in list(&p["initContainers"]).into_iter().chain(list(&p["containers"])) {
            for e in list(&c["env"]) {
                let from = e["value"].is_null() && e["valueFrom"].is_object();
                assert!(e["value"].is_string() || from, "{file}: env {} = {} is not a string", e["name"], e["value"]);
            }
            for port in list(&c["ports"]) {
                assert!(port["containerPort"].is_u64(), "{file}: containerPort {} is not a number", port["containerPort"]);
            }
        }
    }
    // hostPath volumes (and host namespaces) are beyond the baseline Pod Security level.
    assert_eq!(ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "privileged");

    // Each DaemonSet's selector picks its own pods and not the other's.
    let ds: Vec<&Value> = m.of_kind("DaemonSet");
    for a in &ds {
        let selector = a["spec"]["selector"]["matchLabels"].as_object().expect("matchLabels");
        for b in &ds {
            let labels = &b["spec"]["template"]["metadata"]["labels"];
            let matches = selector.iter().all(|(k, v)| &labels[k] == v);
            assert_eq!(
                matches,
                a["metadata"]["name"] == b["metadata"]["name"],
                "the selector of {} {} the pods of {}",
                a["metadata"]["name"],
                if matches { "matches" } else { "does not match" },
                b["metadata"]["name"]
            );
        }
    }
}

#[test]
fn daemons_and_clients_share_the_socket_directory() {
    let m = manifests();
    for ds_name in DAEMONSETS {
        let ds = pod(m.get("DaemonSet", ds_name));
        let daemon = main_container(ds);
        let d_argv = argv(daemon);
        assert_eq!(flag_value(&d_argv, "--socket"), None, "{ds_name}: the socket is MORA_SOCKET's, also for the probes");
        let d_sock = env(daemon, "MORA_SOCKET").unwrap_or_else(|| panic!("{ds_name}: no MORA_SOCKET"));
        let (d_host, d_mount) = on_host(ds, daemon, d_sock);
        // The daemon checks (and the init container prepares) the socket's own directory.
        assert_eq!(
            Path::new(d_sock).parent().unwrap(),
            Path::new(&d_mount.path),
            "{ds_name}: MORA_SOCKET {d_sock} must sit directly in the mounted directory {}",
            d_mount.path
        );
        assert!(!d_mount.read_only, "{ds_name}: the daemon binds its socket there");
        assert_eq!(d_mount.volume["hostPath"]["type"], "DirectoryOrCreate", "{ds_name}: the daemon's pod creates the directory");

        // The init container makes that directory the daemon's, private.
        let uid = security(ds, daemon, "runAsUser").as_u64().expect("runAsUser");
        let gid = security(ds, daemon, "runAsGroup").as_u64().expect("runAsGroup");
        let init = list(&ds["initContainers"])
            .into_iter()
            .find(|c| mounts(ds, c).iter().any(|im| im.volume["name"] == d_mount.volume["name"]))
            .unwrap_or_else(|| panic!("{ds_name}: no init container prepares the socket directory"));
        let init_path = mounts(ds, init).into_iter().find(|im| im.volume["name"] == d_mount.volume["name"]).unwrap().path;
        let script = argv(init).join(" ");
        assert!(script.contains(&format!("chown {uid}:{gid} {init_path}")), "{ds_name}: the init container must chown {init_path} to {uid}:{gid}: {script}");
        assert!(script.contains(&format!("chmod 0700 {init_path}")), "{ds_name}: the init container must chmod 0700 {init_path}: {script}");
        assert_eq!(security(ds, init, "runAsUser"), 0, "{ds_name}: only root may chown");
        let caps: Vec<&Value> = list(&init["securityContext"]["capabilities"]["add"]);
        assert!(caps.contains(&&Value::from("CHOWN")) && caps.contains(&&Value::from("FOWNER")), "{ds_name}: chown and chmod need CHOWN, FOWNER");

        for job_name in JOBS {
            let jp = pod(m.get("Job", job_name));
            let client = main_container(jp);
            let j_argv = argv(client);
            let j_sock = flag_value(&j_argv, "--socket")
                .or_else(|| env(client, "MORA_SOCKET").map(str::to_string))
                .unwrap_or_else(|| panic!("{job_name}: neither --socket nor MORA_SOCKET"));
            let (j_host, j_mount) = on_host(jp, client, &j_sock);
            assert_eq!(j_host, d_host, "{job_name} connects to {j_sock} = {j_host} on the node; {ds_name} serves {d_host}");
            assert!(j_mount.read_only, "{job_name}: the client only connects; mount the socket directory read-only");
            assert_eq!(j_mount.volume["hostPath"]["type"], "Directory", "{job_name}: the daemon's pod creates the directory, not the client's");
            assert!(j_argv.iter().any(|a| a == "--no-autostart"), "{job_name}: a client must never start a daemon in its own pod");
        }
    }
}

#[test]
fn daemons_and_clients_run_as_the_same_non_root_uid() {
    let m = manifests();
    let mut ids = BTreeMap::new();
    for (kind, name) in DAEMONSETS.map(|n| ("DaemonSet", n)).into_iter().chain(JOBS.map(|n| ("Job", n))) {
        let p = pod(m.get(kind, name));
        let c = main_container(p);
        let uid = security(p, c, "runAsUser").as_u64().unwrap_or_else(|| panic!("{name}: no runAsUser"));
        let gid = security(p, c, "runAsGroup").as_u64().unwrap_or_else(|| panic!("{name}: no runAsGroup"));
        assert_ne!(uid, 0, "{name} runs as root");
        assert_eq!(security(p, c, "runAsNonRoot"), true, "{name}: runAsNonRoot");
        // In a user namespace the daemon would see its peers' uids mapped.
        assert_ne!(p["hostUsers"], false, "{name}: SO_PEERCRED compares uids of the node's user namespace");
        ids.insert(name, (uid, gid));
    }
    let first = *ids.values().next().unwrap();
    assert!(ids.values().all(|id| *id == first), "every daemon and client must share one uid and group: {ids:?}");
    // The image's own user is the same, for `docker run` and for pods that set none.
    let dockerfile = std::fs::read_to_string(k8s_dir().join("Dockerfile")).expect("deploy/k8s/Dockerfile");
    let users: Vec<&str> = dockerfile.lines().filter_map(|l| l.strip_prefix("USER ")).collect();
    assert!(!users.is_empty(), "the Dockerfile sets no USER");
    for u in users {
        assert_eq!(u.trim(), format!("{}:{}", first.0, first.1), "Dockerfile USER");
    }
}

#[test]
fn daemons_and_clients_see_the_hub_cache_at_the_same_path() {
    let m = manifests();
    let mut seen = BTreeMap::new();
    for (kind, name) in DAEMONSETS.map(|n| ("DaemonSet", n)).into_iter().chain(JOBS.map(|n| ("Job", n))) {
        let p = pod(m.get(kind, name));
        let c = main_container(p);
        let hub = env(c, "HF_HUB_CACHE").unwrap_or_else(|| panic!("{name}: no HF_HUB_CACHE"));
        let (host, mount) = on_host(p, c, hub);
        assert!(mount.read_only, "{name}: the hub cache is only read; mount it read-only");
        seen.insert(name, (hub.to_string(), host));
    }
    // The client sends the path it sees and the daemon opens it in its own
    // container: the same path, the same node directory, in every pod.
    let first = seen.values().next().unwrap().clone();
    assert!(seen.values().all(|v| *v == first), "HF_HUB_CACHE and the node directory under it differ: {seen:?}");
}

#[test]
fn metrics_port_agrees_with_the_flag_and_the_scrape_annotations() {
    let m = manifests();
    for name in DAEMONSETS {
        let ds = m.get("DaemonSet", name);
        let daemon = main_container(pod(ds));
        let addr: SocketAddr = flag_value(&argv(daemon), "--metrics")
            .unwrap_or_else(|| panic!("{name}: no --metrics"))
            .parse()
            .unwrap_or_else(|e| panic!("{name}: --metrics is not IP:PORT: {e}"));
        assert!(!addr.ip().is_loopback(), "{name}: --metrics {addr} is unreachable from Prometheus");
        let ports = list(&daemon["ports"]);
        let port = ports
            .iter()
            .find(|p| p["name"] == "metrics")
            .unwrap_or_else(|| panic!("{name}: no containerPort named metrics"));
        assert_eq!(port["containerPort"], addr.port(), "{name}: containerPort metrics vs --metrics");
        let a = &ds["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(a["prometheus.io/scrape"], "true", "{name}");
        assert_eq!(a["prometheus.io/port"], addr.port().to_string(), "{name}: prometheus.io/port vs --metrics");
        assert_eq!(a["prometheus.io/path"], "/metrics", "{name}");
    }
}

#[test]
fn max_memory_leaves_headroom_under_the_memory_limit() {
    let m = manifests();
    for name in DAEMONSETS {
        let daemon = main_container(pod(m.get("DaemonSet", name)));
        let max = flag_value(&argv(daemon), "--max-memory")
            .unwrap_or_else(|| panic!("{name}: no --max-memory (the default reads the node's memory, not the container's)"));
        let max = parse_size(&max).unwrap_or_else(|e| panic!("{name}: --max-memory: {e}"));
        let limit = quantity_bytes(&daemon["resources"]["limits"]["memory"]);
        let request = quantity_bytes(&daemon["resources"]["requests"]["memory"]);
        assert_eq!(request, limit, "{name}: request the memory the segments will hold");
        // The segments are charged to the daemon; its own heap, the page cache
        // of the files it reads and the probes need room above them.
        let headroom = (1u64 << 30).max(limit / 10);
        assert!(
            max + headroom <= limit,
            "{name}: --max-memory {max} B + headroom {headroom} B exceeds the memory limit {limit} B"
        );
    }
}

#[test]
fn grace_period_and_rollout_fit_the_daemon() {
    let m = manifests();
    let drain = mora_cache::server::DRAIN_TIMEOUT.as_secs();
    for name in DAEMONSETS {
        let ds = m.get("DaemonSet", name);
        let grace = pod(ds)["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
        assert!(grace > drain, "{name}: terminationGracePeriodSeconds {grace} leaves no time after the {drain} s drain");
        // Two daemons of one node would claim the same socket.
        let surge = &ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"];
        assert!(*surge == 0 || *surge == "0" || *surge == "0%", "{name}: maxSurge must be 0, is {surge}");
    }
}

#[test]
fn the_gpu_variant_shares_pid_ipc_and_gpus_with_its_clients() {
    let m = manifests();
    let (gpu_ds, gpu_job) = (pod(m.get("DaemonSet", GPU_PAIR.0)), pod(m.get("Job", GPU_PAIR.1)));
    for (name, p) in [(GPU_PAIR.0, gpu_ds), (GPU_PAIR.1, gpu_job)] {
        // Legacy CUDA IPC handles open only in the exporter's PID namespace.
        assert_eq!(p["hostPID"], true, "{name}: hostPID");
        assert_eq!(p["hostIPC"], true, "{name}: hostIPC");
        assert_eq!(env(main_container(p), "NVIDIA_VISIBLE_DEVICES"), Some("all"), "{name}: every GPU, in daemon and client");
        for c in list(&p["containers"]) {
            for part in ["requests", "limits"] {
                assert!(
                    c["resources"][part]["nvidia.com/gpu"].is_null(),
                    "{name}: an nvidia.com/gpu {part} gives the GPU to this pod alone"
                );
            }
        }
        assert_eq!(p["nodeSelector"]["nvidia.com/gpu.present"], "true", "{name}: GPU nodes only");
    }
    assert!(gpu_ds["runtimeClassName"].is_string(), "{}: runtimeClassName", GPU_PAIR.0);
    assert_eq!(gpu_ds["runtimeClassName"], gpu_job["runtimeClassName"], "daemon and client on the same runtime class");

    // The CPU daemon keeps off the GPU daemon's nodes, and needs no host namespaces.
    let (cpu_ds, cpu_job) = (pod(m.get("DaemonSet", CPU_PAIR.0)), pod(m.get("Job", CPU_PAIR.1)));
    let terms = list(&cpu_ds["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]);
    assert!(!terms.is_empty(), "{}: no required node affinity", CPU_PAIR.0);
    for term in terms {
        let excluded = list(&term["matchExpressions"]).into_iter().any(|e| {
            e["key"] == "nvidia.com/gpu.present" && e["operator"] == "NotIn" && list(&e["values"]).contains(&&Value::from("true"))
        });
        assert!(excluded, "{}: every node selector term must exclude nvidia.com/gpu.present=true", CPU_PAIR.0);
    }
    for (name, p) in [(CPU_PAIR.0, cpu_ds), (CPU_PAIR.1, cpu_job)] {
        assert_ne!(p["hostPID"], true, "{name}: the CPU path needs no host PID namespace");
        assert_ne!(p["hostIPC"], true, "{name}: the CPU path needs no host IPC namespace");
    }

    // Daemon and client of one build: the protocol versions match.
    for (d, j) in [(cpu_ds, cpu_job), (gpu_ds, gpu_job)] {
        let image = &main_container(d)["image"];
        assert_eq!(&main_container(j)["image"], image, "daemon and client images");
        for c in list(&d["initContainers"]) {
            assert_eq!(&c["image"], image, "init container image");
        }
    }
}

/// Every command line in the manifests (daemons, probes, Jobs) parses with
/// the real binaries' own argument parser.
#[test]
fn every_flag_the_manifests_pass_exists() {
    let m = manifests();
    let lines = mora_command_lines(&m);
    assert!(lines.len() >= 8, "expected the daemons, their probes and the Jobs, found {}", lines.len());
    let bad: Vec<String> = lines
        .iter()
        .filter_map(|(at, a)| cli_accepts(&a[0], &a[1..]).err().map(|e| format!("{at}: `{}`: {e}", a.join(" "))))
        .collect();
    assert!(bad.is_empty(), "command lines the binaries refuse:\n{}", bad.join("\n"));
}

// ---------------------------------------------------------------------------
// A node on this machine

/// A pod's container as it would run here: each volume mapped to a local
/// directory (hostPath volumes through `node`), and every path in its
/// command line and environment mapped with it.
struct Local {
    /// (mount path, local directory), longest mount path first.
    dirs: Vec<(String, PathBuf)>,
    /// The container's command line as the manifest has it.
    argv: Vec<String>,
    /// Its environment, mapped.
    env: Vec<(String, String)>,
}

impl Local {
    fn new(m: &Manifests, name: &str, node: &BTreeMap<String, PathBuf>, scratch: &Path) -> Local {
        let obj = m.objects.iter().map(|(_, v)| v).find(|v| v["metadata"]["name"] == name && v["spec"]["template"].is_object());
        let p = pod(obj.unwrap_or_else(|| panic!("no workload {name}")));
        let c = main_container(p);
        let mut dirs = Vec::new();
        for mount in mounts(p, c) {
            let v = mount.volume;
            let dir = if let Some(host) = v["hostPath"]["path"].as_str() {
                node.get(host).unwrap_or_else(|| panic!("no local directory for the node's {host}")).clone()
            } else if let Some(cm) = v["configMap"]["name"].as_str() {
                let dir = scratch.join(format!("configmap-{cm}"));
                std::fs::create_dir_all(&dir).unwrap();
                for (key, text) in m.get("ConfigMap", cm)["data"].as_object().expect("ConfigMap data") {
                    std::fs::write(dir.join(key), s(text)).unwrap();
                }
                dir
            } else if v["emptyDir"].is_object() {
                let dir = scratch.join(format!("{name}-{}", s(&v["name"])));
                std::fs::create_dir_all(&dir).unwrap();
                dir
            } else {
                panic!("volume {} of a kind this test does not map", v["name"])
            };
            dirs.push((mount.path, dir));
        }
        dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        let mut local = Local { dirs, argv: argv(c), env: Vec::new() };
        local.env = list(&c["env"]).into_iter().map(|e| (s(&e["name"]).to_string(), local.map(s(&e["value"])))).collect();
        local
    }

    fn map(&self, text: &str) -> String {
        for (path, dir) in &self.dirs {
            if text == path {
                return dir.display().to_string();
            }
            if let Some(rest) = text.strip_prefix(&format!("{path}/")) {
                return dir.join(rest).display().to_string();
            }
        }
        text.to_string()
    }

    fn env(&self, name: &str) -> &str {
        self.env.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str()).unwrap_or_else(|| panic!("no {name}"))
    }

    /// `argv`, its paths mapped, with this container's environment (and
    /// none of ours that Mora reads).
    fn command(&self, argv: &[String]) -> Command {
        let mut c = Command::new(bin(mora_binary(&argv[0]).expect("a workspace binary")));
        c.args(argv[1..].iter().map(|a| self.map(a)));
        for var in ["MORA_SOCKET", "HF_HUB_CACHE", "HF_HOME", "XDG_RUNTIME_DIR", "MORA_LOG", "MORA_LOG_FORMAT"] {
            c.env_remove(var);
        }
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Stops whatever daemon serves a socket when dropped: one a client started
/// against the rules is not our child.
struct StopAtEnd(PathBuf);

impl Drop for StopAtEnd {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ = Command::new(bin("mora-cache")).args(["stop", "--socket"]).arg(&self.0).output();
        }
    }
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn on_a_node_the_probe_and_the_example_jobs_work_only_with_the_daemon() {
    let m = manifests();
    let scratch = Scratch::new("k8s-node");
    // The node's directories that the manifests mount: the socket directory
    // (private, as the init container leaves it) and the hub cache.
    let cpu_ds = pod(m.get("DaemonSet", CPU_PAIR.0));
    let daemon_c = main_container(cpu_ds);
    let (sock_host, _) = on_host(cpu_ds, daemon_c, env(daemon_c, "MORA_SOCKET").unwrap());
    let (hub_host, _) = on_host(cpu_ds, daemon_c, env(daemon_c, "HF_HUB_CACHE").unwrap());
    let run_dir = scratch.join("node-run-mora");
    std::fs::create_dir_all(&run_dir).unwrap();
    std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let sock_dir_host = Path::new(&sock_host).parent().unwrap().display().to_string();
    let node: BTreeMap<String, PathBuf> = [(sock_dir_host, run_dir.clone()), (hub_host, test_hub())].into_iter().collect();

    let jobs: Vec<(&str, Local)> = JOBS.iter().map(|j| (*j, Local::new(&m, j, &node, &scratch.path))).collect();
    let daemons: Vec<(&str, Local)> = DAEMONSETS.iter().map(|d| (*d, Local::new(&m, d, &node, &scratch.path))).collect();
    let probes = |name: &str| -> Vec<Vec<String>> {
        let c = main_container(pod(m.get("DaemonSet", name)));
        ["livenessProbe", "readinessProbe"]
            .iter()
            .map(|p| list(&c[*p]["exec"]["command"]).into_iter().map(|a| s(a).to_string()).collect::<Vec<_>>())
            .inspect(|cmd| assert!(!cmd.is_empty(), "{name}: a probe that is not an exec of a command"))
            .collect()
    };
    let probes_pass = |want: bool| {
        for (name, local) in &daemons {
            for probe in probes(name) {
                let out = local.command(&probe).output().unwrap();
                assert_eq!(
                    out.status.success(),
                    want,
                    "{name}: probe `{}` {} with{} a daemon serving: {}",
                    probe.join(" "),
                    if want { "failed" } else { "passed" },
                    if want { "" } else { "out" },
                    text(&out)
                );
            }
        }
    };

    let socket = PathBuf::from(daemons[0].1.env("MORA_SOCKET"));
    assert_eq!(socket.parent(), Some(run_dir.as_path()));
    let _stop = StopAtEnd(socket.clone());

    // No daemon yet: the probes fail, and a Job fails at once without starting one.
    probes_pass(false);
    for (name, local) in &jobs {
        let out = local.command(&local.argv).output().unwrap();
        assert!(!out.status.success(), "{name} ran with no daemon: {}", text(&out));
        assert!(text(&out).contains("no cache daemon is listening"), "{name}: {}", text(&out));
    }
    assert!(!socket.exists(), "a Job started a daemon of its own");

    // The daemon, bound where its MORA_SOCKET says (its manifest flags are
    // checked above; here no metrics port, so tests running at once never
    // compete for it).
    let local = &daemons[0].1;
    let log = std::fs::File::create(scratch.join("daemon.log")).unwrap();
    let daemon = Daemon(
        local
            .command(&["mora-cache".into(), "serve".into(), "--max-memory=1GiB".into()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let log = || std::fs::read_to_string(scratch.join("daemon.log")).unwrap_or_default();
    assert!(wait_until(Duration::from_secs(20), || socket.exists()), "the daemon did not bind {}: {}", socket.display(), log());
    probes_pass(true);

    // Each Job runs its workflow (from its ConfigMap) on the daemon's weights.
    for (name, local) in &jobs {
        let out = local.command(&local.argv).output().unwrap();
        assert!(out.status.success(), "{name} failed: {}\ndaemon: {}", text(&out), log());
        let outputs = PathBuf::from(local.map(&flag_value(&local.argv, "-o").expect("-o DIR")));
        let written = std::fs::read(outputs.join("embeddings.json")).unwrap_or_else(|e| panic!("{name}: no output: {e}"));
        let v: Value = serde_json::from_slice(&written).expect("output is JSON");
        assert_eq!(v["embeddings"].as_array().map(Vec::len), Some(2), "{name}: {v}");
    }
    let ps = daemons[0].1.command(&["mora-cache".into(), "ps".into(), "--json".into()]).output().unwrap();
    let resident: Value = serde_json::from_slice(&ps.stdout).expect("ps --json");
    let model = &resident.as_array().expect("a list")[0];
    assert_eq!(model["name"], "sentence-transformers/all-MiniLM-L6-v2");
    assert_eq!(model["loads"], 1, "loaded once for both Jobs: {resident}");

    // Gone, the daemon fails its probes again.
    drop(daemon);
    probes_pass(false);
}
