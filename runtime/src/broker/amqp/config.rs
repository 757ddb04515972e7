//! Connection settings for [`AmqpBroker`](super::AmqpBroker), parsed from an
//! `amqp://` / `amqps://` URL, or several: the nodes of a RabbitMQ cluster.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use amq_protocol_tcp::OwnedTLSConfig;
use amq_protocol_uri::{AMQPScheme, AMQPUri};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::broker::BrokerError;

/// Environment variable holding the Pulse user name, used when the URL has no credentials.
pub const USERNAME_ENV: &str = "PULSE_USERNAME";
/// Environment variable holding the Pulse password, used when the URL has no credentials.
pub const PASSWORD_ENV: &str = "PULSE_PASSWORD";

/// How to reach RabbitMQ and how hard to try.
///
/// Several node URLs (a cluster) are given as a list
/// ([`from_urls`](Self::from_urls)) or as one comma-separated value
/// ([`from_url`](Self::from_url)), as other AMQP clients take them. The
/// broker connects to the first node it can reach, in the order given, and
/// after losing a connection tries the nodes that follow the lost one first.
/// All nodes must use the same user name and virtual host (queue names are
/// `queue/<user>/...`, and the topology is re-declared on whichever node is
/// reached); a URL without credentials takes them from the environment.
///
/// ```
/// # use exchange_runtime::broker::amqp::AmqpConfig;
/// # use std::time::Duration;
/// let config = AmqpConfig::from_url("amqps://alice:s3cret@pulse.example.com/%2f")
///     .unwrap()
///     .with_connection_name("my-service")
///     .with_heartbeat(Duration::from_secs(15));
/// assert_eq!(config.username(), "alice");
/// assert_eq!(config.endpoint(), "amqps://pulse.example.com:5671/%2F");
///
/// let cluster = AmqpConfig::from_url(
///     "amqp://alice:s3cret@rabbit-1:5672/%2f,amqp://alice:s3cret@rabbit-2:5672/%2f",
/// )
/// .unwrap();
/// assert_eq!(
///     cluster.endpoints(),
///     ["amqp://rabbit-1:5672/%2F", "amqp://rabbit-2:5672/%2F"]
/// );
/// ```
#[derive(Clone)]
pub struct AmqpConfig {
    /// The nodes, in the order they are tried; at least one.
    nodes: Vec<AMQPUri>,
    connection_name: String,
    heartbeat: Duration,
    connect_timeout: Duration,
    operation_timeout: Duration,
    initial_backoff: Duration,
    max_backoff: Duration,
    /// Extra trusted CA certificates for `amqps://`, besides the webpki roots:
    /// the PEM and how many certificates it holds (at least one).
    ca_certificates: Option<(String, usize)>,
}

impl fmt::Debug for AmqpConfig {
    // Never prints the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("endpoint", &self.endpoint())
            .field("username", &self.username())
            .field("connection_name", &self.connection_name)
            .field("heartbeat", &self.heartbeat)
            .field("connect_timeout", &self.connect_timeout)
            .field("operation_timeout", &self.operation_timeout)
            .field("initial_backoff", &self.initial_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("extra_ca_certificates", &self.extra_ca_certificates())
            .finish()
    }
}

impl AmqpConfig {
    /// Parses an `amqp://` or `amqps://` URL, or several separated by commas
    /// (`amqp://u:p@node-1/%2f,amqp://u:p@node-2/%2f`: the nodes of a
    /// cluster). Credentials come from each URL, or else from the
    /// `PULSE_USERNAME` / `PULSE_PASSWORD` environment variables. The
    /// heartbeat and connection timeout are the first URL's.
    pub fn from_url(url: &str) -> Result<Self, BrokerError> {
        Self::from_url_and_env(url, |name| std::env::var(name).ok())
    }

    /// Like [`from_url`](Self::from_url), reading the environment through
    /// `env` (a name → value lookup) instead of the process environment.
    pub fn from_url_and_env(
        url: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, BrokerError> {
        Self::from_urls_and_env(split_urls(url)?, env)
    }

    /// The nodes of a cluster, one URL each (each parsed as by
    /// [`from_url`](Self::from_url), without commas), tried in this order.
    /// An empty list, or nodes that differ in user name or virtual host,
    /// are [`BrokerError::Invalid`].
    pub fn from_urls<I>(urls: I) -> Result<Self, BrokerError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        Self::from_urls_and_env(urls, |name| std::env::var(name).ok())
    }

