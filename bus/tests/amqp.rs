//! `AmqpBus` against a real RabbitMQ (`amqp://guest:guest@127.0.0.1:5672/%2f`, or
//! `STRAIT_TEST_AMQP_URL`). Without a broker these tests fail, on purpose: CI has one.
//! Every test uses its own stream prefix, and a [`Cleanup`] guard deletes its streams when the
//! test ends, pass or fail.

// Test code: `clippy.toml` allows unwrap in tests, but only sees `#[test]` bodies, not the
// helpers of an integration-test crate.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use strait_bus::{delete_stream, AmqpBus, Bus, BusConfig, Error, MemoryOffsets, OffsetStore};
use strait_schema::{encode_envelope, AgentName, BusEnvelope, Data, Frame, Ping, StreamId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;

const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Generous: the CI box has 2 cores shared with other builds.
const DEADLINE: Duration = Duration::from_secs(60);

fn broker_url() -> String {
    std::env::var("STRAIT_TEST_AMQP_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

/// `host:port` of the broker, for the test proxy.
fn broker_addr() -> String {
    let url = broker_url();
    let after_at = url.rsplit('@').next().unwrap_or(&url);
    let host_port = after_at.trim_start_matches("amqp://").split('/').next().unwrap();
    host_port.to_owned()
}

fn unique_prefix(test: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    format!("strait-test.{test}.{}.{nanos}", std::process::id())
}

fn env(to: &str, i: u64) -> BusEnvelope {
    BusEnvelope {
        from_node: "ignored".into(),
        to_node: to.into(),
        seq: 0,
        trace_parent: String::new(),
        agent: AgentName::new("alpha").unwrap(),
        epoch: 1,
        frame: Frame::Ping(Ping { timestamp_ms: i }),
    }
}

fn index(e: &BusEnvelope) -> u64 {
    match e.frame {
        Frame::Ping(Ping { timestamp_ms }) => timestamp_ms,
        ref other => panic!("unexpected frame {other:?}"),
    }
}

/// Deletes the test's streams when dropped (also when the test panics), after stopping its
/// buses so no consumer re-declares a stream it sees deleted.
struct Cleanup {
    prefix: String,
    nodes: Vec<&'static str>,
    buses: Vec<AmqpBus>,
}

impl Cleanup {
    fn new(prefix: &str, nodes: &[&'static str]) -> Self {
        Cleanup {
            prefix: prefix.to_owned(),
            nodes: nodes.to_vec(),
            buses: Vec::new(),
        }
    }

    fn track(&mut self, bus: &AmqpBus) {
        self.buses.push(bus.clone());
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for bus in &self.buses {
            bus.abort();
        }
        let url = broker_url();
        let names: Vec<String> = self
            .nodes
            .iter()
            .map(|n| BusConfig::new(self.prefix.clone(), *n).stream_name(n))
            .collect();
        // Our own runtime on our own thread: this may run inside a panicking test's runtime.
        let deleted = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                for name in &names {
                    if let Err(e) = delete_stream(&url, name).await {
                        eprintln!("cleanup: could not delete stream {name}: {e}");
                    }
                }
            });
        })
        .join();
        if deleted.is_err() {
            eprintln!("cleanup thread panicked");
        }
    }
}

fn config(prefix: &str, node: &str) -> BusConfig {
    BusConfig::new(prefix, node)
}

async fn connect_to(url: &str, prefix: &str, node: &str, offsets: Arc<dyn OffsetStore>) -> AmqpBus {
    match AmqpBus::connect(url, config(prefix, node), offsets).await {
        Ok(bus) => bus,
        Err(e) => panic!(
            "RabbitMQ is required for these tests (at {url}; see STACK.md to start one): {e}; cause: {:?}",
            std::error::Error::source(&e)
        ),
    }
}

async fn connect(prefix: &str, node: &str, offsets: Arc<dyn OffsetStore>) -> AmqpBus {
    connect_to(&broker_url(), prefix, node, offsets).await
}

fn memory() -> Arc<MemoryOffsets> {
    Arc::new(MemoryOffsets::new())
}

/// Receives exactly `n` envelopes, failing the test if they do not come within [`DEADLINE`].
async fn recv_n(rx: &mut UnboundedReceiver<BusEnvelope>, n: usize) -> Vec<BusEnvelope> {
    let mut got = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while got.len() < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(e)) => got.push(e),
            Ok(None) => panic!("subscription closed after {} of {n} envelopes", got.len()),
            Err(_) => panic!("only {} of {n} envelopes arrived in {DEADLINE:?}", got.len()),
        }
    }
    got
}

