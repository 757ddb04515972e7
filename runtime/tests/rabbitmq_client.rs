//! Consumer, publisher, work queue and jobs against a real RabbitMQ through
//! `AmqpBroker` (default `amqp://guest:guest@127.0.0.1:5672/%2f`, override with
//! `AMQP_URL`). These tests fail, never skip, when RabbitMQ is unreachable.
#![cfg(feature = "amqp")]

mod client_support;
mod local_services;

use std::sync::Arc;
use std::time::Duration;

use client_support::*;
use exchange_runtime::DecodeError;
use exchange_runtime::broker::amqp::{AmqpBroker, AmqpConfig};
use exchange_runtime::broker::{Broker, QueueOptions};
use exchange_runtime::consumer::{ConsumerBuilder, DeliveryInfo, HandlerError};
use exchange_runtime::jobs::{Job, JobContext, JobStatus, Jobs};
use exchange_runtime::publisher::{PublishError, Publisher};
use exchange_runtime::queue::{LAST_ERROR_HEADER, QueueMessage, WorkQueue};
use tokio::sync::mpsc;
use tokio::time::Instant;

async fn connect() -> AmqpBroker {
    let url = local_services::rabbitmq_url();
    let config = AmqpConfig::from_url(&url)
        .expect("AMQP_URL must be a valid amqp:// URL")
        .with_connection_name("exchange-runtime-client-tests")
        .with_operation_timeout(Duration::from_secs(20));
    match AmqpBroker::connect(config).await {
        Ok(broker) => broker,
        Err(error) => panic!(
            "RabbitMQ is required for these tests and is unreachable at {url} ({error}); \
             start it with `rabbitmq-server -detached` or set AMQP_URL"
        ),
    }
}

