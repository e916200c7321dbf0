//! The Redis protocol endpoint with a real Redis client (the `redis` crate) against real nodes.

use std::io::{Read, Write};
use std::time::Duration;

use grex_tests::{GrexNode, TestCluster, job_wasm};
use redis::{Commands, Value};

fn error_text(e: redis::RedisError) -> String {
    e.to_string()
}

/// Runs blocking client code off the async test's threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("client code panicked")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_commands_jobs_and_modules_through_a_redis_client() {
    let dir = tempfile::tempdir().unwrap();
    let node = GrexNode::start(dir.path(), &["--resp", "127.0.0.1:0"]);
    let counter = job_wasm("counter");
    let counter_again = counter.clone();
    let url = node.resp.clone().expect("resp address");
    blocking(move || {
        let mut con = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
        let pong: String = redis::cmd("PING").query(&mut con).unwrap();
        assert_eq!(pong, "PONG");

        let added: i64 = redis::cmd("HSET")
            .arg("customer-1")
            .arg("name")
            .arg("Ada")
            .arg("city")
            .arg("London")
            .query(&mut con)
            .unwrap();
        assert_eq!(added, 2);
        let added: i64 = redis::cmd("HSET")
            .arg("customer-1")
            .arg("name")
            .arg("Ada L.")
            .arg("tier")
            .arg("gold")
            .query(&mut con)
            .unwrap();
        assert_eq!(added, 1, "one new field, one overwritten");
        let name: String = con.hget("customer-1", "name").unwrap();
        assert_eq!(name, "Ada L.");
        let missing: Option<String> = con.hget("customer-1", "nope").unwrap();
        assert_eq!(missing, None);
        let some: Vec<Option<String>> =
            redis::cmd("HMGET").arg("customer-1").arg("city").arg("nope").query(&mut con).unwrap();
        assert_eq!(some, vec![Some("London".to_string()), None]);
        let all: std::collections::BTreeMap<String, String> = con.hgetall("customer-1").unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all["tier"], "gold");
        let keys: Vec<String> = con.hkeys("customer-1").unwrap();
        assert_eq!(keys, vec!["city", "name", "tier"]);
        assert_eq!(con.hlen::<_, i64>("customer-1").unwrap(), 3);
        assert!(con.hexists::<_, _, bool>("customer-1", "city").unwrap());
        assert_eq!(con.hdel::<_, _, i64>("customer-1", &["city", "nope"]).unwrap(), 1);
        assert_eq!(con.exists::<_, i64>(&["customer-1", "customer-2"]).unwrap(), 1);
        assert_eq!(con.del::<_, i64>(&["customer-1", "customer-2"]).unwrap(), 1);
        assert_eq!(con.exists::<_, i64>("customer-1").unwrap(), 0);

        // Modules and jobs.
        let id: String = redis::cmd("GREX.MODULE").arg("LOAD").arg("counter").arg(counter).query(&mut con).unwrap();
        assert!(id.starts_with("sha256:"), "{id}");
        let count: String = redis::cmd("FCALL").arg("counter").arg(1).arg("hits").arg(5).query(&mut con).unwrap();
        assert_eq!(count, "5");
        let count: String = redis::cmd("FCALL").arg("counter").arg(1).arg("hits").arg(2).query(&mut con).unwrap();
        assert_eq!(count, "7");
        assert_eq!(con.hget::<_, _, String>("hits", "count").unwrap(), "7", "a job's items are hash fields");
        let e = redis::cmd("FCALL").arg("counter").arg(2).arg("a").arg("b").query::<String>(&mut con).unwrap_err();
        assert!(error_text(e).contains("numkeys must be 1"));
        let e = redis::cmd("FCALL").arg("nothing-here").arg(1).arg("a").query::<String>(&mut con).unwrap_err();
        assert!(error_text(e).contains("module_not_found"));
        let e = redis::cmd("FCALL_RO").arg("counter").arg(1).arg("hits").arg(1).query::<String>(&mut con).unwrap_err();
        assert!(error_text(e).contains("read"), "a read-only call cannot write");
        let canary: Value = redis::cmd("GREX.CANARY").arg("hits").query(&mut con).unwrap();
        assert!(format!("{canary:?}").contains("leader"), "{canary:?}");

        // Redis-style errors for what is not there, and the connection goes on.
        let e = redis::cmd("SET").arg("k").arg("v").query::<String>(&mut con).unwrap_err();
        assert!(error_text(e).contains("unknown command 'SET'"));
        let e = redis::cmd("HGET").arg("only-key").query::<String>(&mut con).unwrap_err();
        assert!(error_text(e).contains("wrong number of arguments for 'hget'"));
        let e = redis::cmd("HSET").arg("k").arg(&[0xff_u8, 0xfe][..]).arg("v").query::<i64>(&mut con).unwrap_err();
        assert!(error_text(e).contains("UTF-8"), "hash fields are item keys");

        // Pipelining: many commands written at once, answered in order.
        let mut pipe = redis::pipe();
        for i in 0..100 {
            pipe.cmd("HSET").arg("piped").arg(format!("f{i:03}")).arg(i);
        }
        pipe.cmd("HLEN").arg("piped");
        let answers: Vec<i64> = pipe.query(&mut con).unwrap();
        assert_eq!(answers.len(), 101);
        assert_eq!(answers[100], 100);

        // A pipeline over many keys (they run at once) reads what it wrote, in order; a module
        // loaded in a pipeline is there for the job after it.
        let mut pipe = redis::pipe();
        for i in 0..50 {
            pipe.cmd("HSET").arg(format!("spread-{i}")).arg("v").arg(i);
            pipe.cmd("FCALL").arg("counter").arg(1).arg(format!("spread-{i}")).arg(i);
            pipe.cmd("HGET").arg(format!("spread-{i}")).arg("v");
        }
        pipe.cmd("GREX.MODULE").arg("LOAD").arg("counter-again").arg(counter_again);
        pipe.cmd("FCALL").arg("counter-again").arg(1).arg("spread-0").arg(5);
        let answers: Vec<Value> = pipe.query(&mut con).unwrap();
        for i in 0..50 {
            let [set, count, get] = &answers[3 * i..3 * i + 3] else { unreachable!() };
            assert_eq!(set, &Value::Int(1), "HSET spread-{i}");
            assert_eq!(redis::from_redis_value::<String>(count).unwrap(), i.to_string(), "FCALL on spread-{i}");
            assert_eq!(redis::from_redis_value::<usize>(get).unwrap(), i, "HGET spread-{i}");
        }
        assert_eq!(redis::from_redis_value::<String>(&answers[151]).unwrap(), "5");
    })
    .await;
}

