//! The generated bindings driving the runtime end to end, on the embedded
//! broker and on RabbitMQ: the seed's sniffer workflow (bind taskDefined and
//! taskRunning for one worker type, receive typed messages with their
//! routing-key fields and CC'd routes) and publish-side validation.

mod common;

use std::time::Duration;

use exchange_runtime::broker::memory::MemoryBroker;
use exchange_runtime::broker::{Broker, ExchangeOptions};
use exchange_runtime::consumer::{Consumer, ConsumerBuilder, DeliveryInfo, HandlerError};
use exchange_runtime::publisher::{PublishError, Publisher};
use exchange_runtime::validate::ValidationErrorKind;
use exchange_runtime::{DecodeError, Exchange};
use taskcluster_exchanges::queue::{QueueMessage, TaskCompleted, TaskDefined, TaskRunning};
use tokio::sync::mpsc;

/// A worker type (`^[a-z]([-a-z0-9]{0,36}[a-z0-9])?$`) unique to one test run,
/// so tests sharing RabbitMQ's exchanges never see each other's messages.
fn worker_type(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{tag}-{:x}-{nanos:x}", std::process::id())
}

fn defined_key(task_id: &str, worker_type: &str) -> TaskDefined {
    TaskDefined {
        task_id: Some(task_id.to_owned()),
        provisioner_id: Some("aws-provisioner".to_owned()),
        worker_type: Some(worker_type.to_owned()),
        scheduler_id: Some("-".to_owned()),
        task_group_id: Some(task_id.to_owned()),
        ..Default::default()
    }
}

fn running_key(task_id: &str, worker_type: &str) -> TaskRunning {
    TaskRunning {
        task_id: Some(task_id.to_owned()),
        run_id: Some("0".to_owned()),
        worker_group: Some("us-east-1".to_owned()),
        worker_id: Some("i-0123".to_owned()),
        provisioner_id: Some("aws-provisioner".to_owned()),
        worker_type: Some(worker_type.to_owned()),
        scheduler_id: Some("-".to_owned()),
        task_group_id: Some(task_id.to_owned()),
        ..Default::default()
    }
}

/// Consumers declare exchanges passively, as on Pulse: the service's exchanges must exist.
async fn declare_queue_exchanges<B: Broker>(broker: &B) {
    for exchange in [
        TaskDefined::EXCHANGE,
        TaskRunning::EXCHANGE,
        TaskCompleted::EXCHANGE,
    ] {
        let options = ExchangeOptions {
            passive: false,
            durable: true,
        };
        broker
            .declare_exchange(exchange, options)
            .await
            .expect("declare exchange");
    }
}

type Received = (QueueMessage, DeliveryInfo);

/// Starts a consumer whose handler forwards every decoded message, with its
/// delivery facts, to the returned channel.
async fn start_collecting<B: Broker>(
    builder: ConsumerBuilder<B>,
) -> (Consumer<B, QueueMessage>, mpsc::UnboundedReceiver<Received>) {
    let (sender, received) = mpsc::unbounded_channel::<Received>();
    let consumer = builder
        .build(
            move |message: Result<QueueMessage, DecodeError>, info: DeliveryInfo| {
                let sender = sender.clone();
                async move {
                    sender.send((message?, info)).map_err(HandlerError::msg)?;
                    Ok::<(), HandlerError>(())
                }
            },
        )
        .expect("consumer");
    consumer.start().await.expect("start consumer");
    (consumer, received)
}

