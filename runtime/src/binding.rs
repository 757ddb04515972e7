//! The traits generated exchange bindings implement.
//!
//! Generated code supplies data (names, routing-key words, schemas) and the
//! conversion of its binding struct to and from routing-key values; the
//! provided methods here hold the logic.

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
