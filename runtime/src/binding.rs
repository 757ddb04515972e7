//! The traits generated exchange bindings implement.
//!
//! Generated code supplies data (names, routing-key words, schemas) and the
//! conversion of its binding struct to and from routing-key values; the
//! provided methods here hold the logic.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::routing::{self, RoutingKeyError, RoutingKeyWord};

/// A message type published on one or more exchanges, with its JSON Schema.
pub trait Message: Serialize + DeserializeOwned + fmt::Debug + Send + Sync + 'static {
    /// The `$id` of the message's schema (`/schemas/queue/v1/task-completed-message.json#`),
    /// with a JSON pointer after the `#` when the schema is not its document's root.
    const SCHEMA_ID: &'static str;
    /// The JSON text of the schema document [`SCHEMA_ID`](Message::SCHEMA_ID)
    /// names, as published (`$ref`s to other documents kept), used to validate
    /// a message before publishing.
    const SCHEMA: &'static str;
    /// Every other schema document a `$ref` of [`SCHEMA`](Message::SCHEMA)
    /// leads to, directly or not; the validator resolves `$ref`s among these
    /// documents only, never over the network. Empty for a self-contained schema.
    const SCHEMA_DEPENDENCIES: &'static [SchemaDocument] = &[];
}

/// A JSON Schema document by `$id`, for offline `$ref` resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaDocument {
    /// Its `$id` (`/schemas/queue/v1/task-status.json#`).
    pub id: &'static str,
    /// Its JSON text.
    pub text: &'static str,
}

/// A topic exchange: its full name, its routing-key reference and the type of
/// the messages published on it.
pub trait Exchange {
    /// The message published on this exchange.
    type Message: Message;
    /// Full exchange name on the broker (`exchange/taskcluster-queue/v1/task-completed`).
    const EXCHANGE: &'static str;
    /// The entry's stable name in the reference (`taskCompleted`).
    const ENTRY: &'static str;
    /// The routing key's words, in order.
    const ROUTING_KEY: &'static [RoutingKeyWord];
}

/// A binding struct: one optional value per non-constant routing-key word.
///
/// Unset values match anything in a [pattern](Binding::pattern); in a
/// [concrete key](Binding::routing_key) they are `_` (or an error when required).
pub trait Binding: Exchange + Default + Clone + fmt::Debug + Send + Sync + 'static {
    /// The values, one per entry of [`Exchange::ROUTING_KEY`]; constants are `None`.
    fn word_values(&self) -> Vec<Option<&str>>;

    /// Builds the struct from one value per entry of [`Exchange::ROUTING_KEY`]
    /// (the values of constant entries are ignored).
    fn from_word_values(values: Vec<Option<String>>) -> Self;

    /// The routing-key pattern to bind a queue with (`primary.*.*.*.*.*.*.*.abc.#`).
    fn pattern(&self) -> Result<String, RoutingKeyError> {
        routing::binding_pattern(Self::EXCHANGE, Self::ROUTING_KEY, &self.word_values())
    }

    /// The concrete routing key to publish a message with.
    fn routing_key(&self) -> Result<String, RoutingKeyError> {
        routing::concrete_key(Self::EXCHANGE, Self::ROUTING_KEY, &self.word_values())
    }

    /// Parses the concrete routing key of a delivery from this exchange.
    fn parse_routing_key(key: &str) -> Result<Self, RoutingKeyError> {
        routing::parse_key(Self::EXCHANGE, Self::ROUTING_KEY, key).map(Self::from_word_values)
    }
}

/// A type that can be decoded from a delivery: a single message type, or a
/// service's enum of all its messages, which picks the variant by exchange.
pub trait Decode: Sized + Send + 'static {
    /// Decodes the body of a delivery received from `exchange`.
    fn decode(exchange: &str, body: &[u8]) -> Result<Self, DecodeError>;
}

impl<M: Message> Decode for M {
    fn decode(exchange: &str, body: &[u8]) -> Result<Self, DecodeError> {
        serde_json::from_slice(body).map_err(|source| DecodeError {
            exchange: exchange.to_owned(),
            kind: DecodeErrorKind::Body(source.to_string()),
        })
    }
}

/// A delivery that could not be decoded into a typed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// The exchange the delivery came from.
    pub exchange: String,
    /// What went wrong.
    pub kind: DecodeErrorKind,
}

/// The specific fault behind a [`DecodeError`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeErrorKind {
    /// No message type is known for the exchange.
    UnknownExchange,
    /// The body does not match the exchange's message type (serde's message).
    Body(String),
}

