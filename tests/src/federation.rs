//! The real directory and real department nodes served in this process on 127.0.0.1 ephemeral ports over
//! mutual TLS, on sled stores in temporary folders, each with its default configuration; and generated
//! enterprise records to load into them. Used by the benchmark harness's record-relay section.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use client_sdk::identity::Role;
use client_sdk::ids::{validate_uscc, IdError};
use exchange_node::config::{Config as NodeConfig, LogFormat, RelayConfig, DEFAULT_MAX_CONNECTIONS, DEFAULT_SHUTDOWN_GRACE_SECONDS};
use exchange_proto::v1::directory_client::DirectoryClient;
use exchange_proto::v1::{ListNodesRequest, NodeStatus, Record, SearchCatalogRequest};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use crate::pki::TestPki;
use crate::workload::Rng;

/// The sample catalog file of `dept` (`deploy/local/catalog/<dept>.toml`).
pub fn sample_catalog(dept: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../deploy/local/catalog/{dept}.toml"))
}

/// A server task started in process; stopped by [`Running::stop`].
pub struct Running<E> {
    pub addr: String,
    /// The server's admin port (HTTPS; no token: operators of its department get in with a certificate).
    pub admin_addr: String,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), E>>,
}

impl<E: std::fmt::Display> Running<E> {
    /// Signals shutdown and waits (at most 30 s) for the server to finish.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match tokio::time::timeout(Duration::from_secs(30), self.task).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(anyhow::anyhow!("{e}")),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(anyhow::anyhow!("server did not stop within 30 s")),
        }
    }
}

/// The directory (`directory::run`), with its default configuration, as `central/directory`.
pub async fn start_directory(pki: &TestPki, data: &Path) -> anyhow::Result<Running<directory::ServerError>> {
    let tls = pki.issue("central", Role::Directory, "directory");
    serve_directory(directory::Config::new("127.0.0.1:0", data, tls)).await
}

/// Serves `config` on ephemeral gRPC and admin ports.
async fn serve_directory(config: directory::Config) -> anyhow::Result<Running<directory::ServerError>> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let admin = TcpListener::bind("127.0.0.1:0").await?;
    let admin_addr = admin.local_addr()?.to_string();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(directory::server::run_with_admin(listener, Some(admin), config, async {
        let _ = stopped.await;
    }));
    Ok(Running { addr, admin_addr, stop: Some(stop), task })
}

/// One directory replica on the PostgreSQL database at `url` (start several on one `url` for a highly
/// available directory), as `central/directory`, looking for other replicas' writes every `poll_ms`.
pub async fn start_directory_replica(
    pki: &TestPki,
    url: &str,
    poll_ms: u64,
) -> anyhow::Result<Running<directory::ServerError>> {
    let tls = pki.issue("central", Role::Directory, "directory");
    let toml_path = |p: &Path| toml_string(&p.to_string_lossy());
    let text = format!(
        "listen = \"127.0.0.1:0\"\n[tls]\nca = {}\ncert = {}\nkey = {}\n[store]\nbackend = \"postgres\"\n\
         [store.postgres]\nurl = {}\npoll_interval_ms = {poll_ms}\n",
        toml_path(&tls.ca),
        toml_path(&tls.cert),
        toml_path(&tls.key),
        toml_string(url),
    );
    serve_directory(directory::Config::from_toml_str(&text)?).await
}

/// `text` as a TOML basic string.
fn toml_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Department `dept`'s node (`exchange_node::server::run`, default timing) as `<dept>-node`, publishing
/// `catalog` if given. Everything not dictated by the test set-up (addresses, folders, certificates) is
/// the configuration file's default: relay timeouts, resolve cache, audit sealing every 10 s, no quotas.
pub async fn start_node(
    pki: &TestPki,
    dept: &str,
    directory_addr: &str,
    data: &Path,
    catalog: Option<PathBuf>,
) -> anyhow::Result<Running<exchange_node::NodeError>> {
    let tls = pki.issue(dept, Role::Node, &format!("{dept}-node"));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let config = NodeConfig {
        listen: addr.parse()?,
        advertise_address: addr.clone(),
        directory_address: directory_addr.to_string(),
        data_dir: data.to_path_buf(),
        tls,
        catalog_file: catalog,
        max_connections: DEFAULT_MAX_CONNECTIONS,
        shutdown_grace_seconds: DEFAULT_SHUTDOWN_GRACE_SECONDS,
        log_format: LogFormat::Text,
        relay: RelayConfig::default(),
        quotas: Vec::new(),
        admin: None,
        telemetry: Default::default(),
        source: None,
    };
    let admin = TcpListener::bind("127.0.0.1:0").await?;
    let admin_addr = admin.local_addr()?.to_string();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(exchange_node::server::run_with_admin(
        listener,
        Some(admin),
        config,
        exchange_node::registration::Timing::default(),
        async {
            let _ = stopped.await;
        },
    ));
    Ok(Running { addr, admin_addr, stop: Some(stop), task })
}

/// Calls `f` every 100 ms until it returns `Some`, or fails after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        anyhow::ensure!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// True once the directory lists a node of `dept` as online.
pub async fn node_online(directory: &mut DirectoryClient<Channel>, dept: &str) -> bool {
    match directory.list_nodes(ListNodesRequest { department: dept.into() }).await {
        Ok(r) => r.into_inner().nodes.iter().any(|n| n.status == NodeStatus::Online as i32),
        Err(_) => false,
    }
}

