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
