//! MQTT → Kafka checked with rskafka as the consumer (the Python tests check with librdkafka).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rskafka::client::partition::{OffsetAt, UnknownTopicHandling};
use rskafka::client::ClientBuilder;
use sluice_core::bridge::partition_for_key;
use sluice_tests::*;

struct Tansu {
    child: Child,
    bootstrap: String,
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tansu() -> Tansu {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("tcp://127.0.0.1:{port}");
    let bin = std::env::var("HOME").map(|h| format!("{h}/.cargo/bin/tansu")).unwrap_or_else(|_| "tansu".into());
    let bin = if std::path::Path::new(&bin).exists() { bin } else { "tansu".into() };
    let child = Command::new(bin)
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
            "--storage-engine",
            "memory://tansu/",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tansu missing: scripts/install-test-deps installs it");
    Tansu { child, bootstrap: format!("127.0.0.1:{port}") }
}

#[test]
fn records_read_back_with_rskafka() {
    let k = tansu();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let topic = "rs-check";
    let client = rt.block_on(async {
        let deadline = Instant::now() + WAIT;
        loop {
            match ClientBuilder::new(vec![k.bootstrap.clone()]).build().await {
                Ok(c) => break c,
                Err(e) => {
                    assert!(Instant::now() < deadline, "tansu did not come up: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    rt.block_on(client.controller_client().unwrap().create_topic(topic, 4, 1, 5_000)).unwrap();

    let b = Broker::start(&["--kafka", &k.bootstrap, "--map", &format!("plant/#={topic}")]);
    let mut c = Client::v5(b.shard(1), "rs-pub");
    let topics = ["plant/a/temp", "plant/b/temp", "plant/c/pressure"];
    for (i, t) in topics.iter().enumerate() {
        for n in 0..5u8 {
            assert_eq!(c.publish(t, &[i as u8, n], 1, false), reason::SUCCESS);
        }
    }
    // Every acknowledged record is in Kafka, on the partition murmur2 picks for its key, in order.
    for (i, t) in topics.iter().enumerate() {
        let p = partition_for_key(t.as_bytes(), 4);
        let pc = rt.block_on(client.partition_client(topic, p, UnknownTopicHandling::Retry)).unwrap();
        let end = rt.block_on(pc.get_offset(OffsetAt::Latest)).unwrap();
        let (records, _) = rt.block_on(pc.fetch_records(0, 1..1_000_000, 1_000)).unwrap();
        assert!(end >= 5);
        let mine: Vec<_> = records.iter().filter(|r| r.record.key.as_deref() == Some(t.as_bytes())).collect();
        let values: Vec<Vec<u8>> = mine.iter().map(|r| r.record.value.clone().unwrap()).collect();
        assert_eq!(values, (0..5u8).map(|n| vec![i as u8, n]).collect::<Vec<_>>(), "{t} on partition {p}");
        assert_eq!(mine[0].record.headers.get("mqtt.topic").map(Vec::as_slice), Some(t.as_bytes()));
        assert_eq!(mine[0].record.headers.get("mqtt.client_id").map(Vec::as_slice), Some(&b"rs-pub"[..]));
    }
}