    /// Like [`from_urls`](Self::from_urls), reading the environment through `env`.
    pub fn from_urls_and_env<I>(
        urls: I,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, BrokerError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let mut nodes: Vec<AMQPUri> = Vec::new();
        let mut first_url = String::new();
        for url in urls {
            let url = url.as_ref();
            let uri = parse_node(url, &env)?;
            match nodes.first() {
                None => first_url = redact(url),
                Some(first) => {
                    let (user, vhost) = (&uri.authority.userinfo.username, &uri.vhost);
                    let (first_user, first_vhost) =
                        (&first.authority.userinfo.username, &first.vhost);
                    if user != first_user || vhost != first_vhost {
                        return Err(BrokerError::Invalid(format!(
                            "AMQP URL `{}` names user `{user}` and virtual host `{vhost}`, but \
                             `{first_url}` names user `{first_user}` and virtual host \
                             `{first_vhost}`: the nodes of one broker must share both",
                            redact(url)
                        )));
                    }
                }
            }
            nodes.push(uri);
        }
        let Some(uri) = nodes.first() else {
            return Err(BrokerError::Invalid(
                "no AMQP URL given: at least one node is needed".to_owned(),
            ));
        };
        let heartbeat = Duration::from_secs(uri.query.heartbeat.map_or(30, u64::from));
        let connect_timeout = Duration::from_millis(uri.query.connection_timeout.unwrap_or(10_000));
        Ok(AmqpConfig {
            nodes,
            connection_name: "exchange-runtime".to_owned(),
            heartbeat,
            connect_timeout,
            operation_timeout: Duration::from_secs(30),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            ca_certificates: None,
        })
    }

