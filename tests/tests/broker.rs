//! End-to-end broker behaviour with the Rust client: 3.1.1 and 5.0, across shards.

use std::time::Duration;

use bytes::Bytes;
use sluice_tests::*;

const V3: Version = Version::V311;
const V5: Version = Version::V5;

fn props() -> Properties {
    Properties::default()
}

#[test]
fn cross_shard_delivery_keeps_publisher_order_at_every_qos() {
    let b = Broker::start(&[]);
    for version in [V3, V5] {
        let mut sub = Client::connect(b.shard(1), connect_packet(version, "sub", true));
        for qos in 0..=2u8 {
            sub.subscribe(&format!("order/{qos}"), qos);
        }
        let mut publ = Client::connect(b.shard(0), connect_packet(version, "pub", true));
        for qos in 0..=2u8 {
            for i in 0..200u32 {
                publ.publish(&format!("order/{qos}"), &i.to_be_bytes(), qos, false);
            }
        }
        for qos in 0..=2u8 {
            for i in 0..200u32 {
                let p = sub.next_publish();
                assert_eq!(p.topic, format!("order/{qos}"));
                assert_eq!(p.qos, qos);
                assert_eq!(&p.payload[..], &i.to_be_bytes(), "qos {qos} message {i} out of order");
            }
        }
        sub.disconnect();
        publ.disconnect();
    }
}

#[test]
fn wildcards_dollar_topics_and_overlapping_subscriptions() {
    let b = Broker::start(&[]);
    let mut sub = Client::v311(b.shard(0), "wild");
    assert_eq!(sub.subscribe("a/+/c", 0).codes, vec![0]);
    assert_eq!(sub.subscribe("a/#", 2).codes, vec![2]);
    assert_eq!(sub.subscribe("#", 1).codes, vec![1]);
    let mut publ = Client::v311(b.shard(1), "p");
    publ.publish("$SYS/fake", b"no", 1, false);
    publ.publish("a/b/c", b"once", 2, false);
    let p = sub.next_publish();
    // One delivery at the highest granted QoS of the overlapping filters; `$` topic not matched by `#`.
    assert_eq!((p.topic.as_str(), &p.payload[..], p.qos), ("a/b/c", &b"once"[..], 2));
    publ.publish("marker", b"m", 0, false);
    assert_eq!(sub.next_publish().topic, "marker");
    sub.expect_nothing(Duration::from_millis(200));
}

#[test]
fn retained_store_replace_clear_and_deliver_on_subscribe_across_shards() {
    let b = Broker::start(&[]);
    let mut publ = Client::v5(b.shard(0), "rp");
    // Many topics so both shards' partitions of the retained store are exercised.
    for i in 0..20 {
        publ.publish(&format!("ret/{i}"), b"first", 1, true);
        publ.publish(&format!("ret/{i}"), format!("v{i}").as_bytes(), 1, true);
    }
    publ.publish("ret/5", b"", 1, true); // clears
    let mut sub = Client::v5(b.shard(1), "rs");
    sub.subscribe("ret/#", 1);
    let mut got: Vec<(String, Vec<u8>, bool)> = (0..19)
        .map(|_| {
            let p = sub.next_publish();
            (p.topic, p.payload.to_vec(), p.retain)
        })
        .collect();
    got.sort();
    let mut want: Vec<(String, Vec<u8>, bool)> =
        (0..20).filter(|i| *i != 5).map(|i| (format!("ret/{i}"), format!("v{i}").into_bytes(), true)).collect();
    want.sort();
    assert_eq!(got, want);
    // A live retained publish reaches existing subscribers with retain cleared (3.1.1 rule and
    // MQTT 5 without Retain As Published).
    publ.publish("ret/live", b"x", 0, true);
    let p = sub.next_publish();
    assert_eq!((p.topic.as_str(), p.retain), ("ret/live", false));
}

#[test]
fn retain_handling_and_retain_as_published() {
    let b = Broker::start(&[]);
    let mut publ = Client::v5(b.shard(0), "p");
    publ.publish("rh/t", b"kept", 0, true);
    let mut sub = Client::v5(b.shard(1), "s");
    let o = |rh: u8, rap: bool| SubOptions { qos: 0, no_local: false, retain_as_published: rap, retain_handling: rh };
    // Retain Handling 2: never send retained.
    sub.subscribe_with(&[("rh/+", o(2, false))], props());
    // Retain Handling 1: send only for a new subscription.
    sub.subscribe_with(&[("rh/#", o(1, true))], props());
    let p = sub.next_publish();
    assert!(p.retain && &p.payload[..] == b"kept");
    sub.subscribe_with(&[("rh/#", o(1, true))], props()); // exists now: nothing
    publ.publish("rh/t", b"live", 0, true);
    let p = sub.next_publish();
    // Overlap of "rh/+" (no RAP) and "rh/#" (RAP): retain flag kept as published.
    assert!(p.retain && &p.payload[..] == b"live");
    sub.expect_nothing(Duration::from_millis(200));
}

