//! Realistic generated catalog entries for tests and benchmarks: Chinese names and summaries in the
//! style of provincial catalogs, data items per record kind, all three share types.
//! Deterministic for a given seed, so runs are comparable.

use exchange_proto::v1::{
    CatalogEntry, DataItem, DataType, OpenAttribute, RecordKind, ShareMethod, ShareType, UpdateCycle,
};

/// Departments the generator publishes for: (code, provider name).
pub const DEPARTMENTS: &[(&str, &str)] = &[
    ("commerce", "市场监督管理局"),
    ("tax", "税务局"),
    ("quality", "质量技术监督局"),
    ("police", "公安局"),
    ("health", "卫生健康委员会"),
];

const REGIONS: &[&str] = &[
    "北京市", "上海市", "天津市", "重庆市", "福州市", "厦门市", "泉州市", "杭州市", "宁波市", "南京市", "苏州市",
    "广州市", "深圳市", "成都市", "武汉市", "长沙市", "郑州市", "济南市", "青岛市", "西安市", "合肥市", "南昌市",
    "昆明市", "贵阳市", "南宁市", "海口市", "沈阳市", "大连市", "长春市", "哈尔滨市",
];

const SUBJECTS: &[(&str, RecordKind)] = &[
    ("企业登记", RecordKind::Enterprise),
    ("企业年报", RecordKind::Enterprise),
    ("纳税信用等级", RecordKind::Enterprise),
    ("欠税公告", RecordKind::Enterprise),
    ("发票开具汇总", RecordKind::Enterprise),
    ("行政处罚", RecordKind::Enterprise),
    ("经营异常名录", RecordKind::Enterprise),
    ("严重违法失信企业", RecordKind::Enterprise),
    ("个体工商户登记", RecordKind::Enterprise),
    ("工业产品生产许可证", RecordKind::Enterprise),
    ("食品生产许可", RecordKind::Enterprise),
    ("特种设备使用登记", RecordKind::Enterprise),
    ("社会保险缴纳", RecordKind::Enterprise),
    ("企业股东出资", RecordKind::Enterprise),
    ("人口基本", RecordKind::Population),
    ("户籍迁移", RecordKind::Population),
    ("居民身份证签发", RecordKind::Population),
    ("流动人口居住登记", RecordKind::Population),
    ("出生医学证明", RecordKind::Population),
    ("婚姻登记", RecordKind::Population),
    ("产品质量监督抽查", RecordKind::Other),
    ("计量器具检定", RecordKind::Other),
    ("认证认可机构", RecordKind::Other),
    ("标准化文件备案", RecordKind::Other),
    ("不动产登记", RecordKind::Other),
    ("道路运输许可", RecordKind::Other),
    ("医疗机构执业许可", RecordKind::Other),
    ("药品经营许可", RecordKind::Other),
];

const SUFFIXES: &[&str] = &["信息", "结果", "名录", "数据", "记录", "清单", "统计"];

const ENTERPRISE_ITEMS: &[(&str, DataType)] = &[
    ("统一社会信用代码", DataType::String),
    ("企业名称", DataType::String),
    ("法定代表人", DataType::String),
    ("注册资本", DataType::Decimal),
    ("成立日期", DataType::Date),
    ("住所", DataType::String),
    ("经营范围", DataType::String),
    ("登记状态", DataType::String),
    ("登记机关", DataType::String),
    ("行业类别", DataType::String),
    ("更新时间", DataType::Datetime),
];

const POPULATION_ITEMS: &[(&str, DataType)] = &[
    ("公民身份号码", DataType::String),
    ("姓名", DataType::String),
    ("性别", DataType::String),
    ("出生日期", DataType::Date),
    ("民族", DataType::String),
    ("住址", DataType::String),
    ("户籍地", DataType::String),
    ("人口状态", DataType::String),
];

const OTHER_ITEMS: &[(&str, DataType)] = &[
    ("证书编号", DataType::String),
    ("产品名称", DataType::String),
    ("抽查日期", DataType::Date),
    ("检验结论", DataType::String),
    ("有效期至", DataType::Date),
    ("许可范围", DataType::String),
    ("发证机关", DataType::String),
    ("备注", DataType::String),
];