impl DecodeError {
    /// An error for a delivery from an exchange no message type is known for.
    pub fn unknown_exchange(exchange: &str) -> Self {
        DecodeError {
            exchange: exchange.to_owned(),
            kind: DecodeErrorKind::UnknownExchange,
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            DecodeErrorKind::UnknownExchange => {
                write!(
                    f,
                    "no message type is known for exchange `{}`",
                    self.exchange
                )
            }
            DecodeErrorKind::Body(reason) => write!(
                f,
                "message from exchange `{}` does not match its type: {reason}",
                self.exchange
            ),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Where exchanges live on the broker.
///
/// By default every exchange is under the name its reference gives it
/// ([`Exchange::EXCHANGE`]). A deployment whose services publish under other
/// names, or a test that must not touch the real exchanges, renames some (the
/// JS and Python clients' `exchangePrefix` option does this per service).
/// Give a [`Publisher`](crate::publisher::Publisher) and a
/// [`ConsumerBuilder`](crate::consumer::ConsumerBuilder) the same names and
/// they meet; a consumer's handler still sees the reference name, so
/// decoding and [`DeliveryInfo::binding`](crate::consumer::DeliveryInfo::binding) work as before.
///
/// ```
/// # use exchange_runtime::ExchangeNames;
/// let names = ExchangeNames::new()
///     .rename("exchange/taskcluster-queue/v1/task-pending", "exchange/staging-queue/v1/task-pending")?;
/// assert_eq!(names.broker_name("exchange/taskcluster-queue/v1/task-pending"), "exchange/staging-queue/v1/task-pending");
/// assert_eq!(names.reference_name("exchange/staging-queue/v1/task-pending"), "exchange/taskcluster-queue/v1/task-pending");
/// assert_eq!(names.broker_name("exchange/other"), "exchange/other");
/// # Ok::<(), exchange_runtime::binding::ExchangeNameError>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExchangeNames {
    /// The broker's name, by reference name (renamed ones only).
    broker: BTreeMap<String, String>,
    /// The reference name, by the broker's name (the same pairs reversed).
    reference: BTreeMap<String, String>,
}

/// The longest exchange name AMQP carries (a short string).
const MAX_EXCHANGE_NAME_LEN: usize = 255;

/// A rename [`ExchangeNames`] refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeNameError {
    /// The new name is empty: that is the broker's default exchange, which
    /// cannot be declared or bound.
    #[error("exchange `{reference}` cannot be renamed to the empty name (the default exchange)")]
    Empty {
        /// The exchange renamed.
        reference: String,
    },
    /// The new name is longer than AMQP allows.
    #[error("exchange `{reference}` cannot be renamed to a name of {len} bytes (AMQP allows 255)")]
    TooLong {
        /// The exchange renamed.
        reference: String,
        /// The new name's length in bytes.
        len: usize,
    },
    /// Another exchange is renamed to the same name already: deliveries from
    /// it could not be told apart.
    #[error(
        "exchange `{reference}` cannot be renamed to `{name}`: exchange `{taken_by}` is renamed to it already"
    )]
    Taken {
        /// The exchange renamed.
        reference: String,
        /// The name asked for.
        name: String,
        /// The exchange already under that name.
        taken_by: String,
    },
}

impl ExchangeNames {
    /// No exchange renamed.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts the exchange the reference calls `reference_name` under
    /// `broker_name` on the broker, replacing an earlier rename of it.
    pub fn rename(
        mut self,
        reference_name: impl Into<String>,
        broker_name: impl Into<String>,
    ) -> Result<Self, ExchangeNameError> {
        let reference = reference_name.into();
        let name = broker_name.into();
        if name.is_empty() {
            return Err(ExchangeNameError::Empty { reference });
        }
        if name.len() > MAX_EXCHANGE_NAME_LEN {
            let len = name.len();
            return Err(ExchangeNameError::TooLong { reference, len });
        }
        if let Some(taken_by) = self.reference.get(&name)
            && *taken_by != reference
        {
            let taken_by = taken_by.clone();
            return Err(ExchangeNameError::Taken {
                reference,
                name,
                taken_by,
            });
        }
        if let Some(earlier) = self.broker.remove(&reference) {
            self.reference.remove(&earlier);
        }
        if name != reference {
            self.reference.insert(name.clone(), reference.clone());
            self.broker.insert(reference, name);
        }
        Ok(self)
    }

    /// The name on the broker of the exchange the reference calls `reference_name`.
    pub fn broker_name<'a>(&'a self, reference_name: &'a str) -> &'a str {
        self.broker
            .get(reference_name)
            .map_or(reference_name, String::as_str)
    }

    /// The reference's name of the exchange called `broker_name` on the broker.
    pub fn reference_name<'a>(&'a self, broker_name: &'a str) -> &'a str {
        self.reference
            .get(broker_name)
            .map_or(broker_name, String::as_str)
    }

    /// Whether no exchange is renamed.
    pub fn is_empty(&self) -> bool {
        self.broker.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renames_map_both_ways_and_refuse_what_would_be_ambiguous() {
        let names = ExchangeNames::new()
            .rename("exchange/a", "exchange/x")
            .unwrap()
            .rename("exchange/b", "exchange/y")
            .unwrap();
        assert_eq!(names.broker_name("exchange/a"), "exchange/x");
        assert_eq!(names.reference_name("exchange/y"), "exchange/b");
        assert_eq!(names.broker_name("exchange/c"), "exchange/c");
        assert_eq!(names.reference_name("exchange/c"), "exchange/c");

        let taken = names
            .clone()
            .rename("exchange/c", "exchange/x")
            .unwrap_err();
        assert_eq!(
            taken,
            ExchangeNameError::Taken {
                reference: "exchange/c".into(),
                name: "exchange/x".into(),
                taken_by: "exchange/a".into(),
            }
        );
        assert!(taken.to_string().contains("`exchange/a`"), "{taken}");
        assert!(matches!(
            names.clone().rename("exchange/a", ""),
            Err(ExchangeNameError::Empty { .. })
        ));
        assert!(matches!(
            names.clone().rename("exchange/a", "x".repeat(256)),
            Err(ExchangeNameError::TooLong { len: 256, .. })
        ));

        // A second rename replaces the first, freeing its name; renaming
        // back to the reference name undoes it.
        let moved = names.rename("exchange/a", "exchange/z").unwrap();
        assert_eq!(moved.reference_name("exchange/x"), "exchange/x");
        let moved = moved.rename("exchange/c", "exchange/x").unwrap();
        assert_eq!(moved.broker_name("exchange/c"), "exchange/x");
        let undone = moved
            .rename("exchange/a", "exchange/a")
            .unwrap()
            .rename("exchange/b", "exchange/b")
            .unwrap()
            .rename("exchange/c", "exchange/c")
            .unwrap();
        assert!(undone.is_empty());
        assert_eq!(undone, ExchangeNames::new());
    }
}