#[test]
fn persistent_session_queues_offline_and_resumes_on_other_shard() {
    let b = Broker::start(&[]);
    for version in [V3, V5] {
        let id = format!("persist-{version:?}");
        let mut c = connect_packet(version, &id, false);
        c.properties.session_expiry_interval = version.is_v5().then_some(300);
        let mut sub = Client::connect(b.shard(0), c.clone());
        sub.subscribe("q/#", 1);
        sub.disconnect();
        let mut publ = Client::connect(b.shard(1), connect_packet(version, "qp", true));
        for i in 0..50u32 {
            publ.publish("q/x", &i.to_be_bytes(), 1, false);
        }
        publ.publish("q/x", b"qos0 is not queued", 0, false);
        let mut c2 = c.clone();
        c2.clean_start = false;
        let mut sub = Client::open(b.shard(1), version);
        let ack = sub.handshake(c2);
        assert!(ack.session_present, "{version:?}: session must survive on the other shard");
        for i in 0..50u32 {
            let p = sub.next_publish();
            assert_eq!(&p.payload[..], &i.to_be_bytes());
        }
        publ.publish("q/x", b"after", 1, false);
        assert_eq!(&sub.next_publish().payload[..], b"after");
        sub.disconnect();
        publ.disconnect();
    }
}

#[test]
fn unacknowledged_qos1_and_qos2_are_redelivered_with_dup() {
    let b = Broker::start(&[]);
    let c = connect_packet(V3, "dup", false);
    let mut sub = Client::connect(b.shard(0), c.clone());
    sub.subscribe("d/#", 2);
    let mut publ = Client::v311(b.shard(1), "dp");
    publ.publish("d/1", b"one", 1, false);
    publ.publish("d/2", b"two", 2, false);
    // Receive both, acknowledge neither, drop the connection.
    let first = match sub.recv() {
        Some(Packet::Publish(p)) => p,
        o => panic!("{o:?}"),
    };
    let second = match sub.recv() {
        Some(Packet::Publish(p)) => p,
        o => panic!("{o:?}"),
    };
    assert!(!first.dup && !second.dup);
    sub.kill();
    let mut sub = Client::open(b.shard(1), V3);
    assert!(sub.handshake(c).session_present);
    let again: Vec<Publish> = (0..2)
        .map(|_| match sub.recv() {
            Some(Packet::Publish(p)) => p,
            o => panic!("{o:?}"),
        })
        .collect();
    assert!(again.iter().all(|p| p.dup));
    assert_eq!(again[0].packet_id, first.packet_id);
    assert_eq!(again[1].packet_id, second.packet_id);
    assert_eq!(&again[1].payload[..], b"two");
    // Finish QoS 2 properly: PUBREC → PUBREL → PUBCOMP.
    sub.ack(&again[0]);
    sub.ack(&again[1]);
    match sub.recv() {
        Some(Packet::PubRel(r)) => assert_eq!(r.packet_id, second.packet_id),
        o => panic!("{o:?}"),
    }
}

#[test]
fn incoming_qos2_resend_is_not_delivered_twice() {
    let b = Broker::start(&[]);
    let mut sub = Client::v5(b.shard(1), "s");
    sub.subscribe("x", 2);
    let mut publ = Client::v5(b.shard(0), "p");
    let p = Publish {
        dup: false,
        qos: 2,
        retain: false,
        topic: "x".into(),
        packet_id: 7,
        properties: props().into(),
        payload: Bytes::from_static(b"m"),
    };
    publ.send(&Packet::Publish(p.clone()));
    assert!(matches!(publ.recv(), Some(Packet::PubRec(_))));
    publ.send(&Packet::Publish(Publish { dup: true, ..p }));
    assert!(matches!(publ.recv(), Some(Packet::PubRec(_))));
    publ.send(&Packet::PubRel(PubResp { packet_id: 7, code: 0, properties: props() }));
    assert!(matches!(publ.recv(), Some(Packet::PubComp(r)) if r.code == 0));
    assert_eq!(&sub.next_publish().payload[..], b"m");
    publ.publish("x", b"marker", 0, false);
    assert_eq!(&sub.next_publish().payload[..], b"marker");
}

