//! Connection settings for [`AmqpBroker`](super::AmqpBroker), parsed from an
//! `amqp://` / `amqps://` URL.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use lapin::tcp::OwnedTLSConfig;
use lapin::uri::{AMQPScheme, AMQPUri};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::broker::BrokerError;

/// Environment variable holding the Pulse user name, used when the URL has no credentials.
pub const USERNAME_ENV: &str = "PULSE_USERNAME";
/// Environment variable holding the Pulse password, used when the URL has no credentials.
pub const PASSWORD_ENV: &str = "PULSE_PASSWORD";

/// How to reach RabbitMQ and how hard to try.
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
/// ```
#[derive(Clone)]
pub struct AmqpConfig {
    uri: AMQPUri,
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
    /// Parses an `amqp://` or `amqps://` URL. Credentials come from the URL,
    /// or else from the `PULSE_USERNAME` / `PULSE_PASSWORD` environment variables.
    pub fn from_url(url: &str) -> Result<Self, BrokerError> {
        Self::from_url_and_env(url, |name| std::env::var(name).ok())
    }

    /// Like [`from_url`](Self::from_url), reading the environment through
    /// `env` (a name → value lookup) instead of the process environment.
    pub fn from_url_and_env(
        url: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, BrokerError> {
        let authority = Authority::split(url)?;
        let mut uri: AMQPUri = url.parse().map_err(|error| {
            BrokerError::Invalid(format!("AMQP URL `{}`: {error}", redact(url)))
        })?;
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
        let heartbeat = Duration::from_secs(uri.query.heartbeat.map_or(30, u64::from));
        let connect_timeout = Duration::from_millis(uri.query.connection_timeout.unwrap_or(10_000));
        Ok(AmqpConfig {
            uri,
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
        &self.uri.authority.userinfo.username
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

    /// Where the broker connects, without credentials: `amqp://host:port/vhost`.
    pub fn endpoint(&self) -> String {
        let scheme = match self.uri.scheme {
            AMQPScheme::AMQP => "amqp",
            AMQPScheme::AMQPS => "amqps",
        };
        format!(
            "{scheme}://{}:{}/{}",
            self.uri.authority.host,
            self.uri.authority.port,
            percent_encode_vhost(&self.uri.vhost)
        )
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

    /// The URI lapin connects with (heartbeat and timeout applied).
    pub(crate) fn lapin_uri(&self) -> AMQPUri {
        let mut uri = self.uri.clone();
        uri.query.heartbeat = Some(u16::try_from(self.heartbeat.as_secs()).unwrap_or(u16::MAX));
        uri.query.connection_timeout =
            Some(u64::try_from(self.connect_timeout.as_millis()).unwrap_or(u64::MAX));
        uri
    }

    /// The TLS settings lapin connects `amqps://` with (the extra trusted CAs).
    pub(crate) fn lapin_tls_config(&self) -> OwnedTLSConfig {
        OwnedTLSConfig {
            identity: None,
            cert_chain: self.ca_certificates.as_ref().map(|(pem, _)| pem.clone()),
        }
    }
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
        assert_eq!(config.uri.authority.userinfo.password, "pa@ss");
        assert_eq!(config.uri.authority.host, "127.0.0.1");
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
        assert_eq!(config.uri.authority.userinfo.password, "pulse-pass");
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

    fn self_signed_pem() -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key pair");
        let certificate = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("certificate");
        (certificate.pem(), key.serialize_pem())
    }

    #[test]
    fn ca_certificates_are_counted_and_passed_to_lapin() {
        let config = AmqpConfig::from_url_and_env("amqps://a:b@127.0.0.1/%2f", no_env).unwrap();
        assert_eq!(config.extra_ca_certificates(), 0);
        assert_eq!(config.lapin_tls_config().cert_chain, None);
        let (first, key) = self_signed_pem();
        let (second, _) = self_signed_pem();
        // A key among the certificates is ignored, not an error.
        let bundle = format!("{first}{key}{second}");
        let config = config
            .with_ca_certificate_pem(&bundle)
            .expect("two certificates");
        assert_eq!(config.extra_ca_certificates(), 2);
        assert_eq!(
            config.lapin_tls_config().cert_chain.as_deref(),
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
