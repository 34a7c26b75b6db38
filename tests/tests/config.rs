//! The binary's command line and config file: errors name the key, limits take effect.

use std::process::Command;

use sluice_tests::*;

fn sluice(args: &[&str]) -> std::process::Output {
    Command::new(sluice_bin()).args(args).output().expect("run sluice")
}

#[test]
fn generate_config_prints_a_file_that_loads() {
    let out = sluice(&["generate-config"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("[limits]") && text.contains("max_packet_size"));
    let path = std::env::temp_dir().join(format!("sluice-gen-{}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    let b = Broker::start(&["--config", path.to_str().unwrap()]);
    let mut c = Client::v311(b.addr, "from-generated-config");
    c.ping();
}

#[test]
fn bad_config_names_the_key_and_exits_non_zero() {
    let dir = std::env::temp_dir();
    for (text, key) in [
        ("[limits]\nmax_packet_size = 10\n", "limits.max_packet_size"),
        ("[limits]\nmax_pakcet_size = 10\n", "max_pakcet_size"),
        ("[server]\nlisten = \"nowhere\"\n", "server.listen"),
        ("[limits]\nqueue_full_policy = \"drop-random\"\n", "queue_full_policy"),
        ("[kafka]\nqos0_when_backlogged = \"drop-all\"\n", "qos0_when_backlogged"),
        (
            "[kafka.clusters.c]\nbootstrap = [\"127.0.0.1:1\"]\n[[kafka_to_mqtt]]\nname = \"t\"\ncluster = \"c\"\nkafka_topic_pattern = \"a(\"\nmqtt_topics = [\"x\"]\n",
            "kafka_topic_pattern",
        ),
        ("[server\n", ""),
    ] {
        let path = dir.join(format!("sluice-bad-{}-{}.toml", std::process::id(), key.len()));
        std::fs::write(&path, text).unwrap();
        let out = sluice(&["--config", path.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {err}");
        assert!(err.contains(key), "{text}: error does not name `{key}`: {err}");
    }
    let out = sluice(&["--cores", "999"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cores"));
    let out = sluice(&["--cpuset", "1-x"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cpuset"));
}

#[test]
fn a_bad_flag_value_names_the_flag_and_lists_the_accepted_values() {
    for (flag, accepted) in
        [("--delivery", ["kafka-ack", "local-durable"]), ("--queue-full-policy", ["drop-newest", "drop-oldest"])]
    {
        let out = sluice(&[flag, "drop-random", "--listen", "127.0.0.1:0"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag}: {err}");
        assert!(err.contains(flag) && err.contains("drop-random"), "{flag}: {err}");
        for a in accepted {
            assert!(err.contains(a), "{flag}: `{a}` not listed: {err}");
        }
    }
    // --help lists them too, with the names the config file takes.
    let help = String::from_utf8(sluice(&["-h"]).stdout).unwrap();
    assert!(help.contains("[possible values: drop-newest, drop-oldest]"), "{help}");
    assert!(help.contains("[possible values: kafka-ack, local-durable]"), "{help}");
}

#[test]
fn help_documents_every_flag() {
    let out = sluice(&["--help"]);
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--listen",
        "--cores",
        "--cpuset",
        "--data-dir",
        "--config",
        "--max-packet-size",
        "--max-connections",
        "--max-inflight",
        "--max-queued-messages",
        "--queue-full-policy",
        "--max-keep-alive",
        "--shard-listen",
    ] {
        assert!(help.contains(flag), "--help does not mention {flag}");
    }
}

#[test]
fn topic_limits_from_the_config_file() {
    let path = std::env::temp_dir().join(format!("sluice-topics-{}.toml", std::process::id()));
    std::fs::write(&path, "[limits]\nmax_topic_levels = 3\nmax_topic_length = 16\n").unwrap();
    let b = Broker::start(&["--config", path.to_str().unwrap()]);
    let mut c = Client::v5(b.addr, "levels");
    let ack = c
        .subscribe_with(&[("a/b/c", SubOptions::default()), ("a/b/c/d", SubOptions::default())], Properties::default());
    assert_eq!(ack.codes, vec![0, reason::TOPIC_FILTER_INVALID]);
    c.publish("a/b/c", b"ok", 0, false);
    assert_eq!(&c.next_publish().payload[..], b"ok");
    c.publish("a-very-long-topic-name", b"x", 0, false);
    let got = c.until_closed();
    assert!(matches!(got.as_slice(), [Packet::Disconnect(d)] if d.code == reason::TOPIC_NAME_INVALID), "{got:?}");
}

#[test]
fn max_connections_is_enforced_with_quota_exceeded() {
    let b = Broker::start_with_cores(1, &["--max-connections", "2"]);
    let _a = Client::v5(b.addr, "a");
    let _b = Client::v5(b.addr, "b");
    let mut c = Client::open(b.addr, Version::V5);
    // The third connection is either refused at accept (closed) or at CONNECT with 0x97.
    c.send(&Packet::Connect(Box::new(connect_packet(Version::V5, "c", true))));
    match c.recv_within(WAIT) {
        Some(Some(Packet::ConnAck(a))) => assert_eq!(a.code, reason::QUOTA_EXCEEDED),
        Some(None) => {}
        other => panic!("third connection accepted: {other:?}"),
    }
}

#[test]
fn server_keep_alive_caps_the_client() {
    let b = Broker::start(&["--max-keep-alive", "60"]);
    let mut cp = connect_packet(Version::V5, "ka", true);
    cp.keep_alive = 120;
    let c = Client::connect(b.addr, cp);
    assert_eq!(c.connack.as_ref().unwrap().properties.server_keep_alive, Some(60));
    let mut cp = connect_packet(Version::V5, "ka2", true);
    cp.keep_alive = 30;
    let c = Client::connect(b.addr, cp);
    assert_eq!(c.connack.as_ref().unwrap().properties.server_keep_alive, None);
}