#[test]
fn takeover_across_shards_closes_the_old_connection() {
    let b = Broker::start(&[]);
    let mut c = connect_packet(V5, "same", false);
    c.properties.session_expiry_interval = Some(60);
    let mut old = Client::connect(b.shard(0), c.clone());
    old.subscribe("take/#", 1);
    let mut new = Client::open(b.shard(1), V5);
    let ack = new.handshake(c);
    assert!(ack.session_present);
    let got = old.until_closed();
    assert!(
        matches!(got.as_slice(), [Packet::Disconnect(d)] if d.code == reason::SESSION_TAKEN_OVER),
        "old connection got {got:?}"
    );
    // The subscription moved with the session.
    let mut publ = Client::v5(b.shard(0), "tp");
    publ.publish("take/1", b"moved", 1, false);
    assert_eq!(&new.next_publish().payload[..], b"moved");
    // Same-shard takeover, 3.1.1: the old connection is just closed.
    let mut a = Client::connect(b.shard(0), connect_packet(V3, "same3", true));
    let _b2 = Client::connect(b.shard(0), connect_packet(V3, "same3", true));
    assert!(a.until_closed().is_empty());
}

#[test]
fn will_on_abnormal_disconnect_not_on_clean_one() {
    let b = Broker::start(&[]);
    let mut watcher = Client::v311(b.shard(1), "w");
    watcher.subscribe("will/#", 1);
    for version in [V3, V5] {
        let mut c = connect_packet(version, &format!("dies-{version:?}"), true);
        c.will = Some(Will {
            topic: "will/gone".into(),
            payload: Bytes::from_static(b"bye"),
            qos: 1,
            retain: false,
            properties: props(),
        });
        let dies = Client::connect(b.shard(0), c.clone());
        dies.kill();
        let p = watcher.next_publish();
        assert_eq!((p.topic.as_str(), &p.payload[..]), ("will/gone", &b"bye"[..]));
        c.client_id = format!("clean-{version:?}");
        Client::connect(b.shard(0), c).disconnect();
    }
    let mut publ = Client::v311(b.shard(0), "marker");
    publ.publish("will/marker", b"m", 1, false);
    assert_eq!(watcher.next_publish().topic, "will/marker", "clean DISCONNECT must not send the will");
}

#[test]
fn v5_disconnect_with_will_and_will_delay() {
    let b = Broker::start(&[]);
    let mut watcher = Client::v5(b.shard(1), "w");
    watcher.subscribe("wd/#", 1);
    let mut c = connect_packet(V5, "delayed", true);
    let mut wp = props();
    wp.will_delay_interval = Some(1);
    c.properties.session_expiry_interval = Some(60);
    c.will = Some(Will {
        topic: "wd/late".into(),
        payload: Bytes::from_static(b"late"),
        qos: 0,
        retain: false,
        properties: wp,
    });
    // Reconnecting within the delay cancels the will.
    Client::connect(b.shard(0), c.clone()).kill();
    let mut again = c.clone();
    again.clean_start = false;
    again.will = None;
    let back = Client::connect(b.shard(1), again);
    watcher.expect_nothing(Duration::from_millis(1500));
    // Disconnect with reason 0x04 sends the will (after its delay).
    let mut back = back;
    back.send(&Packet::Disconnect(Disconnect { code: reason::DISCONNECT_WITH_WILL, properties: props() }));
    // The session had no will any more (the reconnect carried none), so connect one that does.
    let _ = back.until_closed();
    let mut c2 = c.clone();
    c2.client_id = "withwill".into();
    c2.will.as_mut().unwrap().properties.will_delay_interval = None;
    let mut w = Client::connect(b.shard(0), c2);
    w.send(&Packet::Disconnect(Disconnect { code: reason::DISCONNECT_WITH_WILL, properties: props() }));
    let p = watcher.next_publish();
    assert_eq!(&p.payload[..], b"late");
    // A delayed will fires after its delay when the client does not come back.
    let mut c3 = c.clone();
    c3.client_id = "gone-for-good".into();
    Client::connect(b.shard(0), c3).kill();
    let p = watcher.next_publish();
    assert_eq!(p.topic, "wd/late");
}