async fn delete_queues(broker: &AmqpBroker, queues: &[&str]) {
    for queue in queues {
        broker
            .delete_queue(queue)
            .await
            .unwrap_or_else(|error| panic!("deleting test queue `{queue}`: {error}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_on_rabbitmq_routes_decodes_and_dead_letters() {
    let broker = connect().await;
    let publisher = Publisher::new(broker.clone());
    // Publishing declares the exchanges, which the consumer only checks.
    let worker_type = unique("wt").replace('-', "");
    let (binding, message) = defined(0, &worker_type);
    publisher.publish(&binding, &message).await.unwrap();
    let (binding, message) = running(0, &worker_type);
    publisher.publish(&binding, &message).await.unwrap();

    let name = unique("client-consumer");
    let (sender, mut seen) =
        mpsc::unbounded_channel::<(Result<QueueEvent, DecodeError>, DeliveryInfo)>();
    let consumer = ConsumerBuilder::new(broker.clone())
        .queue(&name)
        .bind(TaskDefined {
            worker_type: Some(worker_type.clone()),
            ..Default::default()
        })
        .unwrap()
        .bind(TaskRunning {
            worker_type: Some(worker_type.clone()),
            ..Default::default()
        })
        .unwrap()
        .max_in_flight(1)
        .build(
            move |message: Result<QueueEvent, DecodeError>, info: DeliveryInfo| {
                let _ = sender.send((message.clone(), info.clone()));
                async move {
                    match message? {
                        QueueEvent::TaskRunning(_) => {
                            Err(HandlerError::msg("refusing task-running"))
                        }
                        QueueEvent::TaskDefined(_) => Ok(()),
                    }
                }
            },
        )
        .unwrap();
    consumer.start().await.unwrap();
    let queue = consumer.queue_name().unwrap();
    let dead = consumer.dead_letter_queue().unwrap();
    assert_eq!(queue, broker.qualify_queue_name(&name));
    assert_eq!(dead, format!("{queue}.dead"));

    let (binding, message) = defined(1, &worker_type);
    publisher
        .publish_with_routes(&binding, &message, &["notify.by-email"])
        .await
        .unwrap();
    let (message_in, info) = next(&mut seen, "task-defined from RabbitMQ").await;
    assert_eq!(message_in.unwrap(), QueueEvent::TaskDefined(message));
    assert_eq!(info.exchange, DEFINED);
    assert_eq!(info.field("taskId"), Some(task_id(1).as_str()));
    assert_eq!(info.field("workerType"), Some(worker_type.as_str()));
    assert_eq!(info.routes, vec!["notify.by-email"]);

    let (binding, message) = running(2, &worker_type);
    publisher.publish(&binding, &message).await.unwrap();
    let (_, first) = next(&mut seen, "task-running, first delivery").await;
    let (_, second) = next(&mut seen, "task-running, requeued once").await;
    assert!(!first.redelivered && second.redelivered);
    eventually("task-running dead-lettered", || async {
        broker.pending(&dead).await.unwrap().len() == 1
    })
    .await;

    consumer.stop().unwrap();
    tokio::time::timeout(EVENTUALLY, consumer.wait())
        .await
        .expect("the consumer stops");
    assert!(broker.pending(&queue).await.unwrap().is_empty());
    delete_queues(&broker, &[&queue, &dead]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_messages_never_reach_rabbitmq() {
    let broker = connect().await;
    let publisher = Publisher::new(broker.clone());
    let worker_type = unique("wt").replace('-', "");
    let (binding, message) = defined(0, &worker_type);
    publisher.publish(&binding, &message).await.unwrap();
    let tap = broker
        .declare_queue(
            &broker.qualify_queue_name(&unique("client-tap")),
            QueueOptions::default(),
        )
        .await
        .unwrap();
    broker
        .bind_queue(&tap, DEFINED, &format!("primary.*.{worker_type}.#"))
        .await
        .unwrap();
    let (binding, mut message) = defined(1, &worker_type);
    message.status.task_id = "short".to_owned();
    let error = publisher.publish(&binding, &message).await.unwrap_err();
    assert!(
        matches!(error, PublishError::InvalidMessage { .. }),
        "{error:?}"
    );
    let (binding, message) = defined(2, &worker_type);
    publisher.publish(&binding, &message).await.unwrap();
    eventually("the valid message in the tap", || async {
        !broker.pending(&tap).await.unwrap().is_empty()
    })
    .await;
    let pending = broker.pending(&tap).await.unwrap();
    assert_eq!(pending.len(), 1, "only the valid message was sent");
    assert!(String::from_utf8_lossy(&pending[0].body).contains(&task_id(2)));
    delete_queues(&broker, &[&tap]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_queue_on_rabbitmq_delays_and_releases_without_delivering_early() {
    let broker = connect().await;
    let queue = WorkQueue::open(broker.clone(), &unique("client-wq"))
        .await
        .unwrap();
    let put_at = Instant::now();
    queue
        .put(
            QueueMessage::new("later").with_id("w1"),
            Duration::from_millis(600),
        )
        .await
        .unwrap();
    assert!(
        queue
            .get(Duration::from_millis(150))
            .await
            .unwrap()
            .is_none(),
        "delivered early"
    );
    let message = queue
        .get(EVENTUALLY)
        .await
        .unwrap()
        .expect("after the delay");
    assert!(
        put_at.elapsed() >= Duration::from_millis(600),
        "delivered early"
    );
    assert_eq!(message.message.message_id.as_deref(), Some("w1"));

    let released_at = Instant::now();
    queue
        .release(message, Duration::from_millis(500))
        .await
        .unwrap();
    assert!(
        queue
            .get(Duration::from_millis(150))
            .await
            .unwrap()
            .is_none(),
        "released early"
    );
    let again = queue
        .get(EVENTUALLY)
        .await
        .unwrap()
        .expect("released message");
    assert!(released_at.elapsed() >= Duration::from_millis(500));
    assert_eq!(again.attempts, 1);
    queue.dead_letter(again, "given up").await.unwrap();
    let dead = queue.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].headers[LAST_ERROR_HEADER], "given up");
    let (name, dead_name) = (
        queue.name().to_owned(),
        queue.dead_letter_queue().to_owned(),
    );
    delete_queues(&broker, &[&name, &dead_name]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_on_rabbitmq_retry_then_fail_with_the_last_error() {
    let broker = connect().await;
    let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let runs2 = Arc::clone(&runs);
    let jobs = Jobs::builder(broker.clone(), unique("client-jobs"))
        .register("ok", |_job: JobContext| async { Ok(()) })
        .register("fails", move |job: JobContext| {
            runs2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move { Err(HandlerError::msg(format!("run {} failed", job.retried))) }
        })
        .concurrency(2)
        .build()
        .await
        .unwrap();
    jobs.start().await.unwrap();
    let ok = jobs.enqueue(Job::new("ok", "a")).await.unwrap();
    let failing = jobs
        .enqueue(
            Job::new("fails", "b")
                .max_retries(2)
                .backoff(Duration::from_millis(100), Duration::from_millis(400)),
        )
        .await
        .unwrap();
    eventually("the ok job succeeds", || async {
        jobs.status(&ok).await.unwrap().unwrap().status == JobStatus::Successful
    })
    .await;
    eventually("the failing job fails for good", || async {
        jobs.status(&failing).await.unwrap().unwrap().status == JobStatus::Failed
    })
    .await;
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 3);
    let record = jobs.status(&failing).await.unwrap().unwrap();
    assert_eq!(record.last_error.as_deref(), Some("run 2 failed"));
    eventually("the failing job in the failed queue", || async {
        jobs.failed_messages().await.unwrap().len() == 1
    })
    .await;
    let failed = jobs.failed_messages().await.unwrap();
    assert_eq!(failed[0].id.as_ref(), Some(&failing));
    assert_eq!(failed[0].last_error.as_deref(), Some("run 2 failed"));
    jobs.stop().unwrap();
    jobs.wait().await;
    let (name, dead) = (
        jobs.queue().name().to_owned(),
        jobs.queue().dead_letter_queue().to_owned(),
    );
    delete_queues(&broker, &[&name, &dead]).await;
}
