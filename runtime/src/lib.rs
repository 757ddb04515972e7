//! Runtime for typed AMQP topic-exchange bindings generated from Taskcluster
//! exchange references (crate `taskcluster-exchanges`).
//!
//! - [`routing`]: routing-key patterns, concrete keys and their parsing.
//! - [`binding`]: the traits generated code implements ([`Exchange`], [`Binding`], [`Message`], [`Decode`]).
//! - [`broker`]: the broker abstraction and its implementations.
//! - [`topic`]: topic-exchange matching of routing keys against binding patterns.
#![deny(missing_docs)]

pub mod binding;
pub mod broker;
pub mod consumer;
pub mod datetime;
mod deadline;
pub mod jobs;
pub mod publisher;
pub mod queue;
pub mod routing;
pub mod topic;
pub mod validate;

pub use binding::{
    Binding, Decode, DecodeError, DecodeErrorKind, Exchange, ExchangeNames, Message, SchemaDocument,
};
pub use broker::{Broker, BrokerError, Delivery, DeliveryStream, OutgoingMessage};
pub use routing::{RoutingKeyError, RoutingKeyErrorKind, RoutingKeyWord};