#[test]
fn keep_alive_expiry_closes_with_0x8d_and_sends_will() {
    let b = Broker::start(&[]);
    let mut watcher = Client::v5(b.shard(0), "w");
    watcher.subscribe("ka/#", 0);
    let mut c = connect_packet(V5, "sleepy", true);
    c.keep_alive = 1;
    c.will = Some(Will {
        topic: "ka/dead".into(),
        payload: Bytes::from_static(b"timeout"),
        qos: 0,
        retain: false,
        properties: props(),
    });
    let mut sleepy = Client::connect(b.shard(1), c);
    let got = sleepy.until_closed();
    assert!(matches!(got.as_slice(), [Packet::Disconnect(d)] if d.code == reason::KEEP_ALIVE_TIMEOUT), "{got:?}");
    assert_eq!(&watcher.next_publish().payload[..], b"timeout");
}

#[test]
fn connect_validation_and_connack_codes() {
    let b = Broker::start(&[]);
    // 3.1.1: empty client id needs clean session.
    let mut c = Client::open(b.addr, V3);
    let ack = c.handshake(connect_packet(V3, "", false));
    assert_eq!(ack.code, reason::CLIENT_IDENTIFIER_NOT_VALID);
    assert!(c.until_closed().is_empty());
    let mut c = Client::open(b.addr, V3);
    assert_eq!(c.handshake(connect_packet(V3, "", true)).code, 0);
    // 5.0: empty client id gets an assigned one.
    let mut c = Client::open(b.addr, V5);
    let ack = c.handshake(connect_packet(V5, "", true));
    assert!(ack.properties.assigned_client_identifier.as_deref().is_some_and(|s| !s.is_empty()));
    assert_eq!(ack.properties.receive_maximum, Some(64));
    assert_eq!(ack.properties.shared_subscription_available, Some(1));
    // Unsupported protocol level: 3.1.1-form CONNACK 0x01 and close.
    let mut c = Client::open(b.addr, V3);
    c.send_raw(&[0x10, 0x0C, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x06, 0x02, 0x00, 0x3C, 0x00, 0x00]);
    match c.recv() {
        Some(Packet::ConnAck(a)) => assert_eq!(a.code, reason::UNSUPPORTED_PROTOCOL_VERSION),
        o => panic!("{o:?}"),
    }
    // Unknown AUTH method.
    let mut cp = connect_packet(V5, "auth", true);
    cp.properties.authentication_method = Some("SCRAM-SHA-1".into());
    let mut c = Client::open(b.addr, V5);
    assert_eq!(c.handshake(cp).code, reason::BAD_AUTHENTICATION_METHOD);
    assert!(c.until_closed().is_empty());
    // First packet not CONNECT: closed without answer.
    let mut c = Client::open(b.addr, V3);
    c.send(&Packet::PingReq);
    assert!(c.until_closed().is_empty());
    // Second CONNECT: protocol error.
    let mut c = Client::v5(b.addr, "twice");
    c.send(&Packet::Connect(Box::new(connect_packet(V5, "twice", true))));
    let got = c.until_closed();
    assert!(matches!(got.as_slice(), [Packet::Disconnect(d)] if d.code == reason::PROTOCOL_ERROR), "{got:?}");
}

#[test]
fn malformed_packets_close_only_that_connection() {
    let b = Broker::start(&["--max-packet-size", "1024"]);
    let mut bystander = Client::v5(b.shard(1), "bystander");
    bystander.subscribe("ok", 0);
    let cases: &[(&[u8], u8)] = &[
        (&[0x36, 0x02, 0x00, 0x00], reason::MALFORMED_PACKET),     // QoS 3
        (&[0x82, 0x03, 0x00, 0x01, 0x00], reason::PROTOCOL_ERROR), // SUBSCRIBE without filters
        (&[0x80, 0x02, 0x00, 0x01], reason::MALFORMED_PACKET),     // SUBSCRIBE reserved flags
        (&[0x30, 0x05, 0x00, 0x09, b'a', 0x00, 0x00], reason::MALFORMED_PACKET), // topic length past end
        (&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F], reason::MALFORMED_PACKET), // 5-byte length
        (&[0x30, 0x04, 0x00, 0x02, 0xC3, 0x28, 0x00], reason::MALFORMED_PACKET), // invalid UTF-8 topic (+props)
        (&[0x30, 0x90, 0x4E], reason::PACKET_TOO_LARGE),           // 10000 bytes
        (&[0x30, 0x05, 0x00, 0x01, b'+', 0x00, b'x'], reason::TOPIC_NAME_INVALID), // wildcard in topic
        (&[0x00, 0x00], reason::MALFORMED_PACKET),                 // reserved type 0
    ];
    for (i, (raw, code)) in cases.iter().enumerate() {
        let mut c = Client::v5(b.shard(i % 2), &format!("bad{i}"));
        c.send_raw(raw);
        let got = c.until_closed();
        assert!(
            matches!(got.as_slice(), [Packet::Disconnect(d)] if d.code == *code),
            "case {i} {raw:02x?}: expected DISCONNECT {code:#04x}, got {got:?}"
        );
        // 3.1.1: closed without a DISCONNECT.
        let mut c = Client::v311(b.shard(i % 2), &format!("bad3-{i}"));
        c.send_raw(raw);
        assert!(c.until_closed().is_empty(), "case {i} on 3.1.1");
    }
    let mut p = Client::v5(b.shard(0), "p");
    p.publish("ok", b"still here", 0, false);
    assert_eq!(&bystander.next_publish().payload[..], b"still here");
}

