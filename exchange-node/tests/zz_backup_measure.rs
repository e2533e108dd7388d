//! Throw-away measurement (deleted after use): writes paused by a backup of 100k records.
mod common;
use std::time::{Duration, Instant};
use client_sdk::admin::client::{AdminAuth, AdminClient};
use client_sdk::admin::AdminConfig;
use client_sdk::identity::Role;
use client_sdk::ids::{validate_uscc, IdError};
use exchange_proto::v1::*;
use tokio::net::TcpListener;
use common::*;

fn uscc(n: u32) -> String {
    let first17 = format!("91350100M{n:08}");
    match validate_uscc(&format!("{first17}0")) {
        Ok(()) => format!("{first17}0"),
        Err(IdError::Check { expected, .. }) => format!("{first17}{expected}"),
        Err(e) => panic!("{first17}: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure() {
    let pki = Pki::new();
    let dir_data = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let directory_addr = listener.local_addr().unwrap().to_string();
    let _directory = TestDirectory::start(&pki, dir_data.path(), listener).await;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let al = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let admin_addr = al.local_addr().unwrap();
    let mut config = node_config(&pki, "commerce", &directory_addr, data.path(), Some(sample_catalog("commerce")), &addr);
    config.admin = Some(AdminConfig::new(admin_addr));
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(exchange_node::server::run_with_admin(l, Some(al), config, fast_timing(), async { let _ = stopped.await; }));
    wait_published_and_online(&pki, &directory_addr, &["commerce"]).await;
    let mut app = client_sdk::client::node_client(&addr, &pki.identity("commerce", Role::App)).unwrap();
    let n_total: u32 = std::env::var("N").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    for start in (0..n_total).step_by(5000) {
        let records = (start..start + 5000).map(|n| Record {
            key: uscc(n),
            items: [("企业名称", format!("测试企业{n}有限公司")), ("登记状态", "存续".to_string()), ("注册资本", format!("{n}.00")),
                    ("法定代表人", "张三".to_string()), ("住所", "福建省福州市鼓楼区五四路100号".to_string()), ("经营范围", "软件开发；信息技术咨询服务；数据处理和存储支持服务".to_string())]
                .into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            ..Default::default()
        }).collect();
        app.put_records(PutRecordsRequest { resource_code: "101001/000001".into(), records, ..Default::default() }).await.unwrap();
    }
    let auth = AdminAuth { ca: pki.dir.path().join("ca.crt"), client: Some(pki.identity("commerce", Role::Operator)), token: None };
    let admin = AdminClient::connect(&admin_addr.to_string(), auth).unwrap().with_timeout(Duration::from_secs(120));
    for i in 0..3 {
        // A writer call issued during the backup: how long it waits.
        let mut w = app.clone();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let t = Instant::now();
            w.put_records(PutRecordsRequest { resource_code: "101001/000001".into(), records: vec![Record { key: uscc(10_000_000 + i), items: [("企业名称".to_string(), "x".to_string())].into_iter().collect(), ..Default::default() }], ..Default::default() }).await.unwrap();
            t.elapsed()
        });
        let out = data.path().join(format!("m{i}.gxbak"));
        let t = Instant::now();
        let bytes = admin.download("/api/backup", &out).await.unwrap();
        let took = t.elapsed();
        let s = client_sdk::backup::verify_file(&out).unwrap();
        eprintln!("MEASURE run {i}: {} keys, {} bytes, download {took:?}, one put during it took {:?}", s.keys, bytes, writer.await.unwrap());
    }
}