    /// Sets the connection name shown by RabbitMQ (management UI, `rabbitmqctl list_connections`).
    #[must_use]
    pub fn with_connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = name.into();
        self
    }

    /// Sets the heartbeat interval proposed to the server (default 30 s, or the URL's `heartbeat`).
    #[must_use]
    pub fn with_heartbeat(mut self, heartbeat: Duration) -> Self {
        self.heartbeat = heartbeat;
        self
    }

    /// Sets how long one connection attempt may take (default 10 s, or the URL's `connection_timeout`).
    #[must_use]
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets how long one broker operation (including waiting for a lost
    /// connection to be re-established) may take before it fails (default 30 s).
    #[must_use]
    pub fn with_operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// Sets the reconnect backoff: the first delay, doubled per failed attempt up to `max`
    /// (defaults 100 ms and 10 s).
    #[must_use]
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max.max(initial);
        self
    }

    /// Trusts the CA certificates in `pem` (one or more `-----BEGIN CERTIFICATE-----`
    /// blocks) for `amqps://`, in addition to the built-in webpki roots — for a
    /// broker whose certificate comes from a private CA. Replaces certificates set
    /// earlier. Unused with `amqp://`.
    ///
    /// The server's certificate is still checked in full: it must chain to a
    /// trusted CA and name the URL's host (a DNS name, or an IP address SAN for
    /// an IP host).
    ///
    /// Fails, without changing anything, when `pem` holds no certificate or a
    /// malformed one.
    ///
    /// ```
    /// # use exchange_runtime::broker::amqp::AmqpConfig;
    /// let error = AmqpConfig::from_url("amqps://u:p@127.0.0.1/%2f")
    ///     .unwrap()
    ///     .with_ca_certificate_pem("not a certificate")
    ///     .unwrap_err();
    /// assert!(error.to_string().contains("no certificate"));
    /// ```
    pub fn with_ca_certificate_pem(mut self, pem: &str) -> Result<Self, BrokerError> {
        let count = count_pem_certificates(pem).map_err(|problem| {
            BrokerError::Invalid(format!(
                "CA certificate PEM for {}: {problem}",
                self.endpoint()
            ))
        })?;
        self.ca_certificates = Some((pem.to_owned(), count));
        Ok(self)
    }

    /// Like [`with_ca_certificate_pem`](Self::with_ca_certificate_pem), reading
    /// the PEM from the file at `path`; errors name the file.
    pub fn with_ca_certificate_file(mut self, path: impl AsRef<Path>) -> Result<Self, BrokerError> {
        let path = path.as_ref();
        let pem = std::fs::read_to_string(path).map_err(|error| {
            BrokerError::Invalid(format!(
                "cannot read CA certificate file {}: {error}",
                path.display()
            ))
        })?;
        let count = count_pem_certificates(&pem).map_err(|problem| {
            BrokerError::Invalid(format!("CA certificate file {}: {problem}", path.display()))
        })?;
        self.ca_certificates = Some((pem, count));
        Ok(self)
    }

    /// How many CA certificates were added with
    /// [`with_ca_certificate_pem`](Self::with_ca_certificate_pem) (0 if none).
    pub fn extra_ca_certificates(&self) -> usize {
        self.ca_certificates.as_ref().map_or(0, |(_, count)| *count)
    }

    /// The user name the broker authenticates as (the `<user>` of Pulse's `queue/<user>/...`).
    pub fn username(&self) -> &str {
        &self.nodes[0].authority.userinfo.username
    }

    /// The connection name.
    pub fn connection_name(&self) -> &str {
        &self.connection_name
    }

    /// The heartbeat interval.
    pub fn heartbeat(&self) -> Duration {
        self.heartbeat
    }

    /// The per-operation deadline.
    pub fn operation_timeout(&self) -> Duration {
        self.operation_timeout
    }

    /// Where the broker connects, without credentials: `amqp://host:port/vhost`,
    /// or for several nodes their endpoints separated by `, `.
    pub fn endpoint(&self) -> String {
        self.endpoints().join(", ")
    }

    /// Each node's endpoint (`amqp://host:port/vhost`, no credentials), in
    /// the order they are tried.
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(node_endpoint).collect()
    }

    /// How many nodes the configuration names (at least one).
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The configuration of node number `index` alone (`index` modulo
    /// [`node_count`](Self::node_count)).
    pub(crate) fn node(&self, index: usize) -> AmqpConfig {
        let mut node = self.clone();
        node.nodes = vec![self.nodes[index % self.nodes.len()].clone()];
        node
    }

    /// Runs `attempt` with each node's configuration alone (and its number),
    /// from node `first` on, wrapping, until one succeeds. A connection
    /// failure moves on to the next node; another error ends the round at
    /// once. Fails naming every node tried and why (a single node's error
    /// as it is).
    pub(crate) async fn on_first_answering<T, F, Fut>(
        &self,
        first: usize,
        mut attempt: F,
    ) -> Result<T, BrokerError>
    where
        F: FnMut(AmqpConfig, usize) -> Fut,
        Fut: Future<Output = Result<T, BrokerError>>,
    {
        let count = self.node_count();
        let mut failures = Vec::new();
        for offset in 0..count {
            let node = (first + offset) % count;
            match attempt(self.node(node), node).await {
                Ok(value) => {
                    if !failures.is_empty() {
                        tracing::info!(endpoint = %self.node(node).endpoint(), unreachable = ?failures, "AMQP connected to another node");
                    }
                    return Ok(value);
                }
                Err(BrokerError::Connection(reason)) if count > 1 => failures.push(reason),
                Err(error) => return Err(error),
            }
        }
        Err(BrokerError::Connection(format!(
            "none of the {count} nodes answered: {}",
            failures.join("; ")
        )))
    }

    /// The reconnect delay before attempt number `attempt` (0-based): capped exponential.
    pub(crate) fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX);
        self.initial_backoff
            .checked_mul(factor)
            .map_or(self.max_backoff, |delay| delay.min(self.max_backoff))
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The URI the first node is connected to with (heartbeat and timeout
    /// applied); see [`node`](Self::node) for the others.
    pub(crate) fn uri(&self) -> AMQPUri {
        let mut uri = self.nodes[0].clone();
        uri.query.heartbeat = Some(u16::try_from(self.heartbeat.as_secs()).unwrap_or(u16::MAX));
        uri.query.connection_timeout =
            Some(u64::try_from(self.connect_timeout.as_millis()).unwrap_or(u64::MAX));
        uri
    }

    /// The TLS settings `amqps://` connects with (the extra trusted CAs).
    pub(crate) fn tls_config(&self) -> OwnedTLSConfig {
        OwnedTLSConfig {
            identity: None,
            cert_chain: self.ca_certificates.as_ref().map(|(pem, _)| pem.clone()),
        }
    }
}