#[test]
fn subscription_limits_and_invalid_filters() {
    let b = Broker::start(&["--max-subscriptions-per-session", "2"]);
    let mut c = Client::v5(b.addr, "lim");
    let q = SubOptions { qos: 1, ..Default::default() };
    let ack = c.subscribe_with(&[("a", q), ("a/#/b", q), ("b", q), ("c", q), ("$share/g", q)], props());
    assert_eq!(
        ack.codes,
        vec![1, reason::TOPIC_FILTER_INVALID, 1, reason::QUOTA_EXCEEDED, reason::TOPIC_FILTER_INVALID]
    );
    match c.unsubscribe("zzz") {
        Packet::UnsubAck(u) => assert_eq!(u.codes, vec![reason::NO_SUBSCRIPTION_EXISTED]),
        o => panic!("{o:?}"),
    }
    match c.unsubscribe("a") {
        Packet::UnsubAck(u) => assert_eq!(u.codes, vec![0]),
        o => panic!("{o:?}"),
    }
    let mut c3 = Client::v311(b.addr, "lim3");
    assert_eq!(c3.subscribe("x/#/y", 0).codes, vec![0x80]);
}

#[test]
fn shared_subscriptions_balance_across_shards() {
    let b = Broker::start(&[]);
    let mut members: Vec<Client> = (0..4).map(|i| Client::v5(b.shard(i % 2), &format!("m{i}"))).collect();
    for m in &mut members {
        m.subscribe("$share/g/jobs/#", 1);
    }
    let mut plain = Client::v5(b.shard(0), "plain");
    plain.subscribe("jobs/#", 1);
    let mut publ = Client::v5(b.shard(1), "p");
    for i in 0..40u32 {
        publ.publish("jobs/x", &i.to_be_bytes(), 1, false);
    }
    // Every message once to the ordinary subscriber, once to exactly one group member.
    for i in 0..40u32 {
        assert_eq!(&plain.next_publish().payload[..], &i.to_be_bytes());
    }
    let mut total = 0;
    for m in &mut members {
        let mut n = 0;
        while let Some(Some(Packet::Publish(p))) = m.recv_within(Duration::from_millis(300)) {
            m.ack(&p);
            n += 1;
        }
        assert!(n >= 5, "member got {n} of 40: not balanced");
        total += n;
    }
    assert_eq!(total, 40);
}

#[test]
fn no_local_subscription_identifiers_and_properties_pass_through() {
    let b = Broker::start(&[]);
    let mut c = Client::v5(b.shard(0), "self");
    let mut sp = props();
    sp.subscription_identifiers = vec![42];
    c.subscribe_with(&[("nl/#", SubOptions { qos: 1, no_local: true, ..Default::default() })], sp);
    let mut sp = props();
    sp.subscription_identifiers = vec![7];
    let mut other = Client::v5(b.shard(1), "other");
    other.subscribe_with(&[("nl/t", SubOptions { qos: 1, ..Default::default() })], sp);
    let mut pp = props();
    pp.user_properties = vec![("k".into(), "v".into()), ("k".into(), "v2".into())];
    pp.response_topic = Some("nl/reply".into());
    pp.correlation_data = Some(Bytes::from_static(b"\x01\x02"));
    pp.content_type = Some("application/json".into());
    pp.payload_format_indicator = Some(1);
    c.publish_with("nl/t", b"{}", 1, false, pp.clone());
    let got = other.next_publish();
    assert_eq!(got.properties.user_properties, pp.user_properties);
    assert_eq!(got.properties.response_topic, pp.response_topic);
    assert_eq!(got.properties.correlation_data, pp.correlation_data);
    assert_eq!(got.properties.content_type, pp.content_type);
    assert_eq!(got.properties.payload_format_indicator, Some(1));
    assert_eq!(got.properties.subscription_identifiers, vec![7]);
    // No Local: the publisher's own subscription does not get it; others' publishes do.
    other.publish("nl/u/v", b"from other", 1, false);
    let p = c.next_publish();
    assert_eq!(&p.payload[..], b"from other");
    assert_eq!(p.properties.subscription_identifiers, vec![42]);
}