const PURPOSES: &[&str] = &[
    "用于跨部门联合监管和信用约束",
    "用于行政审批中的材料核验",
    "用于税收征管和风险分析",
    "用于产品质量安全追溯",
    "用于公共服务事项的身份核验",
    "用于统计分析和宏观决策",
];

/// A small deterministic generator (xorshift), so the crate needs no RNG dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Entry number `n` of department `dept_index`: unique resource codes across departments and numbers.
pub fn entry(dept_index: usize, n: usize, rng: &mut Rng) -> CatalogEntry {
    let (dept, provider) = DEPARTMENTS[dept_index % DEPARTMENTS.len()];
    let region = rng.pick(REGIONS);
    let (subject, kind) = *rng.pick(SUBJECTS);
    let suffix = rng.pick(SUFFIXES);
    let class = 1 + (n % 3);
    let item = 1 + (n / 3) % 20;
    // The category encodes the department, so codes never collide across departments.
    let category = 1 + dept_index * 100 + (n / 60) % 100;
    let classification = format!("{class}{item:02}{category:03}");
    let sequence = n / 6000 + 1;
    let resource_code = format!("{classification}/{sequence:06}");
    let pool = match kind {
        RecordKind::Enterprise => ENTERPRISE_ITEMS,
        RecordKind::Population => POPULATION_ITEMS,
        _ => OTHER_ITEMS,
    };
    let take = 4 + rng.below(pool.len() - 3);
    let data_items: Vec<DataItem> = pool[..take]
        .iter()
        .map(|(name, ty)| DataItem { name: name.to_string(), data_type: *ty as i32, description: String::new() })
        .collect();
    let share_type = match rng.below(10) {
        0..=4 => ShareType::Unconditional,
        5..=8 => ShareType::Conditional,
        _ => ShareType::NotShared,
    };
    let share_condition = match share_type {
        ShareType::Conditional => "需提供行政执法或审批依据，经提供方审核同意".to_string(),
        ShareType::NotShared => "依据《中华人民共和国个人信息保护法》不予共享".to_string(),
        _ => String::new(),
    };
    let share_methods = if share_type == ShareType::NotShared {
        vec![ShareMethod::PullQuery as i32]
    } else {
        vec![ShareMethod::PullQuery as i32, ShareMethod::PushSubscription as i32]
    };
    let summary = format!(
        "{region}{provider}归集的{subject}{suffix}，包括{}、{}等信息项，{}。",
        data_items[0].name,
        data_items[1].name,
        rng.pick(PURPOSES)
    );
    let key_item = if kind == RecordKind::Other { data_items[0].name.clone() } else { String::new() };
    CatalogEntry {
        resource_code,
        name: format!("{region}{subject}{suffix}"),
        summary,
        provider_code: dept.to_string(),
        provider_name: format!("{region}{provider}"),
        classification,
        format: "数据库表".to_string(),
        data_items,
        share_type: share_type as i32,
        share_condition,
        share_methods,
        open_attribute: OpenAttribute::NotOpen as i32,
        open_condition: String::new(),
        update_cycle: (UpdateCycle::RealTime as i32) + rng.below(6) as i32,
        publish_date: format!("2026-{:02}-{:02}", 1 + rng.below(10), 1 + rng.below(28)),
        related_resource_codes: Vec::new(),
        record_kind: kind as i32,
        // Enterprise and population entries are keyed by their national identifier item; others name theirs.
        key_item,
        version: 0,
        withdrawn: false,
    }
}

/// `count` entries for department `dept_index`, numbered from `start`.
pub fn entries(dept_index: usize, start: usize, count: usize, seed: u64) -> Vec<CatalogEntry> {
    let mut rng = Rng::new(seed ^ (dept_index as u64) << 32 ^ start as u64);
    (start..start + count).map(|n| entry(dept_index, n, &mut rng)).collect()
}

/// Two-word queries of the kind users type, for search benchmarks.
pub fn queries() -> Vec<String> {
    let mut out = Vec::new();
    let mut rng = Rng::new(7);
    for _ in 0..200 {
        let (subject, _) = rng.pick(SUBJECTS);
        let region = rng.pick(REGIONS);
        out.push(match rng.below(3) {
            0 => format!("{region} {subject}"),
            1 => subject.to_string(),
            _ => format!("{subject} {}", rng.pick(SUFFIXES)),
        });
    }
    out
}
