//! A RabbitMQ node of the tests' own, for fault tests (closed connections,
//! stopped app, memory alarm, a frozen VM) and TLS, so that nothing a test does
//! touches the shared broker on 127.0.0.1:5672.
//!
//! [`RabbitNode::start`] runs `/usr/lib/rabbitmq/bin/rabbitmq-server` (the
//! package's scripts without the `/usr/sbin` wrappers, which switch to the
//! `rabbitmq` user and its cookie) as a child process with
//!
//! - its own node name `tcx-<test pid>-<n>@localhost`, free loopback ports
//!   (AMQP, AMQPS, Erlang distribution) and directory under
//!   `$TMPDIR/tcx-rabbit-nodes/` (data, logs, config, certificates, and the
//!   `HOME` holding the Erlang cookie that the node and its `rabbitmqctl` share);
//! - its own `rabbitmq-env.conf`, `rabbitmq.conf`, `advanced.config` and
//!   `enabled_plugins` (none), so the Debian files in `/etc/rabbitmq` (node
//!   name `rabbit@localhost`, listener on 5672, plugins) are never read;
//! - a throwaway CA and a server certificate for `localhost` and `127.0.0.1`,
//!   made with `rcgen`; `amqps://` listens on 127.0.0.1 and, on the same port,
//!   on 127.0.0.2, an address the certificate does not name.
//!
//! The node is stopped (`rabbitmqctl stop`, then SIGTERM / SIGKILL of its own
//! processes by pid) and its directory removed by [`RabbitNode::stop`] or on
//! drop, so also when a test panics. A run killed before that leaves a
//! directory whose owner pid is gone: the next [`RabbitNode::start`] stops that
//! node (only if the recorded pid still runs the VM of that directory) and
//! removes the directory.
//!
//! Starting a node takes 20–35 s and ~130 MiB, so each test binary starts one
//! and runs its cases against it in sequence (see `rabbit_node.rs`).
//! [`cluster::RabbitCluster`] starts several such nodes at once as one
//! cluster (see `cluster.rs`).
//!
//! Missing prerequisites (the rabbitmq-server package, a second loopback
//! address) fail loudly with a message naming them; nothing is skipped.
#![allow(dead_code)]

pub mod cases;
pub mod cluster;

use std::fmt::Write as _;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The server start script of the Debian package (not the `/usr/sbin` wrapper).
pub const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
/// The CLI of the Debian package (not the `/usr/sbin` wrapper).
pub const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";
/// How long a node may take to boot (measured: 18–35 s on 2 cores).
pub const START_TIMEOUT: Duration = Duration::from_secs(90);
/// How long one `rabbitmqctl` command may take.
pub const CTL_TIMEOUT: Duration = Duration::from_secs(60);
/// A loopback address the server certificate does not name: its `amqps://`
/// listener shows a host name mismatch.
pub const UNNAMED_LOOPBACK: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// The memory high watermark the node starts with (RabbitMQ's default).
pub const DEFAULT_WATERMARK: &str = "0.4";

/// A running RabbitMQ node owned by this test process.
pub struct RabbitNode {
    name: String,
    dir: PathBuf,
    amqp_port: u16,
    amqps_port: u16,
    dist_port: u16,
    ca_pem: String,
    child: Option<Child>,
    /// The OS pid of the node's Erlang VM, once known.
    os_pid: Option<u32>,
    /// Whether the VM was left stopped by [`sigstop`](Self::sigstop).
    frozen: AtomicBool,
    /// How long [`start`](Self::start) took.
    pub startup: Duration,
}

impl RabbitNode {
    /// Starts a fresh node and waits (up to [`START_TIMEOUT`]) until it accepts
    /// AMQP connections. Panics with the cause (and the node's log) if it cannot.
    pub fn start() -> RabbitNode {
        let began = Instant::now();
        check_prerequisites();
        reap_stale_nodes();
        let mut node = RabbitNode::prepare();
        node.launch(&[]);
        node.await_started(began);
        node
    }