#[test]
fn topic_aliases_both_ways() {
    let b = Broker::start(&[]);
    let mut cp = connect_packet(V5, "alias-sub", true);
    cp.properties.topic_alias_maximum = Some(2);
    let mut sub = Client::connect(b.shard(1), cp);
    sub.subscribe("al/#", 0);
    let mut publ = Client::v5(b.shard(0), "alias-pub");
    let mut ap = props();
    ap.topic_alias = Some(1);
    publ.publish_with("al/long/topic", b"1", 0, false, ap.clone());
    publ.publish_with("", b"2", 0, false, ap); // by alias only
    let p1 = sub.next_publish();
    let p2 = sub.next_publish();
    assert_eq!((p1.topic.as_str(), p1.properties.topic_alias), ("al/long/topic", Some(1)));
    assert_eq!((p2.topic.as_str(), p2.properties.topic_alias, &p2.payload[..]), ("", Some(1), &b"2"[..]));
    // Unknown alias is a protocol error; alias above the maximum is 0x94.
    let mut ap = props();
    ap.topic_alias = Some(9);
    publ.publish_with("", b"x", 0, false, ap);
    let got = publ.until_closed();
    assert!(matches!(got.as_slice(), [Packet::Disconnect(d)] if d.code == reason::PROTOCOL_ERROR), "{got:?}");
    let mut publ = Client::v5(b.shard(0), "alias-pub2");
    let mut ap = props();
    ap.topic_alias = Some(1000);
    publ.publish_with("al/x", b"x", 0, false, ap);
    let got = publ.until_closed();
    assert!(matches!(got.as_slice(), [Packet::Disconnect(d)] if d.code == reason::TOPIC_ALIAS_INVALID), "{got:?}");
}

#[test]
fn client_exceeding_our_receive_maximum_is_disconnected_with_0x93() {
    let b = Broker::start(&["--max-inflight", "4"]);
    let mut c = Client::v5(b.addr, "greedy");
    assert_eq!(c.connack.as_ref().unwrap().properties.receive_maximum, Some(4));
    let qos2 = |pid| {
        Packet::Publish(Publish {
            dup: false,
            qos: 2,
            retain: false,
            topic: "rm/x".into(),
            packet_id: pid,
            properties: props().into(),
            payload: Bytes::from_static(b"x"),
        })
    };
    // QoS 2 without PUBREL: each stays unacknowledged on our side.
    for pid in 1..=4u16 {
        c.send(&qos2(pid));
        assert!(matches!(c.recv(), Some(Packet::PubRec(r)) if r.packet_id == pid));
    }
    c.send(&qos2(5));
    let got = c.until_closed();
    let last = got.last().unwrap();
    assert!(
        matches!(last, Packet::Disconnect(d) if d.code == reason::RECEIVE_MAXIMUM_EXCEEDED
            && d.properties.reason_string.as_deref() == Some("receive maximum exceeded")),
        "{got:?}"
    );
    assert!(!got.iter().any(|p| matches!(p, Packet::PubRec(_))), "{got:?}");
}

#[test]
fn receive_maximum_limits_messages_in_flight_to_a_client() {
    let b = Broker::start(&[]);
    let mut cp = connect_packet(V5, "slow", true);
    cp.properties.receive_maximum = Some(2);
    let mut sub = Client::connect(b.shard(0), cp);
    sub.subscribe("rm", 1);
    let mut publ = Client::v5(b.shard(1), "p");
    for i in 0..5u8 {
        publ.publish("rm", &[i], 1, false);
    }
    let first: Vec<Publish> = (0..2)
        .map(|_| match sub.recv() {
            Some(Packet::Publish(p)) => p,
            o => panic!("{o:?}"),
        })
        .collect();
    sub.expect_nothing(Duration::from_millis(300));
    sub.ack(&first[0]);
    let third = sub.next_publish();
    assert_eq!(&third.payload[..], &[2]);
    sub.ack(&first[1]);
    assert_eq!(&sub.next_publish().payload[..], &[3]);
    assert_eq!(&sub.next_publish().payload[..], &[4]);
}