/// `amqp://host:port/vhost` of one node, without credentials.
fn node_endpoint(uri: &AMQPUri) -> String {
    let scheme = match uri.scheme {
        AMQPScheme::AMQP => "amqp",
        AMQPScheme::AMQPS => "amqps",
    };
    format!(
        "{scheme}://{}:{}/{}",
        uri.authority.host,
        uri.authority.port,
        percent_encode_vhost(&uri.vhost)
    )
}

/// Splits a comma-separated list of node URLs: at each comma that a new
/// `amqp://` or `amqps://` follows (whitespace around it is dropped). A
/// comma elsewhere stays in its URL (a password may hold one).
fn split_urls(value: &str) -> Result<Vec<&str>, BrokerError> {
    let starts_url = |rest: &str| {
        let rest = rest.trim_start();
        rest.starts_with("amqp://") || rest.starts_with("amqps://")
    };
    if value.trim_end().ends_with(',') {
        // Not a virtual host ending in a comma (that is written `%2C`).
        return Err(BrokerError::Invalid(format!(
            "AMQP URL list `{}` ends with a comma",
            redact_list(value)
        )));
    }
    let mut urls = Vec::new();
    let mut start = 0;
    for (index, _) in value.match_indices(',') {
        if starts_url(&value[index + 1..]) {
            urls.push(value[start..index].trim());
            start = index + 1;
        }
    }
    urls.push(value[start..].trim());
    if let Some(position) = urls.iter().position(|url| url.is_empty()) {
        return Err(BrokerError::Invalid(format!(
            "AMQP URL list `{}`: URL number {} is empty",
            redact_list(value),
            position + 1
        )));
    }
    Ok(urls)
}

/// A comma-separated URL list with every password replaced by `***`.
fn redact_list(value: &str) -> String {
    value.split(',').map(redact).collect::<Vec<_>>().join(",")
}

/// Parses one node's URL: credentials from it or else from the environment.
fn parse_node(url: &str, env: &impl Fn(&str) -> Option<String>) -> Result<AMQPUri, BrokerError> {
    let authority = Authority::split(url)?;
    let mut uri: AMQPUri = url
        .parse()
        .map_err(|error| BrokerError::Invalid(format!("AMQP URL `{}`: {error}", redact(url))))?;
    // amq-protocol-uri only takes domain names as hosts; an IP literal would silently become `localhost`.
    uri.authority.host = authority.host.to_owned();
    if !authority.has_credentials {
        match (env(USERNAME_ENV), env(PASSWORD_ENV)) {
            (Some(username), Some(password)) if !username.is_empty() => {
                uri.authority.userinfo.username = username;
                uri.authority.userinfo.password = password;
            }
            _ => {
                return Err(BrokerError::Invalid(format!(
                    "AMQP URL `{}` has no credentials and {USERNAME_ENV} / {PASSWORD_ENV} are not both set",
                    redact(url)
                )));
            }
        }
    }
    if uri.authority.userinfo.username.is_empty() {
        return Err(BrokerError::Invalid(format!(
            "AMQP URL `{}` has an empty user name",
            redact(url)
        )));
    }
    Ok(uri)
}

/// The number of certificates in `pem`; an error describing the problem if
/// there is none or one is malformed. Other PEM sections (keys) are ignored.
fn count_pem_certificates(pem: &str) -> Result<usize, String> {
    let mut count = 0;
    for certificate in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        match certificate {
            Ok(_) => count += 1,
            Err(error) => return Err(format!("malformed certificate: {error}")),
        }
    }
    if count == 0 {
        return Err(
            "no certificate found (expected -----BEGIN CERTIFICATE----- blocks)".to_owned(),
        );
    }
    Ok(count)
}

/// The parts of a URL's authority that amq-protocol-uri does not report faithfully.
struct Authority<'a> {
    has_credentials: bool,
    host: &'a str,
}