/// Catalog entries of `dept` the directory can find.
pub async fn provider_entries(directory: &mut DirectoryClient<Channel>, dept: &str) -> u64 {
    directory
        .search_catalog(SearchCatalogRequest { provider_code: dept.into(), page_size: 1, ..Default::default() })
        .await
        .map(|r| r.into_inner().total_hits)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------------
// Records

/// A valid unified social credit code from its first 17 characters (the check character computed).
pub fn uscc(first17: &str) -> String {
    match validate_uscc(&format!("{first17}0")) {
        Ok(()) => format!("{first17}0"),
        Err(IdError::Check { expected, .. }) => format!("{first17}{expected}"),
        Err(e) => panic!("{first17}: {e}"),
    }
}

/// The data item that keys enterprise records; the node adds it to every stored record.
pub const ENTERPRISE_KEY_ITEM: &str = "统一社会信用代码";

const REGIONS: &[(&str, &str)] = &[
    ("350100", "福州市"), ("350200", "厦门市"), ("350500", "泉州市"), ("330100", "杭州市"), ("320100", "南京市"),
    ("440100", "广州市"), ("440300", "深圳市"), ("510100", "成都市"), ("420100", "武汉市"), ("110108", "北京市海淀区"),
];
const WORDS: &[&str] = &["闽江", "海峡", "东方", "华信", "鼎盛", "恒通", "博远", "新锐", "长青", "宏图", "嘉禾", "天成"];
const TRADES: &[(&str, &str)] = &[
    ("数据科技", "软件和信息技术服务业"),
    ("贸易", "批发业"),
    ("建设工程", "房屋建筑业"),
    ("食品", "食品制造业"),
    ("物流", "道路运输业"),
    ("医药", "医药制造业"),
    ("餐饮管理", "餐饮业"),
    ("电子", "计算机、通信和其他电子设备制造业"),
];
const KINDS: &[&str] = &[
    "有限责任公司（自然人投资或控股）",
    "有限责任公司（法人独资）",
    "股份有限公司（非上市、自然人投资或控股）",
    "有限责任公司（外商投资企业法人独资）",
];
const SURNAMES: &[&str] = &["林", "陈", "王", "李", "张", "刘", "黄", "吴", "郑", "周"];
const GIVEN: &[&str] = &["海", "建国", "晓明", "丽华", "志强", "秀英", "伟", "静", "文杰", "雪梅"];
const SCOPES: &[&str] = &[
    "软件开发", "信息技术咨询服务", "数据处理和存储支持服务", "计算机系统服务", "货物进出口", "技术进出口",
    "食品销售（仅销售预包装食品）", "普通货物仓储服务", "道路货物运输（不含危险货物）", "建设工程施工",
    "医疗器械经营", "餐饮服务", "电子元器件制造", "会议及展览服务", "广告设计、代理",
];
const ROADS: &[&str] = &["五四路", "湖东路", "工业路", "福新东路", "江滨中大道", "金山大道", "软件大道"];
const STATUSES: &[&str] = &["存续", "存续", "存续", "在业", "注销", "吊销"];

/// `n` enterprise records of resource 101001/000001 (企业登记信息, the commerce sample catalog): every
/// data item of the entry filled with realistic values, unique credit codes. Deterministic for a seed.
pub fn enterprise_records(n: usize, seed: u64) -> Vec<Record> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|i| {
            let (region_code, region) = *rng.pick(REGIONS);
            // 9 + 1 (legal person, enterprise) + region + a 9-digit organisation code from the index.
            let key = uscc(&format!("91{region_code}{:09}", i * 7 + 1));
            let (trade, industry) = *rng.pick(TRADES);
            let mut scopes: Vec<&str> = (0..3 + rng.below(4)).map(|_| *rng.pick(SCOPES)).collect();
            scopes.dedup();
            let items: Vec<(&str, String)> = vec![
                ("企业名称", format!("{region}{}{trade}有限公司", rng.pick(WORDS))),
                ("法定代表人", format!("{}{}", rng.pick(SURNAMES), rng.pick(GIVEN))),
                ("企业类型", rng.pick(KINDS).to_string()),
                ("注册资本", format!("{}.{:02}", 10 + rng.below(50_000), rng.below(100))),
                ("成立日期", format!("{}-{:02}-{:02}", 1995 + rng.below(30), 1 + rng.below(12), 1 + rng.below(28))),
                ("住所", format!("{region}{}{}号{}室", rng.pick(ROADS), 1 + rng.below(300), 101 + rng.below(2000))),
                ("经营范围", format!("{}。（依法须经批准的项目，经相关部门批准后方可开展经营活动）", scopes.join("；"))),
                ("登记状态", rng.pick(STATUSES).to_string()),
                ("登记机关", format!("{region}市场监督管理局")),
                ("所属行业", industry.to_string()),
                ("更新时间", format!("2026-{:02}-{:02}T{:02}:{:02}:00+08:00", 1 + rng.below(10), 1 + rng.below(28), rng.below(24), rng.below(60))),
            ];
            Record {
                key,
                items: items.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
                updated_at_unix_ms: 0,
                version: 0,
            }
        })
        .collect()
}

/// `records` as the provider's node stores and returns them: the key item added, the store's time set.
pub fn as_stored(records: &[Record], updated_at_unix_ms: i64) -> Vec<Record> {
    records
        .iter()
        .map(|r| {
            let mut r = r.clone();
            let key = r.key.clone();
            r.items.entry(ENTERPRISE_KEY_ITEM.to_string()).or_insert(key);
            r.updated_at_unix_ms = updated_at_unix_ms;
            r
        })
        .collect()
}