    /// Makes the node's directory, ports and certificates; starts nothing.
    fn prepare() -> RabbitNode {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let short = format!(
            "tcx-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let dir = nodes_base().join(&short);
        let _ = fs::remove_dir_all(&dir);
        for sub in ["home", "mnesia", "log", "tls"] {
            fs::create_dir_all(dir.join(sub))
                .unwrap_or_else(|error| panic!("creating {}: {error}", dir.join(sub).display()));
        }
        write(&dir.join("owner"), &std::process::id().to_string());
        let (amqp_port, amqps_port, dist_port) = free_ports();
        let ca_pem = write_certificates(&dir.join("tls"));
        RabbitNode {
            name: format!("{short}@localhost"),
            dir,
            amqp_port,
            amqps_port,
            dist_port,
            ca_pem,
            child: None,
            os_pid: None,
            frozen: AtomicBool::new(false),
            startup: Duration::ZERO,
        }
    }

    /// Writes the node's configuration (with `peers`, the node names of a
    /// cluster it forms at boot, if any) and runs the server script.
    fn launch(&mut self, peers: &[String]) {
        self.write_config(peers);
        // From here on, Drop cleans up whatever has been started.
        let log = fs::File::create(self.dir.join("server-output.log")).expect("server log file");
        let child = self
            .command(SERVER)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("server log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|error| panic!("cannot run {SERVER}: {error}"));
        self.child = Some(child);
    }

    /// Waits until the launched node accepts AMQP and has booted; records
    /// its VM's pid and the start time (from `began`).
    fn await_started(&mut self, began: Instant) {
        self.wait_until_listening(began + START_TIMEOUT);
        self.rabbitmqctl(&["await_startup", "--timeout", "60"])
            .unwrap_or_else(|error| self.fail(&format!("await_startup failed: {error}")));
        let pid = self
            .rabbitmqctl(&["eval", "os:getpid()."])
            .unwrap_or_else(|error| self.fail(&format!("cannot read the VM's OS pid: {error}")));
        let pid = pid
            .trim()
            .trim_matches('"')
            .parse::<u32>()
            .unwrap_or_else(|error| self.fail(&format!("os:getpid() answered {pid:?}: {error}")));
        self.os_pid = Some(pid);
        write(&self.dir.join("beam.pid"), &pid.to_string());
        self.startup = began.elapsed();
    }

    /// The Erlang node name, `tcx-<pid>-<n>@localhost`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's directory (data, logs, config, certificates).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The OS pid of the node's Erlang VM.
    pub fn os_pid(&self) -> u32 {
        self.os_pid.expect("the node has started")
    }

    /// The plain AMQP port (on 127.0.0.1).
    pub fn amqp_port(&self) -> u16 {
        self.amqp_port
    }

    /// The AMQPS port (on 127.0.0.1 and [`UNNAMED_LOOPBACK`]).
    pub fn amqps_port(&self) -> u16 {
        self.amqps_port
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    /// `amqps://guest:guest@127.0.0.1:<port>/%2f`: a certificate for
    /// `127.0.0.1` signed by [`ca_pem`](Self::ca_pem).
    pub fn amqps_url(&self) -> String {
        format!("amqps://guest:guest@127.0.0.1:{}/%2f", self.amqps_port)
    }

    /// The same TLS listener reached through [`UNNAMED_LOOPBACK`], which the
    /// server certificate does not name.
    pub fn amqps_url_with_unnamed_host(&self) -> String {
        format!(
            "amqps://guest:guest@{UNNAMED_LOOPBACK}:{}/%2f",
            self.amqps_port
        )
    }

    /// The throwaway CA certificate (PEM) that signed the server certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The file holding [`ca_pem`](Self::ca_pem).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("tls").join("ca.pem")
    }

    /// Runs `rabbitmqctl -q -n <node> <args>` against this node (never the
    /// shared broker); its stdout, or an error with the exit status and output.
    pub fn rabbitmqctl(&self, args: &[&str]) -> Result<String, String> {
        static CALLS: AtomicU32 = AtomicU32::new(0);
        let output = self
            .dir
            .join(format!("ctl-{}", CALLS.fetch_add(1, Ordering::SeqCst)));
        let mut command = self.command(CTL);
        command.args(["-q", "-n", &self.name]).args(args);
        let began = Instant::now();
        let result = run(command, &output, CTL_TIMEOUT);
        // Shown with the output of a failing test: what the node was asked, and how long it took.
        eprintln!(
            "  rabbitmqctl {} ({:.1?}{})",
            args.join(" "),
            began.elapsed(),
            if result.is_ok() { "" } else { ", failed" }
        );
        result.map_err(|error| format!("rabbitmqctl {}: {error}", args.join(" ")))
    }

    /// Closes every client connection to the node (the clients see a
    /// server-initiated close, `CONNECTION_FORCED`).
    pub fn close_all_connections(&self) {
        self.ctl(&["close_all_connections", "closed by the test"]);
    }

    /// The names of the client connections the node has (`list_connections name`).
    pub fn connection_names(&self) -> Vec<String> {
        self.ctl(&["list_connections", "name"])
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// `rabbitmqctl list_connections <items>`, one line per connection, tab-separated.
    pub fn list_connections(&self, items: &[&str]) -> Vec<String> {
        let mut args = vec!["list_connections"];
        args.extend_from_slice(items);
        self.ctl(&args).lines().map(str::to_owned).collect()
    }

    /// The cluster members this node sees running (itself included); empty
    /// while it cannot tell (still booting, application stopped).
    pub fn running_members(&self) -> Vec<String> {
        self.rabbitmqctl(&["eval", "rabbit_nodes:all_running()."])
            .map(|listed| {
                // `['tcx-1-0@localhost','tcx-1-1@localhost']`: the quoted atoms.
                listed
                    .split('\'')
                    .skip(1)
                    .step_by(2)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Stops the RabbitMQ application; the VM keeps running and listeners close.
    pub fn stop_app(&self) {
        self.ctl(&["stop_app"]);
    }

    /// Starts the RabbitMQ application again and waits until AMQP listens.
    pub fn start_app(&self) {
        self.ctl(&["start_app"]);
        let deadline = Instant::now() + START_TIMEOUT;
        while !self.listening() {
            assert!(
                Instant::now() < deadline,
                "node {}: AMQP does not listen after start_app",
                self.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Raises (`true`) or clears (`false`) the memory alarm by moving the
    /// high watermark to almost nothing, or back to [`DEFAULT_WATERMARK`].
    /// While it is raised the node blocks publishing connections.
    pub fn set_memory_alarm(&self, raised: bool) {
        let watermark = if raised {
            "0.000001"
        } else {
            DEFAULT_WATERMARK
        };
        self.ctl(&["set_vm_memory_high_watermark", watermark]);
    }

    /// Whether the node reports a memory alarm.
    pub fn memory_alarm(&self) -> bool {
        self.ctl(&["eval", "rabbit_alarm:get_alarms()."])
            .contains("memory")
    }

    /// Freezes the node's VM (SIGSTOP): connections stay open but nothing
    /// answers, as with a hung server (missed heartbeats). Drop thaws it first.
    pub fn sigstop(&self) {
        self.signal("STOP", self.os_pid());
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// Thaws the VM frozen by [`sigstop`](Self::sigstop) (SIGCONT).
    pub fn sigcont(&self) {
        self.signal("CONT", self.os_pid());
        self.frozen.store(false, Ordering::SeqCst);
    }

    /// Stops the node and removes its directory; how long that took.
    /// Panics if the node had to be killed.
    pub fn stop(mut self) -> Duration {
        let began = Instant::now();
        let graceful = self.shut_down();
        assert!(graceful, "node {} did not stop gracefully", self.name);
        began.elapsed()
    }

    /// `rabbitmqctl`, panicking with its error.
    fn ctl(&self, args: &[&str]) -> String {
        self.rabbitmqctl(args)
            .unwrap_or_else(|error| panic!("node {}: {error}", self.name))
    }

    /// A command for one of the package's scripts with this node's environment
    /// only (nothing inherited but `PATH`).
    fn command(&self, program: &str) -> Command {
        let dir = &self.dir;
        let mut command = Command::new(program);
        command
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
            )
            .env("LANG", "C.UTF-8")
            .env("LC_ALL", "C.UTF-8")
            .env("HOME", dir.join("home"))
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_PID_FILE", dir.join("rabbitmq.pid"))
            .env("RABBITMQ_PLUGINS_EXPAND_DIR", dir.join("plugins-expand"))
            // Distribution and epmd on loopback only, as the system broker has them.
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .env(
                "RABBITMQ_CTL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            );
        command
    }

    fn write_config(&self, peers: &[String]) {
        let dir = &self.dir;
        let tls = dir.join("tls");
        write(
            &dir.join("rabbitmq-env.conf"),
            "# The test node's own (empty) env file: /etc/rabbitmq/rabbitmq-env.conf is not read.\n",
        );
        write(&dir.join("enabled_plugins"), "[].\n");
        write(&dir.join("advanced.config"), "[].\n");
        let mut config = String::new();
        let _ = writeln!(config, "listeners.tcp.1 = 127.0.0.1:{}", self.amqp_port);
        let _ = writeln!(config, "listeners.ssl.1 = 127.0.0.1:{}", self.amqps_port);
        let _ = writeln!(
            config,
            "listeners.ssl.2 = {UNNAMED_LOOPBACK}:{}",
            self.amqps_port
        );
        for (key, file) in [
            ("cacertfile", "ca.pem"),
            ("certfile", "server.pem"),
            ("keyfile", "server.key"),
        ] {
            let _ = writeln!(config, "ssl_options.{key} = {}", tls.join(file).display());
        }
        config.push_str(
            "ssl_options.verify = verify_none\n\
             ssl_options.fail_if_no_peer_cert = false\n\
             log.console = false\n\
             log.file.level = info\n",
        );
        if !peers.is_empty() {
            // Classic peer discovery: the nodes find each other at boot,
            // faster than `join_cluster` after it.
            config.push_str("cluster_formation.peer_discovery_backend = classic_config\n");
            for (index, peer) in peers.iter().enumerate() {
                let _ = writeln!(
                    config,
                    "cluster_formation.classic_config.nodes.{} = {peer}",
                    index + 1
                );
            }
        }
        write(&dir.join("rabbitmq.conf"), &config);
        // The cookie the node and its rabbitmqctl share; Erlang wants it private.
        let cookie = dir.join("home").join(".erlang.cookie");
        write(&cookie, &format!("TCXCOOKIE{}", std::process::id()));
        fs::set_permissions(&cookie, fs::Permissions::from_mode(0o400))
            .expect("cookie permissions");
    }

    /// Waits until the AMQP port accepts connections; panics (with the log)
    /// if the node exits or `deadline` passes.
    fn wait_until_listening(&mut self, deadline: Instant) {
        loop {
            if self.listening() {
                return;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.fail(&format!("the node exited during startup ({status})"));
            }
            if Instant::now() > deadline {
                self.fail(&format!(
                    "the node did not listen on 127.0.0.1:{} within {START_TIMEOUT:?}",
                    self.amqp_port
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Whether the AMQP port accepts TCP connections.
    pub fn listening(&self) -> bool {
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, self.amqp_port));
        TcpStream::connect_timeout(&address, Duration::from_millis(500)).is_ok()
    }

    /// Panics with `problem` and the end of the node's logs.
    fn fail(&self, problem: &str) -> ! {
        let mut logs = String::new();
        let mut files = vec![self.dir.join("server-output.log")];
        if let Ok(entries) = fs::read_dir(self.dir.join("log")) {
            files.extend(entries.flatten().map(|entry| entry.path()));
        }
        for file in files {
            if let Ok(text) = fs::read_to_string(&file) {
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                let _ = writeln!(logs, "--- {} (last lines)", file.display());
                for line in tail.into_iter().rev() {
                    let _ = writeln!(logs, "{line}");
                }
            }
        }
        panic!("RabbitMQ test node {}: {problem}\n{logs}", self.name);
    }

    fn signal(&self, signal: &str, pid: u32) {
        if let Err(error) = send_signal(signal, pid) {
            panic!("node {}: {error}", self.name);
        }
    }

    /// Stops the node (gracefully if it can), kills what is left of its own
    /// processes and removes its directory. Whether the stop was graceful.
    fn shut_down(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            let _ = fs::remove_dir_all(&self.dir);
            return true;
        };
        let beam = self
            .os_pid
            .or_else(|| read_pid(&self.dir.join("rabbitmq.pid")));
        if let Some(pid) = beam
            && self.frozen.swap(false, Ordering::SeqCst)
        {
            let _ = send_signal("CONT", pid);
        }
        let mut graceful = self.rabbitmqctl(&["stop"]).is_ok();
        if !graceful || !wait_for_exit(&mut child, Duration::from_secs(20)) {
            graceful = false;
            // The start script's trap stops the VM on SIGTERM; then force.
            let _ = send_signal("TERM", child.id());
            if !wait_for_exit(&mut child, Duration::from_secs(10)) {
                if let Some(pid) = beam.filter(|pid| runs_node(*pid, &self.dir)) {
                    let _ = send_signal("KILL", pid);
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if let Some(pid) = beam.filter(|pid| runs_node(*pid, &self.dir)) {
            let _ = send_signal("KILL", pid);
        }
        let _ = fs::remove_dir_all(&self.dir);
        graceful
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// Fails loudly, naming what is missing.
fn check_prerequisites() {
    for program in [SERVER, CTL] {
        let executable = fs::metadata(program)
            .map(|metadata| metadata.permissions().mode() & 0o111 != 0)
            .unwrap_or(false);
        assert!(
            executable,
            "prerequisite missing: {program} (install the Debian package rabbitmq-server; \
             the test starts a RabbitMQ node of its own)"
        );
    }
    let kill = Command::new("kill").arg("-l").output();
    assert!(
        kill.is_ok_and(|output| output.status.success()),
        "prerequisite missing: the `kill` program (package procps)"
    );
}

/// `$TMPDIR/tcx-rabbit-nodes`: one directory per node.
fn nodes_base() -> PathBuf {
    std::env::temp_dir().join("tcx-rabbit-nodes")
}

/// Stops the nodes of test processes that died without cleaning up, and
/// removes their directories. Only a pid that still runs the VM of that
/// directory's node is killed.
fn reap_stale_nodes() {
    let Ok(entries) = fs::read_dir(nodes_base()) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let owner = read_pid(&dir.join("owner"));
        if owner.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists()) {
            continue;
        }
        for file in ["beam.pid", "rabbitmq.pid"] {
            if let Some(pid) = read_pid(&dir.join(file))
                && runs_node(pid, &dir)
            {
                let _ = send_signal("CONT", pid);
                let _ = send_signal("KILL", pid);
            }
        }
        let _ = fs::remove_dir_all(&dir);
    }
}

/// `kill -<signal> <pid>`.
fn send_signal(signal: &str, pid: u32) -> Result<(), String> {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .map_err(|error| format!("cannot run `kill` (procps): {error}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("kill -{signal} {pid} failed: {status}"))
    }
}

fn read_pid(file: &Path) -> Option<u32> {
    fs::read_to_string(file).ok()?.trim().parse().ok()
}

/// Whether process `pid` is the Erlang VM of the node in `dir` (its command
/// line has `-home <dir>/home`; the node name is not on it).
fn runs_node(pid: u32, dir: &Path) -> bool {
    let home = dir.join("home");
    fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
        let arguments: Vec<&[u8]> = cmdline.split(|byte| *byte == 0).collect();
        arguments
            .iter()
            .any(|argument| argument.ends_with(b"beam.smp"))
            && arguments
                .windows(2)
                .any(|pair| pair[0] == b"-home" && pair[1] == home.as_os_str().as_encoded_bytes())
    })
}

fn wait_for_exit(child: &mut Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `command` with a time limit; its stdout, or an error with status and
/// output. Output goes to `<output>.out` / `<output>.err` (removed after), not
/// pipes, so a process the command leaves behind cannot hold it up.
fn run(mut command: Command, output: &Path, limit: Duration) -> Result<String, String> {
    let out_file = output.with_extension("out");
    let err_file = output.with_extension("err");
    let create = |file: &Path| {
        fs::File::create(file).map_err(|error| format!("creating {}: {error}", file.display()))
    };
    let mut child = command
        .stdin(Stdio::null())
        .stdout(create(&out_file)?)
        .stderr(create(&err_file)?)
        .spawn()
        .map_err(|error| format!("cannot run: {error}"))?;
    let finished = wait_for_exit(&mut child, limit);
    if !finished {
        let _ = child.kill();
    }
    let status = child.wait();
    let stdout = fs::read_to_string(&out_file).unwrap_or_default();
    let stderr = fs::read_to_string(&err_file).unwrap_or_default();
    let _ = fs::remove_file(&out_file);
    let _ = fs::remove_file(&err_file);
    match status {
        Ok(status) if finished && status.success() => Ok(stdout),
        Ok(status) if finished => Err(format!("{status}\nstdout: {stdout}\nstderr: {stderr}")),
        _ => Err(format!(
            "no answer within {limit:?}\nstdout: {stdout}\nstderr: {stderr}"
        )),
    }
}

fn write(file: &Path, contents: &str) {
    fs::write(file, contents).unwrap_or_else(|error| panic!("writing {}: {error}", file.display()));
}

/// Three distinct free ports: AMQP on 127.0.0.1, AMQPS free on both 127.0.0.1
/// and [`UNNAMED_LOOPBACK`], and the Erlang distribution port. The probes stay
/// bound until all are chosen so the three differ.
fn free_ports() -> (u16, u16, u16) {
    let bind = |ip: Ipv4Addr, port: u16| TcpListener::bind(SocketAddr::from((ip, port)));
    let amqp = bind(Ipv4Addr::LOCALHOST, 0).expect("a free port on 127.0.0.1");
    let dist = bind(Ipv4Addr::LOCALHOST, 0).expect("a free port on 127.0.0.1");
    let mut amqps = None;
    for _ in 0..50 {
        let first = bind(Ipv4Addr::LOCALHOST, 0).expect("a free port on 127.0.0.1");
        let port = first.local_addr().expect("bound address").port();
        match bind(UNNAMED_LOOPBACK, port) {
            Ok(second) => {
                amqps = Some((first, second));
                break;
            }
            Err(error) if error.kind() == std::io::ErrorKind::AddrNotAvailable => panic!(
                "prerequisite missing: the loopback address {UNNAMED_LOOPBACK} \
                 (Linux routes 127.0.0.0/8 to lo): {error}"
            ),
            Err(_) => continue,
        }
    }
    let (amqps, _second) = amqps.expect("a port free on both 127.0.0.1 and 127.0.0.2");
    let port = |listener: &TcpListener| listener.local_addr().expect("bound address").port();
    (port(&amqp), port(&amqps), port(&dist))
}

/// Makes a CA and a server certificate for `localhost` / `127.0.0.1` signed by
/// it, writes `ca.pem`, `server.pem`, `server.key` into `dir`; the CA's PEM.
fn write_certificates(dir: &Path) -> String {
    let (ca_pem, issuer) = certificate_authority("tc-exchanges test CA");
    let key = KeyPair::generate().expect("server key");
    let mut params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .expect("server names");
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server = params.signed_by(&key, &issuer).expect("server certificate");
    write(&dir.join("ca.pem"), &ca_pem);
    write(&dir.join("server.pem"), &server.pem());
    write(&dir.join("server.key"), &key.serialize_pem());
    ca_pem
}

/// A fresh self-signed CA named `name`: its certificate (PEM) and issuer.
pub fn certificate_authority(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let certificate = params.self_signed(&key).expect("CA certificate");
    (certificate.pem(), Issuer::new(params, key))
}
