//! The local services the broker tests need, checked once per test binary.
//!
//! [`rabbitmq_url`] is the RabbitMQ the tests use (`AMQP_URL`, default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`). When it points at this machine
//! and nothing listens there, the broker is started (`rabbitmq-server
//! -detached`) if it is installed; if it is not installed or does not come
//! up, the test binary stops at once with one line naming the service and the
//! command that starts it, instead of every test failing on its own.
#![allow(dead_code)] // each test binary uses its own subset

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The RabbitMQ the tests use when `AMQP_URL` is unset.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The command that starts the local RabbitMQ.
const START: &str = "rabbitmq-server -detached";

/// How long a started broker may take to accept connections.
const STARTUP: Duration = Duration::from_secs(90);

/// `AMQP_URL` (or the local default), after making sure a local broker there
/// is running (see the module documentation).
pub fn rabbitmq_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let url = std::env::var("AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.to_owned());
        if let Some(address) = local_address(&url)
            && let Err(reason) = ensure_listening(address)
        {
            // One line, then stop: the remaining tests would only repeat it.
            // Written to stderr directly: `eprintln!` is captured in tests.
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "RabbitMQ is not running on {address} ({reason}); start it with `{START}` or set AMQP_URL"
            );
            std::process::exit(1);
        }
        url
    })
    .clone()
}

/// The socket address of an `amqp://` URL on a loopback host (the only ones
/// the tests may start a broker for).
fn local_address(url: &str) -> Option<SocketAddr> {
    let rest = url.strip_prefix("amqp://")?;
    let authority = rest.split('/').next()?;
    let host_port = authority.rsplit('@').next()?;
    let with_port = if host_port.rsplit(':').next()?.parse::<u16>().is_ok() {
        host_port.to_owned()
    } else {
        format!("{host_port}:5672")
    };
    with_port
        .to_socket_addrs()
        .ok()?
        .find(|address| address.ip().is_loopback())
}

fn listening(address: SocketAddr) -> bool {
    TcpStream::connect_timeout(&address, Duration::from_secs(1)).is_ok()
}

/// Starts the installed broker when nothing listens on `address`.
fn ensure_listening(address: SocketAddr) -> Result<(), String> {
    ensure_started(address, "rabbitmq-server", &["-detached"], START)
}

/// Runs `program args` (which starts a service in the background, as `start`
/// reads) when nothing listens on `address`, then waits for it to listen.
fn ensure_started(
    address: SocketAddr,
    program: &str,
    args: &[&str],
    start: &str,
) -> Result<(), String> {
    if listening(address) {
        return Ok(());
    }
    let started = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match started {
        Err(error) => return Err(format!("{program} could not be run: {error}")),
        Ok(status) if !status.success() => {
            return Err(format!("`{start}` failed ({status})"));
        }
        Ok(_) => {}
    }
    let deadline = Instant::now() + STARTUP;
    while Instant::now() < deadline {
        if listening(address) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Err(format!(
        "started, but not listening after {}s",
        STARTUP.as_secs()
    ))
}

/// The Redis the job-store tests use when `REDIS_URL` is unset.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/";

/// The command that starts the local Redis.
const START_REDIS: &str = "redis-server --daemonize yes";

/// `REDIS_URL` (or the local default), after making sure a local Redis there
/// is running: started with `redis-server --daemonize yes` when installed
/// and down; when it cannot be, the test binary stops at once with one line
/// naming the service (the Redis tests are never skipped).
pub fn redis_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS_URL.to_owned());
        let address = url
            .strip_prefix("redis://")
            .and_then(|rest| rest.split('/').next())
            .map(|authority| authority.rsplit('@').next().unwrap_or(authority))
            .and_then(|host_port| {
                let with_port = if host_port.contains(':') {
                    host_port.to_owned()
                } else {
                    format!("{host_port}:6379")
                };
                with_port.to_socket_addrs().ok()?.find(|a| a.ip().is_loopback())
            });
        if let Some(address) = address
            && let Err(reason) = ensure_started(
                address,
                "redis-server",
                // No snapshots: a test-started server writes no dump.rdb into the crate.
                &["--daemonize", "yes", "--save", "", "--port", &address.port().to_string()],
                START_REDIS,
            )
        {
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "Redis is not running on {address} ({reason}); start it with `{START_REDIS}` or set REDIS_URL"
            );
            std::process::exit(1);
        }
        url
    })
    .clone()
}