/// More output than the kernel will buffer for a subscriber that stops reading: the broker keeps
/// what the socket did not take, writes it when the socket has room again, and serves its other
/// connections meanwhile. (64 in flight × 512 KiB is far more than loopback's socket buffers.)
#[test]
fn a_subscriber_that_stops_reading_gets_everything_intact_once_it_reads() {
    let b = Broker::start(&[]);
    let mut sub = Client::v5(b.shard(0), "stalled");
    sub.subscribe("bulk", 1);
    let mut publ = Client::v5(b.shard(0), "bulk-pub");
    let body = |i: usize| -> Vec<u8> { (0..512 * 1024).map(|j| (i * 31 + j / 4096) as u8).collect() };
    for i in 0..80 {
        // Each PUBACK means the broker took the message; meanwhile the subscriber reads nothing.
        assert_eq!(publ.publish("bulk", &body(i), 1, false), 0, "message {i}");
    }
    // Another client on the same core is served while the stalled one's output waits.
    let mut other = Client::v5(b.shard(0), "other");
    other.ping();
    for i in 0..80 {
        let p = sub.next_publish();
        assert!(p.payload[..] == body(i)[..], "message {i} arrived damaged or out of order");
    }
}

/// More connections on one core than a chunk of the connection slab holds (4,096), and slots
/// reused after closes: every connection, old slot or new, gets its own messages.
#[test]
fn thousands_of_connections_on_one_core_and_reused_slots() {
    let b = Broker::start_with_cores(1, &[]);
    let n = 4_300;
    let mut subs: Vec<Client> = (0..n)
        .map(|i| {
            let mut c = Client::v311(b.shard(0), &format!("dev-{i}"));
            c.subscribe(&format!("dev/{i}/cmd"), 0);
            c
        })
        .collect();
    let mut publ = Client::v311(b.shard(0), "ctl");
    // Close the first 1,000 (their slots go back to the free list) and reconnect them.
    for c in subs.drain(..1000) {
        c.disconnect();
    }
    let mut again: Vec<Client> = (0..1000)
        .map(|i| {
            let mut c = Client::v311(b.shard(0), &format!("dev-{i}"));
            c.subscribe(&format!("dev/{i}/cmd"), 0);
            c
        })
        .collect();
    again.append(&mut subs);
    for i in 0..n {
        publ.publish(&format!("dev/{i}/cmd"), format!("to {i}").as_bytes(), 0, false);
    }
    publ.ping(); // all published before any is read back
    for (i, c) in again.iter_mut().enumerate() {
        let p = c.next_publish();
        assert_eq!((p.topic.as_str(), &p.payload[..]), (format!("dev/{i}/cmd").as_str(), format!("to {i}").as_bytes()));
    }
}

#[test]
fn maximum_packet_size_both_ways() {
    let b = Broker::start(&["--max-packet-size", "200"]);
    let mut cp = connect_packet(V5, "small", true);
    cp.properties.maximum_packet_size = Some(64);
    let mut sub = Client::connect(b.shard(0), cp);
    assert_eq!(sub.connack.as_ref().unwrap().properties.maximum_packet_size, Some(200));
    sub.subscribe("mp", 0);
    let mut publ = Client::v5(b.shard(1), "p");
    publ.publish("mp", &[0u8; 100], 0, false); // too large for the subscriber: dropped
    publ.publish("mp", b"small", 0, false);
    assert_eq!(&sub.next_publish().payload[..], b"small");
    publ.publish("mp", &[0u8; 300], 0, false); // too large for the broker
    let got = publ.until_closed();
    assert!(matches!(got.as_slice(), [Packet::Disconnect(d)] if d.code == reason::PACKET_TOO_LARGE), "{got:?}");
}

#[test]
fn message_expiry_drops_stale_and_forwards_remaining_interval() {
    let b = Broker::start(&[]);
    let mut cp = connect_packet(V5, "exp", false);
    cp.properties.session_expiry_interval = Some(60);
    let mut sub = Client::connect(b.shard(0), cp.clone());
    sub.subscribe("ex/#", 1);
    sub.disconnect();
    let mut publ = Client::v5(b.shard(1), "p");
    let mut ep = props();
    ep.message_expiry_interval = Some(1);
    publ.publish_with("ex/short", b"stale", 1, false, ep);
    let mut ep = props();
    ep.message_expiry_interval = Some(100);
    publ.publish_with("ex/long", b"fresh", 1, false, ep);
    // Wait past the short expiry, then come back.
    std::thread::sleep(Duration::from_millis(1100));
    cp.clean_start = false;
    let mut sub = Client::connect(b.shard(1), cp);
    let p = sub.next_publish();
    assert_eq!(&p.payload[..], b"fresh");
    assert!(p.properties.message_expiry_interval.is_some_and(|s| (95..=100).contains(&s)));
}