impl<'a> Authority<'a> {
    fn split(url: &'a str) -> Result<Self, BrokerError> {
        let rest = url
            .strip_prefix("amqp://")
            .or_else(|| url.strip_prefix("amqps://"))
            .ok_or_else(|| {
                BrokerError::Invalid(format!(
                    "AMQP URL `{}` must start with amqp:// or amqps://",
                    redact(url)
                ))
            })?;
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let (has_credentials, host_port) = match authority.rfind('@') {
            Some(at) => (true, &authority[at + 1..]),
            None => (false, authority),
        };
        let host = if let Some(bracketed) = host_port.strip_prefix('[') {
            bracketed.split(']').next().unwrap_or_default()
        } else {
            host_port.split(':').next().unwrap_or_default()
        };
        if host.is_empty() {
            return Err(BrokerError::Invalid(format!(
                "AMQP URL `{}` has no host",
                redact(url)
            )));
        }
        if host_port.contains(',') {
            return Err(BrokerError::Invalid(format!(
                "AMQP URL `{}` has a comma in its host: several nodes are given as whole \
                 URLs separated by commas (`amqp://u:p@node-1/%2f,amqp://u:p@node-2/%2f`)",
                redact(url)
            )));
        }
        Ok(Authority {
            has_credentials,
            host,
        })
    }
}

/// The URL with any password replaced by `***`, for error messages.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                user.to_owned()
            };
            format!("{scheme}://{masked}@{}{tail}", &authority[at + 1..])
        }
        None => url.to_owned(),
    }
}