/// A key whose flock another executor shard runs than `key`'s (of `shards`, 256 flocks).
fn key_on_another_shard(key: &str, shards: u32) -> String {
    let shard = |k: &str| grex_client::proto::flock_of(k.as_bytes(), 256) % shards;
    (0..).map(|i| format!("other-{i}")).find(|k| shard(k) != shard(key)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_commands_on_other_keys_do_not_wait_for_a_slow_one() {
    let dir = tempfile::tempdir().unwrap();
    // A spinning job holds its executor shard until the 10 s deadline.
    let node = GrexNode::start(dir.path(), &["--resp", "127.0.0.1:0", "--shards", "2", "--timeout-ms", "10000"]);
    let url = node.resp.clone().expect("resp address");
    let addr = url.trim_start_matches("redis://").to_owned();
    let hostile = job_wasm("hostile");
    blocking(move || {
        let mut con = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
        let _: String = redis::cmd("GREX.MODULE").arg("LOAD").arg("hostile").arg(hostile).query(&mut con).unwrap();
        let other = key_on_another_shard("slow", 2);
        let mut piped = std::net::TcpStream::connect(&addr).unwrap();
        let pipeline = format!("FCALL hostile 1 slow loop\r\nHSET {other} f after-slow\r\nHSET slow f after-slow\r\n");
        piped.write_all(pipeline.as_bytes()).unwrap();

        // The write to the other key is done while the slow job still runs ...
        grex_tests::wait_until("the pipelined write to another key", Duration::from_secs(8), || {
            con.hget::<_, _, Option<String>>(&other, "f").unwrap().is_some()
        });
        // ... but its reply waits behind the slow job's, and the write to the slow job's own
        // key waits for the slow job.
        piped.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        let early = piped.read(&mut byte);
        assert!(
            matches!(&early, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a reply came before the slow job's: {early:?}"
        );
        assert_eq!(con.hget::<_, _, Option<String>>("slow", "f").unwrap(), None, "a command overtook one on its key");

        piped.set_nonblocking(false).unwrap();
        piped.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut answers = Vec::new();
        let mut chunk = [0u8; 1024];
        while answers.iter().filter(|&&b| b == b'\n').count() < 3 {
            let n = piped.read(&mut chunk).expect("the replies arrive");
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&answers));
            answers.extend_from_slice(&chunk[..n]);
        }
        let answers = String::from_utf8_lossy(&answers);
        let lines: Vec<&str> = answers.lines().collect();
        assert!(lines[0].starts_with("-ERR") && lines[0].contains("job_timeout"), "{answers}");
        assert_eq!(&lines[1..], [":1", ":1"], "{answers}");
        assert_eq!(con.hget::<_, _, String>("slow", "f").unwrap(), "after-slow");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp3_clients_get_maps_and_nulls() {
    let dir = tempfile::tempdir().unwrap();
    let node = GrexNode::start(dir.path(), &["--resp", "127.0.0.1:0"]);
    let url = format!("{}/?protocol=resp3", node.resp.clone().expect("resp address"));
    blocking(move || {
        let mut con = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
        let _: () = con.hset("r3", "a", "1").unwrap();
        let all: Value = redis::cmd("HGETALL").arg("r3").query(&mut con).unwrap();
        assert!(matches!(all, Value::Map(ref pairs) if pairs.len() == 1), "{all:?}");
        let none: Value = redis::cmd("HGET").arg("r3").arg("zz").query(&mut con).unwrap();
        assert_eq!(none, Value::Nil);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bytes_get_an_error_and_the_node_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let node = GrexNode::start(dir.path(), &["--resp", "127.0.0.1:0"]);
    let addr = node.resp.clone().expect("resp address").trim_start_matches("redis://").to_owned();
    let url = node.resp.clone().unwrap();
    blocking(move || {
        for bad in [&b"*1\r\n$99999999999\r\n"[..], b"*2\r\n$4\r\nPING\r\n:1\r\n", b"*zz\r\n"] {
            let mut stream = std::net::TcpStream::connect(&addr).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            stream.write_all(bad).unwrap();
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer).expect("the node answers and closes");
            let answer = String::from_utf8_lossy(&answer);
            assert!(answer.starts_with("-ERR Protocol error"), "{bad:?} got {answer}");
        }
        let mut con = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
        assert_eq!(redis::cmd("PING").query::<String>(&mut con).unwrap(), "PONG");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_of_a_cluster_serves_any_key() {
    let cluster = TestCluster::start(3, &["--resp", "127.0.0.1:0"]).await;
    let nodes: Vec<String> = cluster.nodes.iter().map(|n| n.resp.clone().expect("resp address")).collect();
    let counter = job_wasm("counter");
    let first = cluster.nodes[0].client().await;
    first.put_module("counter", counter).await.unwrap();
    for node in &cluster.nodes {
        let client = node.http_client().await;
        grex_tests::eventually("the module name on every node", Duration::from_secs(30), || async {
            client.list_modules().await.is_ok_and(|m| m.iter().any(|m| m.name == "counter"))
        })
        .await;
    }
    blocking(move || {
        let mut cons: Vec<redis::Connection> =
            nodes.iter().map(|u| redis::Client::open(u.as_str()).unwrap().get_connection().unwrap()).collect();
        for (i, key) in ["alpha", "beta", "gamma", "delta", "epsilon"].iter().enumerate() {
            let _: () = cons[i % 3].hset(*key, "v", i).unwrap();
            for con in cons.iter_mut() {
                assert_eq!(con.hget::<_, _, usize>(*key, "v").unwrap(), i, "{key} read through every node");
            }
            for (n, con) in cons.iter_mut().enumerate() {
                let count: String = redis::cmd("FCALL").arg("counter").arg(1).arg(*key).arg(1).query(con).unwrap();
                assert_eq!(count, (n + 1).to_string());
            }
        }
        // After READONLY a node serves hash reads from its own applied state, which catches up.
        for con in cons.iter_mut() {
            let _: () = redis::cmd("READONLY").query(con).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while con.hget::<_, _, Option<usize>>("epsilon", "v").unwrap() != Some(4) {
                assert!(std::time::Instant::now() < deadline, "a herder never applied the write to epsilon");
                std::thread::sleep(Duration::from_millis(20));
            }
            let _: () = redis::cmd("READWRITE").query(con).unwrap();
        }
        let err = redis::cmd("READONLY").arg("x").query::<()>(&mut cons[0]).unwrap_err();
        assert!(error_text(err).contains("wrong number of arguments"));
    })
    .await;
}

/// A `CLUSTER SLOTS` entry: first and last slot, then host, port and id of the primary and replicas.
type SlotRange = (u16, u16, Vec<(String, u16, String)>);

/// A cluster-aware client (the `redis` crate's `ClusterClient`) learns the slot map from any node,
/// and the map sends every key to its flock's leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_clients_go_straight_to_each_flock_leader() {
    let cluster = TestCluster::start(3, &["--resp", "127.0.0.1:0"]).await;
    let resp_of = |id: &str| cluster.nodes[cluster.index_of(id)].resp.clone().expect("resp address");
    let first = cluster.nodes[0].client().await;
    first.put_module("counter", job_wasm("counter")).await.unwrap();
    // Right after forming, node 0 leads every flock until idle flocks hand their lead back to
    // their preferred herders; wait for that, so the leaders stay put while the test compares.
    let map_client = cluster.nodes[0].http_client().await;
    grex_tests::eventually("every flock led by its preferred herder", Duration::from_secs(30), || async {
        map_client
            .flocks()
            .await
            .is_ok_and(|map| map.flocks.iter().all(|f| f.leader.is_some() && f.leader.as_ref() == f.herders.first()))
    })
    .await;
    // Where each key should go: its flock's leader, as the canary names it.
    let keys: Vec<String> = (0..40).map(|i| format!("customer-{i}")).chain(["{customer-7}.cart".into()]).collect();
    let mut leaders = Vec::new();
    for key in &keys {
        let canary = first.canary(key.as_bytes()).await.unwrap();
        assert_eq!(canary.flock, grex_client::proto::flock_of(key.as_bytes(), grex_tests::TEST_FLOCKS));
        leaders.push(resp_of(&canary.node).trim_start_matches("redis://").to_owned());
    }
    let seeds: Vec<String> = cluster.nodes.iter().map(|n| n.resp.clone().expect("resp address")).collect();
    blocking(move || {
        // CLUSTER SLOTS from one node, read as a client reads it: slot ranges to addresses.
        let mut con = redis::Client::open(seeds[1].as_str()).unwrap().get_connection().unwrap();
        let slots: Vec<SlotRange> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query::<Vec<Value>>(&mut con)
            .unwrap()
            .into_iter()
            .map(|range| {
                let (first, last, nodes): SlotRange = match range {
                    Value::Array(fields) => {
                        let first = redis::from_redis_value(&fields[0]).unwrap();
                        let last = redis::from_redis_value(&fields[1]).unwrap();
                        let nodes = fields[2..].iter().map(|n| redis::from_redis_value(n).unwrap()).collect();
                        (first, last, nodes)
                    }
                    other => panic!("a slot range is an array, not {other:?}"),
                };
                (first, last, nodes)
            })
            .collect();
        assert_eq!(slots.first().map(|s| s.0), Some(0));
        assert_eq!(slots.last().map(|s| s.1), Some(16383));
        assert!(slots.windows(2).all(|w| w[0].1 + 1 == w[1].0), "ranges are contiguous: {slots:?}");
        assert!(slots.iter().all(|(_, _, nodes)| nodes.len() == 3), "a primary and two replicas per range");
        for (key, leader) in keys.iter().zip(&leaders) {
            let slot: u16 = redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).query(&mut con).unwrap();
            let (_, _, nodes) = slots.iter().find(|(first, last, _)| (*first..=*last).contains(&slot)).unwrap();
            assert_eq!(&format!("{}:{}", nodes[0].0, nodes[0].1), leader, "{key} (slot {slot}) maps to its leader");
        }
        let ids: std::collections::BTreeSet<&String> = slots.iter().map(|(_, _, nodes)| &nodes[0].2).collect();
        assert_eq!(ids.len(), 3, "leadership is spread, so each node leads some slots");
        let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut con).unwrap();
        assert!(info.contains("cluster_state:ok"), "{info}");
        let nodes: String = redis::cmd("CLUSTER").arg("NODES").query(&mut con).unwrap();
        assert_eq!(nodes.lines().count(), 3, "{nodes}");
        assert_eq!(nodes.lines().filter(|l| l.contains("myself")).count(), 1, "{nodes}");

        // A real cluster client: it reads the map and routes by it.
        let client = redis::cluster::ClusterClient::new(vec![seeds[0].as_str()]).unwrap();
        let mut con = client.get_connection().unwrap();
        for (i, key) in keys.iter().enumerate() {
            let _: () = con.hset(key, "n", i).unwrap();
            let count: String = redis::cmd("FCALL").arg("counter").arg(1).arg(key).arg(2).query(&mut con).unwrap();
            assert_eq!(count, "2");
            assert_eq!(con.hget::<_, _, usize>(key, "n").unwrap(), i);
        }
        let err = redis::cmd("CLUSTER").arg("ADDSLOTS").arg(1).query::<()>(&mut con).unwrap_err();
        assert!(error_text(err).contains("unknown subcommand"));
    })
    .await;
}

/// Kills `node` and starts it again with `--resp` on another free port (and, `elsewhere`, every
/// other address on a new port too, as on another host); returns what `CLUSTER NODES` should
/// name it by before and after: `host:port@` and, after, `host:port@bus` (the peer port).
fn restart_on_new_ports(node: &mut GrexNode, elsewhere: bool) -> (String, String) {
    let address = |node: &GrexNode| node.resp.clone().expect("resp address").trim_start_matches("redis://").to_owned();
    let old = address(node);
    node.kill9();
    let resp = loop {
        let resp = format!("127.0.0.1:{}", grex_tests::free_port());
        if resp != old {
            break resp;
        }
    };
    let old_peer = node.peer.clone();
    if elsewhere {
        node.restart_elsewhere(&["--resp", &resp]);
        assert_ne!(node.peer, old_peer);
    } else {
        node.restart_with(&["--resp", &resp]);
    }
    assert_eq!(address(node), resp);
    let bus = node.peer.rsplit_once(':').expect("host:port").1;
    (format!("{old}@"), format!("{resp}@{bus}"))
}

/// Waits until `CLUSTER NODES` asked of `seed` names a node `new` and none `old`.
async fn wait_named_at(seed: &str, old: &str, new: &str) {
    grex_tests::eventually(&format!("{seed} to name {new} instead of {old}"), Duration::from_secs(30), || {
        let seed = seed.to_owned();
        async move {
            let nodes: String = blocking(move || {
                let mut con = redis::Client::open(seed.as_str()).unwrap().get_connection().unwrap();
                redis::cmd("CLUSTER").arg("NODES").query(&mut con).unwrap()
            })
            .await;
            nodes.contains(&format!(" {new} ")) && !nodes.contains(&format!(" {old}"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_node_restarted_on_another_port_names_the_new_one() {
    // A one-node cluster: the node leads the meta group and records its own new address.
    let mut cluster = TestCluster::start(1, &["--resp", "127.0.0.1:0"]).await;
    let (old, new) = restart_on_new_ports(&mut cluster.nodes[0], false);
    let seed = cluster.nodes[0].resp.clone().expect("resp address");
    wait_named_at(&seed, &old, &new).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_on_new_addresses_is_found_there_by_cluster_clients() {
    // Every address changes, the peer address (the cluster bus port in `CLUSTER NODES`) included.
    let mut cluster = TestCluster::start(3, &["--resp", "127.0.0.1:0"]).await;
    cluster.nodes[0].client().await.put_module("counter", job_wasm("counter")).await.unwrap();
    let (old, new) = restart_on_new_ports(&mut cluster.nodes[2], true);
    let seed = cluster.nodes[0].resp.clone().expect("resp address");
    wait_named_at(&seed, &old, &new).await;
    let moved = (cluster.nodes[2].id.clone(), cluster.nodes[2].http.clone());
    let other = cluster.nodes[1].http_client().await;
    grex_tests::eventually("node 1 to list node 2 at its new HTTP address", Duration::from_secs(30), || async {
        other.flocks().await.is_ok_and(|map| map.nodes.contains(&moved))
    })
    .await;
    // The meta leader applies the new addresses before its answer reaches node 2, which then logs.
    let restarted = &cluster.nodes[2];
    grex_tests::wait_until("node 2 to log that its new addresses are recorded", Duration::from_secs(30), || {
        restarted.log().contains("recorded this node's new addresses")
    });
    // A cluster client that reads the map from any node reaches every key.
    blocking(move || {
        let mut con = redis::cluster::ClusterClient::new(vec![seed.as_str()]).unwrap().get_connection().unwrap();
        for i in 0..30 {
            let key = format!("moved-{i}");
            let count: String = redis::cmd("FCALL").arg("counter").arg(1).arg(&key).arg(1).query(&mut con).unwrap();
            assert_eq!(count, "1", "{key}");
        }
    })
    .await;
}

/// `tests/redis-cli.sh`: redis-cli itself, the way a shell user types commands, against a node.
#[test]
fn redis_cli_script() {
    let cli = std::process::Command::new("redis-cli").arg("--version").output();
    assert!(
        cli.is_ok_and(|out| out.status.success()),
        "redis-cli is not installed: install it (Debian: apt-get install redis-tools) or run scripts/test.sh, which does"
    );
    job_wasm("counter");
    let script = grex_tests::workspace_root().join("tests/redis-cli.sh");
    let out = std::process::Command::new(&script).arg(grex_tests::grex_bin()).output().expect("run tests/redis-cli.sh");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "tests/redis-cli.sh failed:\n{text}");
    assert!(text.contains("redis-cli: all checks passed"), "{text}");
}

/// The `key:value` lines of an `INFO` reply.
fn info_fields(text: &str) -> std::collections::HashMap<String, String> {
    text.lines().filter_map(|l| l.split_once(':')).map(|(k, v)| (k.to_owned(), v.trim().to_owned())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_config_client_slowlog_latency_dbsize_and_scan_answer_as_redis_tools_expect() {
    const BUCKETS: usize = 25;
    let dir = tempfile::tempdir().unwrap();
    let node = GrexNode::start(dir.path(), &["--resp", "127.0.0.1:0"]);
    let url = node.resp.clone().expect("resp address");
    blocking(move || {
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut con = client.get_connection().unwrap();
        let mut other = client.get_connection().unwrap();
        redis::cmd("CLIENT").arg("SETNAME").arg("watcher").exec(&mut other).unwrap();
        // Every command from here is slow enough for the slow log.
        redis::cmd("CONFIG").arg("SET").arg("slowlog-log-slower-than").arg("0").exec(&mut con).unwrap();
        redis::cmd("SLOWLOG").arg("RESET").exec(&mut con).unwrap();
        redis::cmd("CONFIG").arg("RESETSTAT").exec(&mut con).unwrap();
        for i in 0..BUCKETS {
            let _: i64 = con.hset(format!("user:{i}"), "name", format!("n{i}")).unwrap();
        }

        // INFO: the default sections, filled from the node.
        let info: String = redis::cmd("INFO").query(&mut con).unwrap();
        let fields = info_fields(&info);
        for section in ["# Server", "# Clients", "# Memory", "# Stats", "# Replication", "# Keyspace"] {
            assert!(info.contains(section), "{section} missing:\n{info}");
        }
        assert!(!info.contains("# Commandstats"), "commandstats only when asked");
        assert_eq!(fields["connected_clients"], "2");
        assert_eq!(fields["db0"], format!("keys={BUCKETS},expires=0,avg_ttl=0"));
        assert_eq!(fields["redis_mode"], "cluster", "grex serve runs a cluster, of one node here");
        assert!(fields["used_memory"].parse::<u64>().unwrap() > 0);
        let stats: String = redis::cmd("INFO").arg("commandstats").query(&mut con).unwrap();
        let hset = &info_fields(&stats)["cmdstat_hset"];
        assert!(hset.starts_with(&format!("calls={BUCKETS},")) && hset.ends_with("failed_calls=0"), "{hset}");

        // CONFIG GET: what redis-benchmark and other tools ask at start-up.
        let config: std::collections::HashMap<String, String> =
            redis::cmd("CONFIG").arg("GET").arg("save").arg("appendonly").arg("max*").query(&mut con).unwrap();
        assert_eq!(config["save"], "");
        assert_eq!(config["appendonly"], "yes");
        assert_eq!(config["maxclients"], "1024");
        assert!(config.contains_key("maxmemory") && config.contains_key("maxmemory-policy"), "{config:?}");
        let refused = redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("1").exec(&mut con).unwrap_err();
        assert!(error_text(refused).contains("grex serve"));

        // CLIENT LIST: both connections, with their names and last commands.
        let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut con).unwrap();
        assert_eq!(list.lines().count(), 2, "{list}");
        assert!(list.lines().any(|l| l.contains("name=watcher") && l.contains("cmd=client")), "{list}");
        assert!(list.lines().any(|l| l.contains("name= ") && l.contains("cmd=client")), "{list}");
        let id: i64 = redis::cmd("CLIENT").arg("ID").query(&mut other).unwrap();
        let one: String = redis::cmd("CLIENT").arg("LIST").arg("ID").arg(id).query(&mut con).unwrap();
        assert!(one.starts_with(&format!("id={id} ")) && one.lines().count() == 1, "{one}");

        // SLOWLOG: every command since the reset, newest first, with its arguments.
        let len: i64 = redis::cmd("SLOWLOG").arg("LEN").query(&mut con).unwrap();
        assert!(len >= BUCKETS as i64, "{len}");
        let entries: Vec<Value> = redis::cmd("SLOWLOG").arg("GET").arg(200).query(&mut con).unwrap();
        let args: Vec<Vec<String>> = entries
            .iter()
            .map(|e| match e {
                Value::Array(fields) => redis::from_redis_value(&fields[3]).unwrap(),
                other => panic!("a slow-log entry is an array: {other:?}"),
            })
            .collect();
        assert!(args.contains(&vec![
            "HSET".into(),
            format!("user:{}", BUCKETS - 1),
            "name".into(),
            format!("n{}", BUCKETS - 1)
        ]));

        // LATENCY HISTOGRAM: every HSET counted.
        let histogram: Value = redis::cmd("LATENCY").arg("HISTOGRAM").arg("hset").query(&mut con).unwrap();
        let Value::Array(entry) = &histogram else { panic!("{histogram:?}") };
        let Value::Array(figures) = &entry[1] else { panic!("{histogram:?}") };
        assert_eq!(figures[1], Value::Int(BUCKETS as i64), "calls: {histogram:?}");
        let Value::Array(buckets) = &figures[3] else { panic!("{histogram:?}") };
        assert_eq!(buckets.last(), Some(&Value::Int(BUCKETS as i64)), "the last bucket counts every call");

        // DBSIZE and SCAN: every bucket, each once, a page at a time.
        let size: i64 = redis::cmd("DBSIZE").query(&mut con).unwrap();
        assert_eq!(size, BUCKETS as i64);
        let mut seen = Vec::new();
        let mut cursor = "0".to_owned();
        let mut pages = 0;
        loop {
            let (next, keys): (String, Vec<String>) =
                redis::cmd("SCAN").arg(&cursor).arg("COUNT").arg(7).query(&mut con).unwrap();
            seen.extend(keys);
            pages += 1;
            if next == "0" {
                break;
            }
            cursor = next;
        }
        seen.sort();
        let mut expected: Vec<String> = (0..BUCKETS).map(|i| format!("user:{i}")).collect();
        expected.sort();
        assert_eq!(seen, expected);
        assert!(pages >= BUCKETS / 7, "{pages} pages");
        let (_, matched): (String, Vec<String>) =
            redis::cmd("SCAN").arg(0).arg("MATCH").arg("user:1?").arg("COUNT").arg(1000).query(&mut con).unwrap();
        assert_eq!(matched.len(), 10, "{matched:?}");
        let stale = redis::cmd("SCAN").arg("12345").query::<Value>(&mut con).unwrap_err();
        assert!(error_text(stale).contains("invalid cursor"));
        let kind: String = redis::cmd("TYPE").arg("user:3").query(&mut con).unwrap();
        assert_eq!(kind, "hash");

        // COMMAND: from the same table.
        let count: i64 = redis::cmd("COMMAND").arg("COUNT").query(&mut con).unwrap();
        assert!(count > 30, "{count}");
        let unknown = redis::cmd("SET").arg("k").arg("v").exec(&mut con).unwrap_err();
        assert!(error_text(unknown).contains("unknown command 'SET'"));
        let stats: String = redis::cmd("INFO").arg("stats").query(&mut con).unwrap();
        assert!(info_fields(&stats)["total_error_replies"].parse::<u64>().unwrap() >= 1);
    })
    .await;
}

/// redis-benchmark itself: it fetches the server's configuration at start and warns when it
/// cannot; against a node it must run without a warning.
#[test]
fn redis_benchmark_runs_against_a_node_without_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let node = GrexNode::start(dir.path(), &["--resp", "127.0.0.1:0"]);
    let address = node.resp.clone().expect("resp address");
    let port = address.rsplit(':').next().unwrap();
    let out = std::process::Command::new("redis-benchmark")
        .args(["-p", port, "-t", "ping,hset", "-n", "200", "-c", "4", "-q"])
        .output()
        .expect("redis-benchmark is installed (Debian: redis-tools; scripts/test.sh installs it)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(!text.to_ascii_uppercase().contains("WARN") && !text.contains("ERR"), "{text}");
    assert!(text.contains("HSET: ") && text.contains("requests per second"), "{text}");
}