#[test]
fn session_expiry_ends_the_session() {
    let b = Broker::start(&["--sys-interval", "1"]);
    let mut watch = Client::v311(b.shard(0), "watch");
    watch.subscribe("$SYS/broker/sessions", 0);
    let mut cp = connect_packet(V5, "brief", false);
    cp.properties.session_expiry_interval = Some(3);
    let mut c = Client::connect(b.shard(0), cp.clone());
    c.subscribe("se", 1);
    c.disconnect();
    // Sessions: the watcher's and, until it expires, "brief".
    wait_until("the offline session to be counted", || &watch.next_publish().payload[..] == b"2");
    wait_until("the session count to drop to the watcher's alone", || &watch.next_publish().payload[..] == b"1");
    let c = Client::connect(b.shard(1), cp);
    assert!(!c.connack.as_ref().unwrap().session_present);
}

#[test]
fn payload_format_invalid_is_refused_with_0x99() {
    let b = Broker::start(&[]);
    let mut c = Client::v5(b.addr, "pfi");
    let mut pp = props();
    pp.payload_format_indicator = Some(1);
    assert_eq!(c.publish_with("t", &[0xff, 0xfe], 1, false, pp.clone()), reason::PAYLOAD_FORMAT_INVALID);
    assert_eq!(c.publish_with("t", "ok ✓".as_bytes(), 1, false, pp), 0);
}

#[test]
fn auth_packet_without_method_is_a_protocol_error() {
    let b = Broker::start(&[]);
    let mut c = Client::v5(b.addr, "auth");
    c.send(&Packet::Auth(packet::Auth { code: reason::CONTINUE_AUTHENTICATION, properties: props() }));
    let got = c.until_closed();
    assert!(matches!(got.as_slice(), [Packet::Disconnect(d)] if d.code == reason::PROTOCOL_ERROR), "{got:?}");
}

#[test]
fn sys_topics_report_per_shard_and_totals() {
    let b = Broker::start(&["--sys-interval", "1"]);
    let mut c = Client::v311(b.shard(1), "sys");
    c.subscribe("$SYS/broker/clients/connected", 0);
    c.subscribe("$SYS/broker/shard/1/clients/connected", 0);
    let mut seen_total = false;
    let mut seen_shard = false;
    wait_until("both $SYS topics", || {
        let p = c.next_publish();
        let v: u64 = std::str::from_utf8(&p.payload).unwrap().parse().unwrap();
        if p.topic == "$SYS/broker/clients/connected" && v >= 1 {
            seen_total = true;
        }
        if p.topic == "$SYS/broker/shard/1/clients/connected" && v >= 1 {
            seen_shard = true;
        }
        seen_total && seen_shard
    });
}

#[test]
fn sigterm_shuts_down_cleanly_without_wills() {
    let b = Broker::start(&[]);
    let mut c = connect_packet(V5, "will-on-shutdown", true);
    c.will =
        Some(Will { topic: "w".into(), payload: Bytes::from_static(b"x"), qos: 0, retain: false, properties: props() });
    let mut client = Client::connect(b.shard(0), c);
    let code = b.terminate();
    assert_eq!(code, Some(0));
    let got = client.until_closed();
    assert!(matches!(got.as_slice(), [Packet::Disconnect(d)] if d.code == reason::SERVER_SHUTTING_DOWN), "{got:?}");
}

#[test]
fn mqttbytes_client_interoperates() {
    // An independent codec (mqttbytes 0.6, MQTT 3.1.1) against ours, over the wire.
    use mqttbytes::v4;
    use std::io::{Read, Write};
    let b = Broker::start(&[]);
    let mut sub = Client::v311(b.shard(1), "s");
    sub.subscribe("mb/#", 1);
    let mut s = std::net::TcpStream::connect(b.shard(0)).unwrap();
    let mut out = bytes::BytesMut::new();
    v4::Connect::new("mqttbytes").write(&mut out).unwrap();
    let mut p = v4::Publish::new("mb/x", mqttbytes::QoS::AtLeastOnce, b"hello".to_vec());
    p.pkid = 1;
    p.write(&mut out).unwrap();
    s.write_all(&out).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut inb = bytes::BytesMut::new();
    let mut got = Vec::new();
    while got.len() < 2 {
        let mut chunk = [0u8; 256];
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0);
        inb.extend_from_slice(&chunk[..n]);
        while let Ok(pk) = v4::read(&mut inb, 1 << 20) {
            got.push(pk);
        }
    }
    assert!(matches!(got[0], v4::Packet::ConnAck(ref a) if a.code == v4::ConnectReturnCode::Success));
    assert!(matches!(got[1], v4::Packet::PubAck(ref a) if a.pkid == 1));
    assert_eq!(&sub.next_publish().payload[..], b"hello");
}