fn percent_encode_vhost(vhost: &str) -> String {
    vhost
        .bytes()
        .map(|byte| {
            if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
                char::from(byte).to_string()
            } else {
                format!("%{byte:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn credentials_and_ip_host_come_from_the_url() {
        let config =
            AmqpConfig::from_url_and_env("amqp://guest:pa%40ss@127.0.0.1:5672/%2f", no_env)
                .expect("valid URL");
        assert_eq!(config.username(), "guest");
        assert_eq!(config.nodes[0].authority.userinfo.password, "pa@ss");
        assert_eq!(config.nodes[0].authority.host, "127.0.0.1");
        assert_eq!(config.endpoint(), "amqp://127.0.0.1:5672/%2F");
    }

    #[test]
    fn credentials_fall_back_to_the_environment() {
        let env = |name: &str| match name {
            USERNAME_ENV => Some("pulse-user".to_owned()),
            PASSWORD_ENV => Some("pulse-pass".to_owned()),
            _ => None,
        };
        let config =
            AmqpConfig::from_url_and_env("amqps://pulse.example.com/vh", env).expect("valid");
        assert_eq!(config.username(), "pulse-user");
        assert_eq!(config.nodes[0].authority.userinfo.password, "pulse-pass");
        assert_eq!(config.endpoint(), "amqps://pulse.example.com:5671/vh");
    }

    #[test]
    fn missing_credentials_are_an_error_naming_the_variables() {
        let error = AmqpConfig::from_url_and_env("amqp://127.0.0.1", no_env).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains(USERNAME_ENV) && message.contains(PASSWORD_ENV),
            "{message}"
        );
    }

    #[test]
    fn bad_scheme_is_rejected_and_password_redacted() {
        let error = AmqpConfig::from_url_and_env("http://u:secret@host/", no_env).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("amqp://"), "{message}");
        assert!(!message.contains("secret"), "{message}");
        assert_eq!(
            redact("amqp://u:secret@h:1/v?x=1"),
            "amqp://u:***@h:1/v?x=1"
        );
    }

    #[test]
    fn heartbeat_from_url_and_backoff_is_capped() {
        let config = AmqpConfig::from_url_and_env("amqp://a:b@127.0.0.1/%2f?heartbeat=7", no_env)
            .expect("valid");
        assert_eq!(config.heartbeat(), Duration::from_secs(7));
        let config = config.with_backoff(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(config.backoff(0), Duration::from_millis(100));
        assert_eq!(config.backoff(3), Duration::from_millis(800));
        assert_eq!(config.backoff(4), Duration::from_secs(1));
        assert_eq!(config.backoff(1000), Duration::from_secs(1));
    }

    #[test]
    fn several_nodes_from_a_comma_separated_value_or_a_list() {
        let value = "amqp://u:p,w@10.0.0.1:5673/%2f, amqps://u:q@rabbit-2/%2f ,amqp://rabbit-3/%2f";
        let env = |name: &str| match name {
            USERNAME_ENV => Some("u".to_owned()),
            PASSWORD_ENV => Some("env-pass".to_owned()),
            _ => None,
        };
        let config = AmqpConfig::from_url_and_env(value, env).expect("three nodes");
        assert_eq!(
            config.endpoints(),
            [
                "amqp://10.0.0.1:5673/%2F",
                "amqps://rabbit-2:5671/%2F",
                "amqp://rabbit-3:5672/%2F"
            ]
        );
        assert_eq!(config.node_count(), 3);
        assert_eq!(
            config.endpoint(),
            "amqp://10.0.0.1:5673/%2F, amqps://rabbit-2:5671/%2F, amqp://rabbit-3:5672/%2F"
        );
        // A comma inside a password does not split; each node keeps its credentials.
        assert_eq!(config.nodes[0].authority.userinfo.password, "p,w");
        assert_eq!(config.nodes[2].authority.userinfo.password, "env-pass");
        let second = config.node(1);
        assert_eq!(second.endpoints(), ["amqps://rabbit-2:5671/%2F"]);
        assert_eq!(second.uri().authority.userinfo.password, "q");
        assert_eq!(config.node(4).endpoint(), "amqps://rabbit-2:5671/%2F");
        assert!(!format!("{config:?}").contains("p,w"));

        let listed =
            AmqpConfig::from_urls_and_env(["amqp://u:p@a:1/%2f", "amqp://u:p@b:2/%2f"], no_env)
                .expect("a list");
        assert_eq!(listed.endpoints(), ["amqp://a:1/%2F", "amqp://b:2/%2F"]);
    }

    #[test]
    fn bad_node_lists_are_errors_naming_the_url_without_its_password() {
        let cases = [
            (
                "amqp://u:secret@a/%2f,amqp://other:secret@b/%2f",
                "user `other`",
            ),
            ("amqp://u:secret@a/%2f,amqp://u:secret@b/vh", "virtual host"),
            ("amqp://u:secret@a/%2f,", "ends with a comma"),
            (",amqp://u:secret@a/%2f", "URL number 1 is empty"),
            ("amqp://u:secret@a,b/%2f", "comma in its host"),
        ];
        for (value, expected) in cases {
            let message = AmqpConfig::from_url_and_env(value, no_env)
                .unwrap_err()
                .to_string();
            assert!(message.contains(expected), "{value}: {message}");
            assert!(!message.contains("secret"), "{value}: {message}");
        }
        let message = AmqpConfig::from_urls_and_env(Vec::<String>::new(), no_env)
            .unwrap_err()
            .to_string();
        assert!(message.contains("at least one node"), "{message}");
    }

    fn self_signed_pem() -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key pair");
        let certificate = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("certificate");
        (certificate.pem(), key.serialize_pem())
    }

    #[test]
    fn ca_certificates_are_counted_and_passed_to_the_tls_config() {
        let config = AmqpConfig::from_url_and_env("amqps://a:b@127.0.0.1/%2f", no_env).unwrap();
        assert_eq!(config.extra_ca_certificates(), 0);
        assert_eq!(config.tls_config().cert_chain, None);
        let (first, key) = self_signed_pem();
        let (second, _) = self_signed_pem();
        // A key among the certificates is ignored, not an error.
        let bundle = format!("{first}{key}{second}");
        let config = config
            .with_ca_certificate_pem(&bundle)
            .expect("two certificates");
        assert_eq!(config.extra_ca_certificates(), 2);
        assert_eq!(
            config.tls_config().cert_chain.as_deref(),
            Some(bundle.as_str())
        );
        assert!(format!("{config:?}").contains("extra_ca_certificates: 2"));
    }

    #[test]
    fn bad_ca_certificates_are_errors_naming_the_problem() {
        let config = AmqpConfig::from_url_and_env("amqps://a:b@127.0.0.1/%2f", no_env).unwrap();
        let (_, key) = self_signed_pem();
        for (pem, expected) in [
            ("", "no certificate"),
            (key.as_str(), "no certificate"),
            (
                "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
                "malformed certificate",
            ),
            (
                "-----BEGIN CERTIFICATE-----\nAAAA\n",
                "malformed certificate",
            ),
        ] {
            let message = config
                .clone()
                .with_ca_certificate_pem(pem)
                .unwrap_err()
                .to_string();
            assert!(message.contains(expected), "{pem:?}: {message}");
            assert!(message.contains("amqps://127.0.0.1:5671/%2F"), "{message}");
        }
        let missing = std::env::temp_dir().join("exchange-runtime-no-such-ca.pem");
        let message = config
            .with_ca_certificate_file(&missing)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains(&missing.display().to_string()),
            "{message}"
        );
    }
}