async fn sniffer_workflow<B: Broker>(broker: B) {
    declare_queue_exchanges(&broker).await;
    let gaia = worker_type("gaia");
    let builder = ConsumerBuilder::new(broker.clone())
        .bind(TaskDefined {
            worker_type: Some(gaia.clone()),
            provisioner_id: Some("aws-provisioner".into()),
            ..Default::default()
        })
        .expect("binding pattern")
        .bind(TaskRunning {
            worker_type: Some(gaia.clone()),
            provisioner_id: Some("aws-provisioner".into()),
            ..Default::default()
        })
        .expect("binding pattern")
        .prefetch(1);
    let (consumer, mut received) = start_collecting(builder).await;

    let publisher = Publisher::new(broker.clone());
    let other = worker_type("other");
    publisher
        .publish_with_routes(
            &defined_key("fXYEnLHcQ3GLbTQb7lhNNQ", &gaia),
            &common::task_defined("fXYEnLHcQ3GLbTQb7lhNNQ", &gaia),
            &["notify.by-email"],
        )
        .await
        .expect("publish taskDefined");
    // Neither of these matches the consumer's bindings.
    publisher
        .publish(
            &defined_key("aXYEnLHcQ3GLbTQb7lhNNQ", &other),
            &common::task_defined("aXYEnLHcQ3GLbTQb7lhNNQ", &other),
        )
        .await
        .expect("publish taskDefined for another worker type");
    let completed = TaskCompleted {
        task_id: Some("fXYEnLHcQ3GLbTQb7lhNNQ".into()),
        run_id: Some("0".into()),
        worker_group: Some("us-east-1".into()),
        worker_id: Some("i-0123".into()),
        provisioner_id: Some("aws-provisioner".into()),
        worker_type: Some(gaia.clone()),
        scheduler_id: Some("-".into()),
        task_group_id: Some("fXYEnLHcQ3GLbTQb7lhNNQ".into()),
        ..Default::default()
    };
    let completed_message = serde_json::from_value(serde_json::json!({
        "version": 1,
        "status": common::status("fXYEnLHcQ3GLbTQb7lhNNQ", &gaia),
        "runId": 0,
        "workerGroup": "us-east-1",
        "workerId": "i-0123"
    }))
    .expect("taskCompleted fixture");
    publisher
        .publish(&completed, &completed_message)
        .await
        .expect("publish taskCompleted");
    publisher
        .publish(
            &running_key("fXYEnLHcQ3GLbTQb7lhNNQ", &gaia),
            &common::task_running("fXYEnLHcQ3GLbTQb7lhNNQ", &gaia),
        )
        .await
        .expect("publish taskRunning");

    let wait = Duration::from_secs(10);
    let (first, first_info) = tokio::time::timeout(wait, received.recv())
        .await
        .expect("taskDefined arrives")
        .expect("open");
    let (second, second_info) = tokio::time::timeout(wait, received.recv())
        .await
        .expect("taskRunning arrives")
        .expect("open");

    match &first {
        QueueMessage::TaskDefined(message) => {
            assert_eq!(message.status.task_id, "fXYEnLHcQ3GLbTQb7lhNNQ");
            assert_eq!(message.status.worker_type, gaia);
        }
        other => panic!("expected taskDefined first, got {other:?}"),
    }
    assert_eq!(first_info.exchange, TaskDefined::EXCHANGE);
    assert_eq!(first_info.field("workerType"), Some(gaia.as_str()));
    assert_eq!(first_info.field("runId"), None, "`_` parses as no value");
    assert_eq!(first_info.routes, vec!["notify.by-email".to_owned()]);
    let parsed: TaskDefined = first_info
        .binding()
        .expect("from taskDefined")
        .expect("key parses");
    assert_eq!(parsed, defined_key("fXYEnLHcQ3GLbTQb7lhNNQ", &gaia));

    match &second {
        QueueMessage::TaskRunning(message) => {
            assert_eq!(message.worker_id, "i-0123");
            assert_eq!(message.run_id, 0);
        }
        other => panic!("expected taskRunning second, got {other:?}"),
    }
    assert_eq!(second_info.field("workerId"), Some("i-0123"));
    assert!(second_info.routes.is_empty());

    // The other worker type's message and the unbound exchange never arrive.
    let extra = tokio::time::timeout(Duration::from_millis(500), received.recv()).await;
    assert!(extra.is_err(), "unexpected delivery: {extra:?}");

    consumer.stop().expect("stop");
    consumer.wait().await;
}

async fn invalid_message_is_refused<B: Broker>(broker: B) {
    declare_queue_exchanges(&broker).await;
    let gaia = worker_type("strict");
    let builder = ConsumerBuilder::new(broker.clone())
        .bind(TaskRunning {
            worker_type: Some(gaia.clone()),
            ..Default::default()
        })
        .expect("binding pattern");
    let (consumer, mut received) = start_collecting(builder).await;

    let mut message = common::task_running("fXYEnLHcQ3GLbTQb7lhNNQ", &gaia);
    message.worker_id = "not.a-valid id".to_owned();
    message.run_id = 5000;
    let error = Publisher::new(broker.clone())
        .publish(&running_key("fXYEnLHcQ3GLbTQb7lhNNQ", &gaia), &message)
        .await
        .expect_err("schema violations refuse the publish");
    match &error {
        PublishError::InvalidMessage {
            exchange, source, ..
        } => {
            assert_eq!(exchange, TaskRunning::EXCHANGE);
            let ValidationErrorKind::Invalid(violations) = &source.kind else {
                panic!("expected violations, got {source:?}");
            };
            let pointers: Vec<&str> = violations.iter().map(|v| v.pointer.as_str()).collect();
            assert!(pointers.contains(&"/workerId"), "{pointers:?}");
            assert!(pointers.contains(&"/runId"), "{pointers:?}");
        }
        other => panic!("expected InvalidMessage, got {other}"),
    }
    let nothing = tokio::time::timeout(Duration::from_millis(500), received.recv()).await;
    assert!(
        nothing.is_err(),
        "a refused message was delivered: {nothing:?}"
    );
    consumer.stop().expect("stop");
    consumer.wait().await;
}

#[tokio::test]
async fn sniffer_workflow_on_embedded_broker() {
    sniffer_workflow(MemoryBroker::new()).await;
}

#[tokio::test]
async fn sniffer_workflow_on_rabbitmq() {
    sniffer_workflow(common::rabbitmq().await).await;
}

#[tokio::test]
async fn invalid_message_is_refused_on_embedded_broker() {
    invalid_message_is_refused(MemoryBroker::new()).await;
}

#[tokio::test]
async fn invalid_message_is_refused_on_rabbitmq() {
    invalid_message_is_refused(common::rabbitmq().await).await;
}
