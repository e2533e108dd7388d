//! Full-text catalog search: an in-memory tantivy index over name, summary and data items with jieba
//! word segmentation, filters, facet counts and paging. The index is rebuilt from the store at start and
//! kept current on every catalog change; the store stays the source of truth.
//!
//! INTERFACE STUB: the search work fills this in; the signatures are the contract with service.rs.

use exchange_proto::v1::{CatalogEntry, SearchCatalogRequest};

#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    /// A request field is unusable (bad page token, page size too large...): maps to INVALID_ARGUMENT.
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error("search index: {0}")]
    Index(String),
}

/// One page of results: resource codes with scores, in rank order.
#[derive(Debug, Default, Clone)]
pub struct SearchPage {
    pub hits: Vec<(String, f32)>,
    pub total_hits: u64,
    /// Empty on the last page.
    pub next_page_token: String,
    pub provider_facets: Vec<(String, u64)>,
    pub share_type_facets: Vec<(String, u64)>,
    pub classification_facets: Vec<(String, u64)>,
}

pub struct CatalogIndex {}

impl CatalogIndex {
    /// An empty in-memory index.
    pub fn new() -> Result<Self, SearchError> {
        todo!()
    }
    /// Adds or replaces entries by resource code (withdrawn entries are removed), then commits so the
    /// next search sees them. Safe to call from several threads.
    pub fn upsert(&self, _entries: &[CatalogEntry]) -> Result<(), SearchError> {
        todo!()
    }
    /// Removes entries by resource code and commits.
    pub fn remove(&self, _codes: &[String]) -> Result<(), SearchError> {
        todo!()
    }
    /// Runs a search request (query text, filters, page size, page token).
    pub fn search(&self, _req: &SearchCatalogRequest) -> Result<SearchPage, SearchError> {
        todo!()
    }
    /// Number of live entries in the index.
    pub fn len(&self) -> u64 {
        todo!()
    }
}

#[cfg(test)]
mod scratch {
    use tantivy::tokenizer::{TextAnalyzer, LowerCaser, TokenStream};
    fn toks(search: bool, text: &str) -> Vec<String> {
        let mut a = TextAnalyzer::builder(tantivy_jieba::JiebaTokenizer::with_search_mode(search)).filter(LowerCaser).build();
        let mut s = a.token_stream(text);
        let mut v = vec![];
        while s.advance() { let t = s.token(); v.push(format!("{}@{}+{}", t.text, t.position, t.position_length)); }
        v
    }
    #[test]
    fn scratch_jieba() {
        for t in ["企业登记信息", "企业登记", "企业 登记", "纳税信用等级", "产品质量监督抽查结果", "质量监督", "监督抽查", "人口基本信息", "统一社会信用代码", "社会信用代码", "法定代表人姓名", "市场主体登记注册信息，包括 USCC 与 API-v2 接口。", "不动产登记", "社会保障卡", "社会保险缴费记录", "缴费", "营业执照", "食品经营许可证"] {
            println!("{t}\n  S {:?}\n  D {:?}", toks(true, t), toks(false, t));
        }
    }
}
