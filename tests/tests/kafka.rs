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

/// An rskafka client of `k`, once it answers.
fn connect(rt: &tokio::runtime::Runtime, k: &Tansu) -> rskafka::client::Client {
    rt.block_on(async {
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
    })
}

#[test]
fn records_read_back_with_rskafka() {
    let k = tansu();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let topic = "rs-check";
    let client = connect(&rt, &k);
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

#[test]
fn records_produced_with_rskafka_reach_mqtt_subscribers() {
    use rskafka::client::partition::Compression;
    use rskafka::record::Record;
    let k = tansu();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let client = connect(&rt, &k);
    rt.block_on(client.controller_client().unwrap().create_topic("cmds", 1, 1, 5_000)).unwrap();
    let cfg = std::env::temp_dir().join(format!("sluice-k2m-{}.toml", std::process::id()));
    std::fs::write(
        &cfg,
        "[[kafka_to_mqtt]]\nname = \"cmds\"\ncluster = \"default\"\nkafka_topics = [\"cmds\"]\n\
         mqtt_topics = [\"devices/${key}/commands\"]\nqos = 1\nstart = \"earliest\"\n",
    )
    .unwrap();
    let b = Broker::start(&["--kafka", &k.bootstrap, "--config", cfg.to_str().unwrap()]);
    let mut subs: Vec<Client> = (0..2).map(|i| Client::v5(b.shard(i), &format!("dev-{i}"))).collect();
    for (i, s) in subs.iter_mut().enumerate() {
        s.subscribe(&format!("devices/dev-{i}/commands"), 1);
    }
    let pc = rt.block_on(client.partition_client("cmds", 0, UnknownTopicHandling::Retry)).unwrap();
    let records: Vec<Record> = (0..6)
        .map(|n| Record {
            key: Some(format!("dev-{}", n % 2).into_bytes()),
            value: Some(format!("c{n}").into_bytes()),
            headers: [("origin".to_string(), b"rskafka".to_vec())].into_iter().collect(),
            timestamp: rskafka::chrono::DateTime::from_timestamp_millis(1_700_000_000_000).unwrap(),
        })
        .collect();
    rt.block_on(pc.produce(records, Compression::NoCompression)).unwrap();
    for (i, s) in subs.iter_mut().enumerate() {
        for n in (0..6).filter(|n| n % 2 == i) {
            let p = s.next_publish();
            assert_eq!(
                (p.topic.as_str(), &p.payload[..], p.qos),
                (format!("devices/dev-{i}/commands").as_str(), format!("c{n}").as_bytes(), 1)
            );
            assert_eq!(p.properties.user_properties, vec![("origin".to_string(), "rskafka".to_string())]);
        }
    }
}