/// Asserts nothing more arrives for a while (no late duplicates).
async fn assert_quiet(rx: &mut UnboundedReceiver<BusEnvelope>) {
    if let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
        panic!("unexpected extra envelope {} (seq {})", index(&e), e.seq);
    }
}

/// Asserts `got` is exactly envelopes `range`, in order, with strictly increasing seqs.
fn assert_exactly(got: &[BusEnvelope], range: std::ops::Range<u64>) {
    let idx: Vec<u64> = got.iter().map(index).collect();
    let want: Vec<u64> = range.collect();
    if idx != want {
        let first_bad = idx.iter().zip(&want).position(|(a, b)| a != b);
        panic!(
            "got {} envelopes, wanted {}; first difference at position {first_bad:?}",
            idx.len(),
            want.len()
        );
    }
    for w in got.windows(2) {
        assert!(
            w[1].seq > w[0].seq,
            "seq did not increase: {} then {}",
            w[0].seq,
            w[1].seq
        );
    }
}

async fn publish_range(bus: &AmqpBus, to: &str, range: std::ops::Range<u64>) {
    for i in range {
        bus.publish(env(to, i)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_envelopes_arrive_in_order_exactly_once_in_few_batches() {
    let prefix = unique_prefix("order");
    let mut cleanup = Cleanup::new(&prefix, &["a", "b"]);
    let a = connect(&prefix, "a", memory()).await;
    cleanup.track(&a);
    let b = connect(&prefix, "b", memory()).await;
    cleanup.track(&b);
    let mut rx = b.subscribe("b").await.unwrap();

    publish_range(&a, "b", 0..10_000).await;
    let got = recv_n(&mut rx, 10_000).await;
    assert_exactly(&got, 0..10_000);
    assert!(got.iter().all(|e| e.from_node == "a" && e.to_node == "b"));
    a.flush().await.unwrap();
    assert_quiet(&mut rx).await;

    let sa = a.stats_snapshot();
    let sb = b.stats_snapshot();
    eprintln!("sender {sa:?}\nreceiver {sb:?}");
    assert_eq!(sa.envelopes_queued, 10_000);
    assert_eq!(sa.envelopes_published, 10_000);
    assert_eq!(sa.batches_confirmed, sa.batches_published);
    assert!(
        sa.batches_published * 10 <= sa.envelopes_published,
        "batching should cut AMQP messages at least tenfold: {} batches for {} envelopes",
        sa.batches_published,
        sa.envelopes_published
    );
    assert_eq!(sb.envelopes_delivered, 10_000);
    assert_eq!(sb.duplicates_dropped, 0);
    assert_eq!(sb.malformed_dropped, 0);
}

/// A byte stream's envelope of `len` payload bytes to node `to`.
fn bulk(to: &str, len: usize) -> BusEnvelope {
    BusEnvelope {
        frame: Frame::Data(Data {
            stream: StreamId::random(),
            bytes: vec![7u8; len].into(),
        }),
        ..env(to, 0)
    }
}

/// Bulk envelopes wait for company even when their destination is idle (one AMQP message per
/// 64 KiB frame is what capped byte streams across nodes), while a small one to an idle node
/// still goes at once, and a full batch never waits out the linger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_envelopes_linger_into_one_batch_while_small_ones_go_at_once() {
    const LINGER: Duration = Duration::from_secs(3);
    let prefix = unique_prefix("bulk-linger");
    let mut cleanup = Cleanup::new(&prefix, &["a", "b"]);
    let mut cfg = config(&prefix, "a");
    cfg.linger = LINGER;
    cfg.bulk_batch_bytes = 16 << 10;
    cfg.max_batch_bytes = 128 << 10;
    let a = AmqpBus::connect(&broker_url(), cfg, memory()).await.unwrap();
    cleanup.track(&a);
    let b = connect(&prefix, "b", memory()).await;
    cleanup.track(&b);
    let mut rx = b.subscribe("b").await.unwrap();

    let started = Instant::now();
    a.publish(env("b", 1)).await.unwrap();
    recv_n(&mut rx, 1).await;
    assert!(started.elapsed() < LINGER, "a small envelope to an idle node lingered");
    a.flush().await.unwrap();
    let batches = a.stats_snapshot().batches_published;

    // Two bulk envelopes 100 ms apart, the destination idle all along: one batch, after the linger.
    let started = Instant::now();
    a.publish(bulk("b", 20 << 10)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.publish(bulk("b", 20 << 10)).await.unwrap();
    recv_n(&mut rx, 2).await;
    assert!(
        started.elapsed() >= LINGER,
        "a bulk batch went before it was full or had lingered"
    );
    assert_eq!(
        a.stats_snapshot().batches_published,
        batches + 1,
        "bulk envelopes were not batched"
    );

    // Enough bulk to fill a batch: the full one goes at once, the rest lingers.
    let started = Instant::now();
    for _ in 0..7 {
        a.publish(bulk("b", 20 << 10)).await.unwrap();
    }
    recv_n(&mut rx, 6).await;
    assert!(started.elapsed() < LINGER, "a full batch waited for the linger");
    recv_n(&mut rx, 1).await;
    assert!(started.elapsed() >= LINGER, "the remainder went before it had lingered");
    assert_eq!(a.stats_snapshot().batches_published, batches + 3);
    assert_quiet(&mut rx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_consumer_continues_right_after_the_last_delivered_envelope() {
    let prefix = unique_prefix("restart-consumer");
    let mut cleanup = Cleanup::new(&prefix, &["a", "b"]);
    let offsets = memory();
    let a = connect(&prefix, "a", memory()).await;
    cleanup.track(&a);
    let b1 = connect(&prefix, "b", offsets.clone()).await;
    cleanup.track(&b1);
    let mut rx1 = b1.subscribe("b").await.unwrap();

    publish_range(&a, "b", 0..3_000).await;
    let mut first = recv_n(&mut rx1, 1_000).await;
    // Stop b mid-stream; everything handed to the channel is still readable, then it closes.
    b1.shutdown(Duration::from_secs(5)).await;
    while let Some(e) = rx1.recv().await {
        first.push(e);
    }
    let n1 = first.len() as u64;
    assert_exactly(&first, 0..n1);
    let stream = b1.config().stream_name("b");
    assert!(
        offsets.offset(&stream).is_some(),
        "the last delivered offset was stored"
    );

    publish_range(&a, "b", 3_000..6_000).await;
    a.flush().await.unwrap();

    // A new process for node b, same offset store.
    let b2 = connect(&prefix, "b", offsets.clone()).await;
    cleanup.track(&b2);
    let mut rx2 = b2.subscribe("b").await.unwrap();
    let second = recv_n(&mut rx2, (6_000 - n1) as usize).await;
    assert_exactly(&second, n1..6_000);
    assert_quiet(&mut rx2).await;

    // Dropping the receiver ends the subscription; subscribing again goes on after it.
    drop(rx2);
    let mut rx3 = b2.subscribe("b").await.unwrap();
    publish_range(&a, "b", 6_000..6_100).await;
    let third = recv_n(&mut rx3, 100).await;
    assert_exactly(&third, 6_000..6_100);
    assert_quiet(&mut rx3).await;
}

/// A TCP proxy the test controls: `mute_replies` swallows everything the broker sends (so
/// publishes land but their confirms never come back), `cut` closes every proxied connection and
/// refuses new ones until `restore`.
struct Proxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    muted: Arc<AtomicBool>,
    conns: Arc<parking_lot::Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let muted = Arc::new(AtomicBool::new(false));
        let conns: Arc<parking_lot::Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn({
            let (up, muted, conns) = (up.clone(), muted.clone(), conns.clone());
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    let (upstream, muted) = (upstream.clone(), muted.clone());
                    conns.lock().push(tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(&upstream).await else {
                            return;
                        };
                        let (mut client_rd, mut client_wr) = client.into_split();
                        let (mut server_rd, mut server_wr) = server.into_split();
                        let requests = tokio::io::copy(&mut client_rd, &mut server_wr);
                        let replies = async {
                            let mut buf = vec![0u8; 64 << 10];
                            loop {
                                let n = match server_rd.read(&mut buf).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => n,
                                };
                                if !muted.load(Ordering::SeqCst) && client_wr.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        };
                        tokio::select! {
                            _ = requests => {}
                            _ = replies => {}
                        }
                    }));
                }
            }
        });
        Proxy {
            addr,
            up,
            muted,
            conns,
            accept,
        }
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    fn mute_replies(&self) {
        self.muted.store(true, Ordering::SeqCst);
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for conn in self.conns.lock().drain(..) {
            conn.abort();
        }
    }

    fn restore(&self) {
        self.muted.store(false, Ordering::SeqCst);
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outages_of_sender_and_receiver_lose_and_duplicate_nothing() {
    let prefix = unique_prefix("outage");
    let mut cleanup = Cleanup::new(&prefix, &["a", "b"]);
    let proxy_a = Proxy::start(broker_addr()).await;
    let proxy_b = Proxy::start(broker_addr()).await;
    let a = connect_to(&proxy_a.url(), &prefix, "a", memory()).await;
    cleanup.track(&a);
    let b = connect_to(&proxy_b.url(), &prefix, "b", memory()).await;
    cleanup.track(&b);
    let mut rx = b.subscribe("b").await.unwrap();

    publish_range(&a, "b", 0..1_000).await;
    let mut got = recv_n(&mut rx, 1_000).await;

    // The sender's confirms stop coming back while its batches still reach the stream: after
    // the cut it must send them again, and the receiver must drop the copies. (Flush first, so
    // exactly the next 1,000 envelopes are the unconfirmed ones.)
    a.flush().await.unwrap();
    proxy_a.mute_replies();
    publish_range(&a, "b", 1_000..2_000).await;
    got.extend(recv_n(&mut rx, 1_000).await);
    proxy_a.cut();
    publish_range(&a, "b", 2_000..3_000).await; // queued while the broker is out of reach
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy_a.restore();
    got.extend(recv_n(&mut rx, 1_000).await);

    // Cut the receiver mid-stream while the sender keeps going.
    publish_range(&a, "b", 3_000..4_000).await;
    proxy_b.cut();
    publish_range(&a, "b", 4_000..5_000).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy_b.restore();
    got.extend(recv_n(&mut rx, 2_000).await);

    assert_exactly(&got, 0..5_000);
    a.flush().await.unwrap();
    assert_quiet(&mut rx).await;
    let (sa, sb) = (a.stats_snapshot(), b.stats_snapshot());
    eprintln!("sender {sa:?}\nreceiver {sb:?}");
    assert!(sa.reconnects >= 1, "the sender reconnected");
    assert!(sa.batches_republished >= 1, "unconfirmed batches were sent again");
    assert!(sb.reconnects >= 1, "the receiver reconnected");
    assert_eq!(
        sb.duplicates_dropped, 1_000,
        "every re-sent envelope was dropped as a duplicate"
    );
    assert_eq!(sa.envelopes_published, 5_000);
    assert_eq!(sb.envelopes_delivered, 5_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_sender_keeps_increasing_seqs_and_nothing_is_dropped() {
    let prefix = unique_prefix("restart-sender");
    let mut cleanup = Cleanup::new(&prefix, &["a", "b"]);
    let b = connect(&prefix, "b", memory()).await;
    cleanup.track(&b);
    let mut rx = b.subscribe("b").await.unwrap();

    let a1 = connect(&prefix, "a", memory()).await;
    cleanup.track(&a1);
    publish_range(&a1, "b", 0..1_000).await;
    a1.shutdown(Duration::from_secs(10)).await;
    assert!(matches!(a1.publish(env("b", 0)).await, Err(Error::Closed)));

    let a2 = connect(&prefix, "a", memory()).await;
    cleanup.track(&a2);
    publish_range(&a2, "b", 1_000..2_000).await;

    let got = recv_n(&mut rx, 2_000).await;
    assert_exactly(&got, 0..2_000); // also checks seqs increase across the restart
    a2.flush().await.unwrap();
    assert_quiet(&mut rx).await;
    assert_eq!(b.stats_snapshot().duplicates_dropped, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_dropped_and_counted_and_consumption_goes_on() {
    let prefix = unique_prefix("malformed");
    let mut cleanup = Cleanup::new(&prefix, &["a", "b"]);
    let a = connect(&prefix, "a", memory()).await;
    cleanup.track(&a);
    let b = connect(&prefix, "b", memory()).await;
    cleanup.track(&b);
    let mut rx = b.subscribe("b").await.unwrap();

    publish_range(&a, "b", 0..100).await;
    let mut got = recv_n(&mut rx, 100).await;

    let entry = |bytes: &[u8]| {
        let mut body = b"STB1".to_vec();
        body.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        body.extend_from_slice(bytes);
        body
    };
    let mut misaddressed = env("c", 999_999);
    misaddressed.from_node = "a".into();
    misaddressed.seq = u64::MAX; // would poison the dedup watermark if it were accepted
    let mut truncated = entry(b"0123456789");
    truncated.truncate(truncated.len() - 3);
    let garbage: Vec<Vec<u8>> = vec![
        b"definitely not a batch".to_vec(),
        truncated,
        entry(b"not cap'n proto at all, just text"),
        entry(&encode_envelope(&misaddressed)),
    ];
    let conn = Connection::connect(&broker_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let stream = b.config().stream_name("b");
    for body in &garbage {
        channel
            .basic_publish(
                "".into(),
                stream.as_str().into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default(),
            )
            .await
            .unwrap();
    }
    conn.close(200, "done".into()).await.unwrap();

    publish_range(&a, "b", 100..200).await;
    got.extend(recv_n(&mut rx, 100).await);
    assert_exactly(&got, 0..200);
    assert_eq!(b.stats_snapshot().malformed_dropped, 4);
}

#[tokio::test]
async fn connect_fails_clearly_when_the_broker_is_unreachable() {
    // Port 1 on loopback: nothing listens there.
    let err = AmqpBus::connect("amqp://guest:guest@127.0.0.1:1/%2f", config("x", "a"), memory())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Connect(_) | Error::Timeout(_)), "{err:?}");
    assert!(
        !err.to_string().contains("guest"),
        "the URL (with its password) stays out of errors"
    );
}

#[tokio::test]
async fn connect_refuses_a_bad_config_before_touching_the_network() {
    let bad = AmqpBus::connect("amqp://127.0.0.1:1/%2f", config("has space", "a"), memory()).await;
    assert!(matches!(bad, Err(Error::Config(_))));
    let bad = AmqpBus::connect("amqp://127.0.0.1:1/%2f", config("p", "no/slash"), memory()).await;
    assert!(matches!(bad, Err(Error::Config(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_subscription_to_the_same_node_is_refused() {
    let prefix = unique_prefix("double-sub");
    let mut cleanup = Cleanup::new(&prefix, &["b"]);
    let b = connect(&prefix, "b", memory()).await;
    cleanup.track(&b);
    let _rx = b.subscribe("b").await.unwrap();
    assert!(matches!(b.subscribe("b").await, Err(Error::AlreadySubscribed(_))));
    assert!(matches!(b.publish(env("no/such", 1)).await, Err(Error::NoSuchNode(_))));
}

/// Figures for the notes: throughput and publish→deliver latency of small envelopes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run with --ignored --nocapture"]
async fn measure_throughput_and_latency() {
    let prefix = unique_prefix("measure");
    let mut cleanup = Cleanup::new(&prefix, &["a", "b"]);
    let a = connect(&prefix, "a", memory()).await;
    cleanup.track(&a);
    let b = connect(&prefix, "b", memory()).await;
    cleanup.track(&b);
    let mut rx = b.subscribe("b").await.unwrap();
    let mut next = 0u64;

    // Saturating: everything queued at once; the time until the last one arrives.
    const N: u64 = 100_000;
    let start = Instant::now();
    publish_range(&a, "b", next..next + N).await;
    recv_n(&mut rx, N as usize).await;
    let elapsed = start.elapsed();
    next += N;
    let s = a.stats_snapshot();
    println!(
        "saturating: {N} envelopes in {elapsed:.2?} = {:.0} envelopes/s, {:.0} envelopes per AMQP message",
        N as f64 / elapsed.as_secs_f64(),
        N as f64 / s.batches_published.max(1) as f64,
    );

    // Paced: a steady offered load, one burst per millisecond tick, for two seconds each.
    for per_ms in [1u64, 5, 20] {
        let before = a.stats_snapshot().batches_published;
        let total = per_ms * 2_000;
        let mut sent_at = Vec::with_capacity(total as usize);
        let mut lat = hdrhistogram::Histogram::<u64>::new(3).unwrap();
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        let first = next;
        let mut got = 0;
        while got < total {
            tokio::select! {
                _ = tick.tick(), if (sent_at.len() as u64) < total => {
                    for _ in 0..per_ms {
                        sent_at.push(Instant::now());
                        a.publish(env("b", next)).await.unwrap();
                        next += 1;
                    }
                }
                e = rx.recv() => {
                    let e = e.unwrap();
                    let i = (index(&e) - first) as usize;
                    lat.record(sent_at[i].elapsed().as_micros() as u64).unwrap();
                    got += 1;
                }
            }
        }
        let batches = a.stats_snapshot().batches_published - before;
        println!(
            "paced {:>6} envelopes/s: publish->deliver p50 {:>5} us, p99 {:>6} us, max {:>6} us; {:.1} envelopes per AMQP message",
            per_ms * 1000,
            lat.value_at_quantile(0.5),
            lat.value_at_quantile(0.99),
            lat.max(),
            total as f64 / batches.max(1) as f64
        );
    }
}
