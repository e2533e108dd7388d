//! Full-text catalog search: an in-memory tantivy index over name, summary and data items with jieba
//! word segmentation, filters, facet counts and paging. The index is rebuilt from the store at start and
//! kept current on every catalog change; the store stays the source of truth.
//!
//! # How text is matched
//! Documents are segmented with jieba in *search mode*, which emits every dictionary word inside a long
//! word as well as the long word (产品质量 → 产品, 质量, 产品质量), so a short query word still finds a long
//! indexed one. The query is segmented in *default mode* (one reading, no overlaps) and turned into term
//! queries directly: every query word must occur (AND) in the entry's one text field, which holds the
//! name, summary and data items. One field, not three, because a per-field OR made every query word a
//! union of three posting lists: 2.4× slower at 100k entries. The name is indexed [`NAME_REPEAT`] times,
//! which weighs a title match above a summary match through BM25's term frequency.
//! Phrase queries, which the tantivy query parser would build from overlapping tokens, are avoided: they
//! cost about 5× at p99 and add nothing for short catalog titles. A query word long enough to hold
//! shorter dictionary words (社会保险) also matches a document holding all of those shorter words, because
//! jieba may have read the document's text as a different long word (社会保险费) that does not contain
//! the query word as a token.
//!
//! # Ranking, facets and paging
//! Hits are ranked by BM25; equal scores are ordered by resource code through a u64 fast field holding an
//! order-preserving key of the code, so a ranking is identical after a restart rebuilds the index in
//! another insertion order. A query without words lists entries by resource code
//! with score 0. Facet counts are computed over every hit from string fast fields, not only over the
//! returned page. Paging uses an offset carried in an opaque token that is bound to the query text and
//! filters, and offsets past [`MAX_RESULT_OFFSET`] are refused so a caller cannot make the server
//! collect an unbounded number of results.

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use exchange_proto::v1::{CatalogEntry, RecordKind, SearchCatalogRequest, ShareType, UpdateCycle};
use sha2::{Digest, Sha256};
use tantivy::collector::{Collector, Count, SegmentCollector, TopDocs};
use tantivy::columnar::StrColumn;
use tantivy::query::{
    AllQuery, BooleanQuery, ConstScoreQuery, Occur, Query, TermQuery,
};
use tantivy::schema::{
    Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, Value, FAST, INDEXED, STORED,
    STRING,
};
use tantivy::tokenizer::{LowerCaser, TextAnalyzer, Token, TokenFilter, TokenStream, Tokenizer};
use tantivy::{
    DocAddress, DocId, Index, IndexReader, IndexWriter, Order, ReloadPolicy, Score, Searcher,
    SegmentOrdinal, SegmentReader, TantivyDocument, Term,
};
use tantivy_jieba::JiebaTokenizer;

/// Page size used when a request leaves it at 0.
pub const DEFAULT_PAGE_SIZE: u32 = 20;
/// Largest page size a request may ask for.
pub const MAX_PAGE_SIZE: u32 = 200;
/// Deepest result offset a page token may point at. Serving offset `n` means ranking `n + page_size`
/// hits, so the cap bounds the work one request can cause; past it the caller must narrow the search.
pub const MAX_RESULT_OFFSET: usize = 10_000;
/// Longest query text accepted, in characters. Catalog queries are a few words; the cap bounds the
/// segmentation work and the number of clauses in the query built from it.
pub const MAX_QUERY_CHARS: usize = 128;

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

/// An order-preserving number for a resource code: each of up to 16 characters as a base-12 digit
/// (0 = past the end, 1 = '/', 2..=11 = '0'..='9'), so comparing keys compares codes as strings.
/// Valid codes are at most 16 characters (9-digit classification, '/', 6-digit sequence); anything else
/// still gets a key, just not a meaningful one.
fn code_sort_key(code: &str) -> u64 {
    let mut chars = code.chars();
    (0..16).fold(0u64, |key, _| {
        let digit = match chars.next() {
            None => 0,
            Some('/') => 1,
            Some(c) => c.to_digit(10).map_or(11, |d| 2 + d as u64),
        };
        key * 12 + digit
    })
}

/// Schema field names. String fields named here are also the fast-field column names.
const RESOURCE_CODE: &str = "resource_code";
/// Name, summary, data item names and descriptions: everything a query word is matched against.
const TEXT: &str = "text";
const PROVIDER_CODE: &str = "provider_code";
const SHARE_TYPE: &str = "share_type";
const RECORD_KIND: &str = "record_kind";
const UPDATE_CYCLE: &str = "update_cycle";
/// [`code_sort_key`] of the resource code: breaks score ties by code with one fast-field read per hit, so a
/// ranking is the same before and after a restart (whose rebuild inserts documents in another order).
const CODE_SORT_KEY: &str = "code_sort_key";
/// Every prefix of the classification (1 to 9 digits), so any prefix filter is one term query.
const CLASSIFICATION_PREFIXES: &str = "classification_prefixes";

/// Classification levels (class, item, category, sub-category) as digit counts, each with the fast
/// column holding the classification cut to that level, which the classification facet counts.
const CLASSIFICATION_LEVELS: [(usize, &str); 4] = [
    (1, "classification_l1"),
    (3, "classification_l3"),
    (6, "classification_l6"),
    (9, "classification_l9"),
];

/// Name under which the index-time analyzer is registered with the index.
const INDEX_ANALYZER: &str = "catalog_jieba";

/// How many times an entry's name goes into the text field: a word in the title says more about what the
/// resource is than one in its summary, and BM25's saturating term frequency turns the repetition into a
/// boost without letting long names dominate.
const NAME_REPEAT: usize = 3;

/// Indexing memory shared by the writer threads. 100k short entries fit in one segment per thread, so a
/// rebuild at start is a single flush per thread.
const WRITER_MEMORY_BYTES: usize = 160 * 1024 * 1024;
/// Writer threads: jieba segmentation dominates indexing time and parallelises well; more threads than
/// this would only fragment the index into more segments.
const MAX_WRITER_THREADS: usize = 2;

/// Segments a search may span before they are merged into one. Every publish batch commits a
/// segment, and a search pays per segment (a dictionary lookup per term, posting blocks, fast-field
/// columns): measured at 100k entries, 16 segments searched at 60% of the speed of 2. Tantivy's log merge
/// policy left 9 segments after a 100-batch load and merged out of sight of a manually reloaded reader,
/// so the index merges everything itself, in the background, and reloads when the merge is done.
const MAX_SEGMENTS: usize = 4;

/// A merge of every searchable segment, if there are more than [`MAX_SEGMENTS`].
fn start_full_merge(
    writer: &mut IndexWriter<TantivyDocument>,
) -> Option<tantivy::FutureResult<Option<tantivy::index::SegmentMeta>>> {
    match writer.index().searchable_segment_ids() {
        Ok(ids) if ids.len() > MAX_SEGMENTS => Some(writer.merge(&ids)),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list index segments");
            None
        }
    }
}

/// Page token layout: version byte, big-endian u32 offset, then the request fingerprint.
const PAGE_TOKEN_VERSION: u8 = 1;
const FINGERPRINT_LEN: usize = 8;
const PAGE_TOKEN_LEN: usize = 1 + 4 + FINGERPRINT_LEN;

/// The in-memory catalog search index. Cheap to share behind an `Arc`: searches take a snapshot from the
/// reader and never wait for the writer; writes are serialised by the writer mutex.
pub struct CatalogIndex {
    fields: Fields,
    writer: Arc<Mutex<IndexWriter<TantivyDocument>>>,
    reader: IndexReader,
    /// True while a background merge runs; at most one at a time.
    merging: Arc<AtomicBool>,
    /// Search-mode analyzer, the one documents are indexed with; also cuts query words into their parts.
    index_analyzer: TextAnalyzer,
    /// Default-mode analyzer: one segmentation of the query without overlapping words.
    query_analyzer: TextAnalyzer,
}

/// Field handles of the schema.
struct Fields {
    resource_code: Field,
    code_sort_key: Field,
    text: Field,
    provider_code: Field,
    share_type: Field,
    record_kind: Field,
    update_cycle: Field,
    classification_prefixes: Field,
    classification_levels: [Field; 4],
}

impl CatalogIndex {
    /// An empty in-memory index.
    pub fn new() -> Result<Self, SearchError> {
        let (schema, fields) = build_schema();
        let index = Index::create_in_ram(schema);
        let index_analyzer = catalog_analyzer(true);
        let query_analyzer = catalog_analyzer(false);
        index
            .tokenizers()
            .register(INDEX_ANALYZER, index_analyzer.clone());

        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_WRITER_THREADS);
        let writer = index
            .writer_with_num_threads(threads, WRITER_MEMORY_BYTES)
            .map_err(|e| index_error("create writer", e))?;
        writer.set_merge_policy(Box::new(tantivy::indexer::NoMergePolicy));
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()
            .map_err(|e| index_error("create reader", e))?;

        let catalog_index = CatalogIndex {
            fields,
            writer: Arc::new(Mutex::new(writer)),
            reader,
            merging: Arc::new(AtomicBool::new(false)),
            index_analyzer,
            query_analyzer,
        };
        // jieba loads its dictionary on first use; pay that at start rather than in the first search.
        catalog_index.segment_query("企业登记");
        Ok(catalog_index)
    }

    /// Adds or replaces entries by resource code (withdrawn entries are removed), then commits so the
    /// next search sees them. Safe to call from several threads.
    ///
    /// The whole batch is one commit, so a rebuild of the full catalog is one call. If an entry has no
    /// resource code nothing is changed.
    pub fn upsert(&self, entries: &[CatalogEntry]) -> Result<(), SearchError> {
        if let Some(position) = entries.iter().position(|e| e.resource_code.is_empty()) {
            return Err(invalid(
                "resource_code",
                format!("entry {position} of the batch has no resource code"),
            ));
        }
        if entries.is_empty() {
            return Ok(());
        }
        let mut writer = self.lock_writer()?;
        for entry in entries {
            // Deletes apply to documents added before them, so a code repeated in one batch keeps its
            // last version.
            writer.delete_term(self.resource_code_term(&entry.resource_code));
            if !entry.withdrawn {
                self.add_entry(&mut writer, entry)?;
            }
        }
        self.commit_and_reload(&mut writer)
    }

    /// Removes entries by resource code and commits.
    pub fn remove(&self, codes: &[String]) -> Result<(), SearchError> {
        if codes.is_empty() {
            return Ok(());
        }
        let mut writer = self.lock_writer()?;
        for code in codes {
            writer.delete_term(self.resource_code_term(code));
        }
        self.commit_and_reload(&mut writer)
    }

    /// Runs a search request (query text, filters, page size, page token).
    pub fn search(&self, req: &SearchCatalogRequest) -> Result<SearchPage, SearchError> {
        let page_size = effective_page_size(req.page_size)?;
        let filters = self.filter_queries(req)?;
        let fingerprint = request_fingerprint(req);
        let offset = decode_page_token(&req.page_token, &fingerprint)?;
        if req.query.chars().count() > MAX_QUERY_CHARS {
            return Err(invalid(
                "query",
                format!("longer than {MAX_QUERY_CHARS} characters; use a few words"),
            ));
        }
        let words = self.segment_query(&req.query);
        let query = self.build_query(&words, filters);

        let searcher = self.reader.searcher();
        let page = TopDocs::with_limit(page_size).and_offset(offset);
        let facets = FacetCountCollector {
            classification_column: classification_facet_column(&req.classification_prefix),
        };
        let (total_hits, hits, facet_counts) = if words.is_empty() {
            let by_code = page.order_by_string_fast_field(RESOURCE_CODE, Order::Asc);
            let (total_hits, listed, facet_counts) = searcher
                .search(query.as_ref(), &(Count, by_code, facets))
                .map_err(|e| index_error("search", e))?;
            let hits = listed
                .into_iter()
                .map(|(code, _address)| code.map(|code| (code, 0.0)).ok_or_else(missing_code))
                .collect::<Result<Vec<_>, _>>()?;
            (total_hits, hits, facet_counts)
        } else {
            // Higher score first; on a tie, the smaller resource code (hence `Reverse`).
            let by_score_then_code = page.tweak_score(|segment: &tantivy::SegmentReader| {
                let codes = segment.fast_fields().u64(CODE_SORT_KEY).ok().map(|c| c.first_or_default_col(0));
                move |doc: DocId, score: Score| (score, std::cmp::Reverse(codes.as_ref().map_or(0, |c| c.get_val(doc))))
            });
            let (total_hits, ranked, facet_counts) = searcher
                .search(query.as_ref(), &(Count, by_score_then_code, facets))
                .map_err(|e| index_error("search", e))?;
            let hits = ranked
                .into_iter()
                .map(|((score, _), address)| Ok((self.stored_resource_code(&searcher, address)?, score)))
                .collect::<Result<Vec<_>, SearchError>>()?;
            (total_hits, hits, facet_counts)
        };
        let total_hits = total_hits as u64;
        let next_offset = offset + page_size;
        let next_page_token = if (next_offset as u64) < total_hits {
            encode_page_token(next_offset, &fingerprint)
        } else {
            String::new()
        };
        Ok(SearchPage {
            hits,
            total_hits,
            next_page_token,
            provider_facets: sorted_facet(facet_counts.provider_code),
            share_type_facets: sorted_facet(facet_counts.share_type),
            classification_facets: sorted_facet(facet_counts.classification),
        })
    }

    /// Number of live entries in the index.
    pub fn len(&self) -> u64 {
        self.reader.searcher().num_docs()
    }

    /// True when the index holds no live entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the writer. A call that panicked while holding it may have left part of a batch
    /// uncommitted; that part is rolled back so the next commit cannot publish a half batch.
    fn lock_writer(&self) -> Result<MutexGuard<'_, IndexWriter<TantivyDocument>>, SearchError> {
        match self.writer.lock() {
            Ok(writer) => Ok(writer),
            Err(poisoned) => {
                let mut writer = poisoned.into_inner();
                writer
                    .rollback()
                    .map_err(|e| index_error("roll back after a panicked write", e))?;
                self.writer.clear_poison();
                Ok(writer)
            }
        }
    }

    /// Queues an entry's document; on failure, rolls back the batch so far.
    fn add_entry(
        &self,
        writer: &mut IndexWriter<TantivyDocument>,
        entry: &CatalogEntry,
    ) -> Result<(), SearchError> {
        match writer.add_document(self.document_for(entry)) {
            Ok(_) => Ok(()),
            Err(e) => Err(rollback_after(writer, index_error("add document", e))),
        }
    }

    /// Commits pending changes and reloads the reader while still holding the writer, so reloads
    /// happen in commit order and a returned write is visible to the next search.
    fn commit_and_reload(
        &self,
        writer: &mut IndexWriter<TantivyDocument>,
    ) -> Result<(), SearchError> {
        if let Err(e) = writer.commit() {
            return Err(rollback_after(writer, index_error("commit", e)));
        }
        self.reader
            .reload()
            .map_err(|e| index_error("reload reader", e))?;
        self.merge_if_fragmented(writer);
        Ok(())
    }

    /// Starts merging every segment into one when a search would span more than [`MAX_SEGMENTS`].
    /// The merge runs on tantivy's merge thread; a helper thread waits for it, reloads the reader so
    /// searches switch to the merged segment, and merges again if commits made during the merge left the
    /// index fragmented. Deletes committed meanwhile are applied by tantivy when the merge ends.
    fn merge_if_fragmented(&self, writer: &mut IndexWriter<TantivyDocument>) {
        if self.merging.swap(true, Ordering::AcqRel) {
            return; // the running helper looks again when its merge ends
        }
        let Some(first) = start_full_merge(writer) else {
            self.merging.store(false, Ordering::Release);
            return;
        };
        let (writer, reader, merging) = (self.writer.clone(), self.reader.clone(), self.merging.clone());
        let spawned = std::thread::Builder::new().name("index-merge".into()).spawn(move || {
            let mut merge = first;
            loop {
                if let Err(e) = merge.wait() {
                    tracing::warn!(error = %e, "index merge failed; segments stay as they are");
                }
                if let Err(e) = reader.reload() {
                    tracing::warn!(error = %e, "reload after index merge failed");
                }
                let next = match writer.lock() {
                    Ok(mut w) => start_full_merge(&mut w),
                    Err(_) => None,
                };
                match next {
                    Some(m) => merge = m,
                    None => break,
                }
            }
            merging.store(false, Ordering::Release);
        });
        if spawned.is_err() {
            self.merging.store(false, Ordering::Release);
        }
    }

    /// The resource code of a hit, from the document store. Resolving it through the resource code
    /// column's dictionary instead costs about 20 µs per hit at 100k entries (one dictionary block
    /// decoded per lookup), which would be half the time of a whole search; stored blocks stay cached in
    /// the searcher.
    fn stored_resource_code(
        &self,
        searcher: &Searcher,
        address: DocAddress,
    ) -> Result<String, SearchError> {
        let doc: TantivyDocument = searcher
            .doc(address)
            .map_err(|e| index_error("read hit", e))?;
        doc.get_first(self.fields.resource_code)
            .and_then(|value| value.as_str())
            .map(str::to_string)
            .ok_or_else(missing_code)
    }

    fn resource_code_term(&self, code: &str) -> Term {
        Term::from_field_text(self.fields.resource_code, code)
    }

    fn document_for(&self, entry: &CatalogEntry) -> TantivyDocument {
        let fields = &self.fields;
        let mut doc = TantivyDocument::default();
        doc.add_text(fields.resource_code, &entry.resource_code);
        doc.add_u64(fields.code_sort_key, code_sort_key(&entry.resource_code));
        for _ in 0..NAME_REPEAT {
            doc.add_text(fields.text, &entry.name);
        }
        doc.add_text(fields.text, &entry.summary);
        for item in &entry.data_items {
            doc.add_text(fields.text, &item.name);
            if !item.description.is_empty() {
                doc.add_text(fields.text, &item.description);
            }
        }
        if !entry.provider_code.is_empty() {
            doc.add_text(fields.provider_code, &entry.provider_code);
        }
        if let Some(share_type) = share_type_facet_value(entry.share_type) {
            doc.add_text(fields.share_type, share_type);
        }
        // Enum numbers are indexed as they are; the filter side only ever asks for known ones.
        if let Ok(record_kind) = u64::try_from(entry.record_kind) {
            doc.add_u64(fields.record_kind, record_kind);
        }
        if let Ok(update_cycle) = u64::try_from(entry.update_cycle) {
            doc.add_u64(fields.update_cycle, update_cycle);
        }
        let classification = entry.classification.as_str();
        if is_classification_prefix(classification) {
            for len in 1..=classification.len() {
                doc.add_text(fields.classification_prefixes, &classification[..len]);
            }
            for ((level_len, _), field) in CLASSIFICATION_LEVELS
                .iter()
                .zip(fields.classification_levels)
            {
                if classification.len() >= *level_len {
                    doc.add_text(field, &classification[..*level_len]);
                }
            }
        }
        doc
    }

    /// Filter clauses of the request, validated. Each matches documents without contributing to the
    /// score, so filters never change the ranking.
    fn filter_queries(
        &self,
        req: &SearchCatalogRequest,
    ) -> Result<Vec<Box<dyn Query>>, SearchError> {
        let fields = &self.fields;
        let mut filters: Vec<Term> = Vec::new();
        if !req.provider_code.is_empty() {
            filters.push(Term::from_field_text(
                fields.provider_code,
                &req.provider_code,
            ));
        }
        if !req.classification_prefix.is_empty() {
            if !is_classification_prefix(&req.classification_prefix) {
                return Err(invalid(
                    "classification_prefix",
                    "must be 1 to 9 digits, e.g. \"1\", \"101\", \"101001\"",
                ));
            }
            filters.push(Term::from_field_text(
                fields.classification_prefixes,
                &req.classification_prefix,
            ));
        }
        if req.share_type != 0 {
            let value = share_type_facet_value(req.share_type).ok_or_else(|| {
                invalid("share_type", format!("unknown value {}", req.share_type))
            })?;
            filters.push(Term::from_field_text(fields.share_type, value));
        }
        if req.record_kind != 0 {
            RecordKind::try_from(req.record_kind).map_err(|_| {
                invalid("record_kind", format!("unknown value {}", req.record_kind))
            })?;
            filters.push(Term::from_field_u64(
                fields.record_kind,
                req.record_kind as u64,
            ));
        }
        if req.update_cycle != 0 {
            UpdateCycle::try_from(req.update_cycle).map_err(|_| {
                invalid(
                    "update_cycle",
                    format!("unknown value {}", req.update_cycle),
                )
            })?;
            filters.push(Term::from_field_u64(
                fields.update_cycle,
                req.update_cycle as u64,
            ));
        }
        Ok(filters
            .into_iter()
            .map(|term| -> Box<dyn Query> {
                Box::new(ConstScoreQuery::new(
                    Box::new(TermQuery::new(term, IndexRecordOption::Basic)),
                    0.0,
                ))
            })
            .collect())
    }

    /// Segments query text into distinct words, whitespace separating words as well. Punctuation is
    /// dropped by the analyzer; ASCII is lowercased as at index time.
    fn segment_query(&self, text: &str) -> Vec<QueryWord> {
        let mut query_analyzer = self.query_analyzer.clone();
        let mut index_analyzer = self.index_analyzer.clone();
        let mut words: Vec<QueryWord> = Vec::new();
        for chunk in text.split_whitespace() {
            let mut stream = query_analyzer.token_stream(chunk);
            while stream.advance() {
                let word = &stream.token().text;
                if words.iter().any(|known| &known.word == word) {
                    continue;
                }
                let parts = if word.chars().count() > 2 {
                    shorter_words(&mut index_analyzer, word)
                } else {
                    Vec::new()
                };
                words.push(QueryWord {
                    word: word.clone(),
                    parts,
                });
            }
        }
        words
    }

    /// Every word must match (in any text field) and every filter must hold. Without words, every
    /// entry passing the filters matches; those are listed by resource code, unscored.
    fn build_query(&self, words: &[QueryWord], filters: Vec<Box<dyn Query>>) -> Box<dyn Query> {
        if words.is_empty() && filters.is_empty() {
            return Box::new(AllQuery);
        }
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = words
            .iter()
            .map(|word| (Occur::Must, self.word_query(word)))
            .collect();
        clauses.extend(filters.into_iter().map(|filter| (Occur::Must, filter)));
        Box::new(BooleanQuery::new(clauses))
    }

    /// The word in any text field, or, for a word with parts, all of its parts (each in any field).
    fn word_query(&self, word: &QueryWord) -> Box<dyn Query> {
        let whole = self.any_text_field(&word.word);
        if word.parts.is_empty() {
            return whole;
        }
        let all_parts: Vec<(Occur, Box<dyn Query>)> = word
            .parts
            .iter()
            .map(|part| (Occur::Must, self.any_text_field(part)))
            .collect();
        Box::new(BooleanQuery::new(vec![
            (Occur::Should, whole),
            (Occur::Should, Box::new(BooleanQuery::new(all_parts))),
        ]))
    }

    /// One indexed word anywhere in the entry's text.
    fn any_text_field(&self, word: &str) -> Box<dyn Query> {
        Box::new(TermQuery::new(Term::from_field_text(self.fields.text, word), IndexRecordOption::WithFreqs))
    }
}

/// A word of the query, with the shorter dictionary words that make it up (empty when there are
/// none, as for words of one or two characters).
struct QueryWord {
    word: String,
    parts: Vec<String>,
}

/// The shorter words search-mode segmentation finds inside `word` (what the index holds for text that
/// jieba read as some longer word), if together they cover every character of it. Partial cover is
/// not enough: 许可证 (licence) yields only 许可 (permission), and matching that alone would find
/// every 行政许可 entry.
fn shorter_words(index_analyzer: &mut TextAnalyzer, word: &str) -> Vec<String> {
    let mut parts: Vec<String> = Vec::new();
    let mut spans: Vec<(usize, usize)> = Vec::new();
    let mut stream = index_analyzer.token_stream(word);
    while stream.advance() {
        let token = stream.token();
        if token.text != word && !parts.contains(&token.text) {
            parts.push(token.text.clone());
            spans.push((token.offset_from, token.offset_to));
        }
    }
    spans.sort_unstable();
    let mut covered_to = 0;
    for (from, to) in spans {
        if from > covered_to {
            break;
        }
        covered_to = covered_to.max(to);
    }
    if covered_to < word.len() {
        parts.clear();
    }
    parts
}

fn build_schema() -> (Schema, Fields) {
    let mut builder = Schema::builder();
    // Text fields need term frequencies and field lengths for BM25, not positions: no phrase queries.
    let text = TextOptions::default().set_indexing_options(
        TextFieldIndexing::default()
            .set_tokenizer(INDEX_ANALYZER)
            .set_index_option(IndexRecordOption::WithFreqs),
    );
    let classification_levels =
        CLASSIFICATION_LEVELS.map(|(_, column)| builder.add_text_field(column, FAST));
    let fields = Fields {
        resource_code: builder.add_text_field(RESOURCE_CODE, STRING | FAST | STORED),
        code_sort_key: builder.add_u64_field(CODE_SORT_KEY, FAST),
        text: builder.add_text_field(TEXT, text),
        provider_code: builder.add_text_field(PROVIDER_CODE, STRING | FAST),
        share_type: builder.add_text_field(SHARE_TYPE, STRING | FAST),
        record_kind: builder.add_u64_field(RECORD_KIND, INDEXED),
        update_cycle: builder.add_u64_field(UPDATE_CYCLE, INDEXED),
        classification_prefixes: builder.add_text_field(CLASSIFICATION_PREFIXES, STRING),
        classification_levels,
    };
    (builder.build(), fields)
}

/// jieba segmentation (search mode for documents, default mode for queries), without punctuation and
/// whitespace tokens, lowercased so English words and pinyin match whatever their case.
fn catalog_analyzer(search_mode: bool) -> TextAnalyzer {
    TextAnalyzer::builder(JiebaTokenizer::with_search_mode(search_mode))
        .filter(DropNonWords)
        .filter(LowerCaser)
        .build()
}

/// Token filter dropping tokens with no letter or digit: jieba emits whitespace and punctuation as
/// tokens, which would only bloat the index and skew field lengths.
#[derive(Clone)]
struct DropNonWords;

impl TokenFilter for DropNonWords {
    type Tokenizer<T: Tokenizer> = DropNonWordsTokenizer<T>;

    fn transform<T: Tokenizer>(self, tokenizer: T) -> DropNonWordsTokenizer<T> {
        DropNonWordsTokenizer(tokenizer)
    }
}

#[derive(Clone)]
struct DropNonWordsTokenizer<T>(T);

impl<T: Tokenizer> Tokenizer for DropNonWordsTokenizer<T> {
    type TokenStream<'a> = DropNonWordsStream<T::TokenStream<'a>>;

    fn token_stream<'a>(&'a mut self, text: &'a str) -> Self::TokenStream<'a> {
        DropNonWordsStream(self.0.token_stream(text))
    }
}

struct DropNonWordsStream<S>(S);

impl<S: TokenStream> TokenStream for DropNonWordsStream<S> {
    fn advance(&mut self) -> bool {
        while self.0.advance() {
            if self.0.token().text.chars().any(char::is_alphanumeric) {
                return true;
            }
        }
        false
    }

    fn token(&self) -> &Token {
        self.0.token()
    }

    fn token_mut(&mut self) -> &mut Token {
        self.0.token_mut()
    }
}

/// The value a share type is indexed, filtered and reported as; `None` for unspecified or unknown.
fn share_type_facet_value(share_type: i32) -> Option<&'static str> {
    match ShareType::try_from(share_type).ok()? {
        ShareType::Unspecified => None,
        ShareType::Unconditional => Some("unconditional"),
        ShareType::Conditional => Some("conditional"),
        ShareType::NotShared => Some("not_shared"),
    }
}

/// 1 to 9 ASCII digits: a classification or any prefix of one.
fn is_classification_prefix(value: &str) -> bool {
    (1..=9).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_digit())
}

/// The classification level the facet reports: classes without a prefix filter, otherwise the first
/// level longer than the prefix. `None` below the deepest level, where there is nothing to break down.
fn classification_facet_column(prefix: &str) -> Option<&'static str> {
    CLASSIFICATION_LEVELS
        .iter()
        .find(|(level_len, _)| *level_len > prefix.len())
        .map(|(_, column)| *column)
}

fn effective_page_size(requested: u32) -> Result<usize, SearchError> {
    match requested {
        0 => Ok(DEFAULT_PAGE_SIZE as usize),
        size if size > MAX_PAGE_SIZE => Err(invalid(
            "page_size",
            format!("at most {MAX_PAGE_SIZE}, got {size}"),
        )),
        size => Ok(size as usize),
    }
}

/// A short hash of everything that selects and orders the hits (query text and filters, not the page
/// size), so a token only continues the search it came from. Strings are length-prefixed so that
/// different field splits of the same characters hash differently.
fn request_fingerprint(req: &SearchCatalogRequest) -> [u8; FINGERPRINT_LEN] {
    let mut hasher = Sha256::new();
    for text in [&req.query, &req.provider_code, &req.classification_prefix] {
        hasher.update((text.len() as u64).to_be_bytes());
        hasher.update(text.as_bytes());
    }
    for number in [req.share_type, req.record_kind, req.update_cycle] {
        hasher.update(number.to_be_bytes());
    }
    let digest = hasher.finalize();
    let mut fingerprint = [0u8; FINGERPRINT_LEN];
    fingerprint.copy_from_slice(&digest[..FINGERPRINT_LEN]);
    fingerprint
}

/// URL-safe base64 of version, offset and request fingerprint. Not a secret or a signature: a caller can
/// forge any offset, which [`decode_page_token`] bounds anyway.
fn encode_page_token(offset: usize, fingerprint: &[u8; FINGERPRINT_LEN]) -> String {
    let offset = u32::try_from(offset).unwrap_or(u32::MAX);
    let mut bytes = [0u8; PAGE_TOKEN_LEN];
    bytes[0] = PAGE_TOKEN_VERSION;
    bytes[1..5].copy_from_slice(&offset.to_be_bytes());
    bytes[5..].copy_from_slice(fingerprint);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The offset a page token points at; 0 for no token.
fn decode_page_token(
    token: &str,
    fingerprint: &[u8; FINGERPRINT_LEN],
) -> Result<usize, SearchError> {
    if token.is_empty() {
        return Ok(0);
    }
    let malformed = || invalid("page_token", "not a page token from this search");
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| malformed())?;
    let bytes: [u8; PAGE_TOKEN_LEN] = bytes.try_into().map_err(|_| malformed())?;
    if bytes[0] != PAGE_TOKEN_VERSION {
        return Err(malformed());
    }
    if bytes[5..] != fingerprint[..] {
        return Err(invalid(
            "page_token",
            "belongs to a different query or filters; start again without a token",
        ));
    }
    let offset = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
    if offset > MAX_RESULT_OFFSET {
        return Err(invalid(
            "page_token",
            format!(
                "results past the first {MAX_RESULT_OFFSET} are not served; narrow the search with more \
                 words or filters"
            ),
        ));
    }
    Ok(offset)
}

fn sorted_facet(counts: HashMap<String, u64>) -> Vec<(String, u64)> {
    let mut facet: Vec<(String, u64)> = counts.into_iter().collect();
    facet.sort_by(|(value_a, count_a), (value_b, count_b)| {
        count_b.cmp(count_a).then_with(|| value_a.cmp(value_b))
    });
    facet
}

fn invalid(field: &str, reason: impl Into<String>) -> SearchError {
    SearchError::InvalidArgument {
        field: field.to_string(),
        reason: reason.into(),
    }
}

fn missing_code() -> SearchError {
    SearchError::Index("indexed entry without resource code".to_string())
}

fn index_error(action: &str, err: impl Display) -> SearchError {
    SearchError::Index(format!("{action}: {err}"))
}

/// Drops the uncommitted part of a failed batch so it is not published by a later commit, and returns
/// the original error (adding the rollback failure, if any).
fn rollback_after(writer: &mut IndexWriter<TantivyDocument>, error: SearchError) -> SearchError {
    match writer.rollback() {
        Ok(_) => error,
        Err(rollback_error) => SearchError::Index(format!("{error}; rollback: {rollback_error}")),
    }
}

/// Hit counts per provider code, share type and classification level, over every hit of the query.
/// Counting reads one string fast-field ordinal per hit and facet; ordinals are turned into values
/// once per segment, not per hit.
struct FacetCountCollector {
    /// Column of the classification level to count; `None` when the filter is already a full
    /// classification.
    classification_column: Option<&'static str>,
}

#[derive(Default)]
struct FacetCounts {
    provider_code: HashMap<String, u64>,
    share_type: HashMap<String, u64>,
    classification: HashMap<String, u64>,
}

struct FacetSegmentCollector {
    provider_code: ColumnCounts,
    share_type: ColumnCounts,
    classification: ColumnCounts,
}

/// Hits per term ordinal of one string column in one segment.
struct ColumnCounts {
    column: Option<StrColumn>,
    counts: Vec<u64>,
}

impl ColumnCounts {
    fn new(column: Option<StrColumn>) -> Self {
        let counts = vec![0; column.as_ref().map_or(0, |column| column.num_terms())];
        ColumnCounts { column, counts }
    }

    fn count(&mut self, doc: DocId) {
        let Some(column) = &self.column else { return };
        let ords = column.ords();
        // Every validated entry has each facet value, so columns are normally full: a direct read then
        // skips the per-call index walk of `first()`, which showed in profiles at a read per hit.
        let ord = match ords.index {
            tantivy::columnar::ColumnIndex::Full => Some(ords.values.get_val(doc)),
            _ => ords.first(doc),
        };
        if let Some(count) = ord.and_then(|ord| self.counts.get_mut(ord as usize)) {
            *count += 1;
        }
    }

    fn into_values(self) -> std::io::Result<HashMap<String, u64>> {
        let Some(column) = self.column else {
            return Ok(HashMap::new());
        };
        let (ords, counts): (Vec<u64>, Vec<u64>) = self
            .counts
            .iter()
            .enumerate()
            .filter(|(_, count)| **count > 0)
            .map(|(ord, count)| (ord as u64, *count))
            .unzip();
        let mut values: Vec<String> = Vec::with_capacity(ords.len());
        let found_all = column.dictionary().sorted_ords_to_term_cb(&ords, |bytes| {
            values.push(String::from_utf8_lossy(bytes).into_owned())
        })?;
        if !found_all {
            return Err(std::io::Error::other(
                "facet value missing from its column dictionary",
            ));
        }
        Ok(values.into_iter().zip(counts).collect())
    }
}

impl Collector for FacetCountCollector {
    type Fruit = FacetCounts;
    type Child = FacetSegmentCollector;

    fn for_segment(
        &self,
        _segment_ord: SegmentOrdinal,
        segment: &SegmentReader,
    ) -> tantivy::Result<FacetSegmentCollector> {
        let fast_fields = segment.fast_fields();
        let classification = match self.classification_column {
            Some(column) => fast_fields.str(column)?,
            None => None,
        };
        Ok(FacetSegmentCollector {
            provider_code: ColumnCounts::new(fast_fields.str(PROVIDER_CODE)?),
            share_type: ColumnCounts::new(fast_fields.str(SHARE_TYPE)?),
            classification: ColumnCounts::new(classification),
        })
    }

    fn requires_scoring(&self) -> bool {
        false
    }

    fn merge_fruits(
        &self,
        segments: Vec<std::io::Result<FacetCounts>>,
    ) -> tantivy::Result<FacetCounts> {
        let mut merged = FacetCounts::default();
        for segment in segments {
            let segment = segment?;
            for (into, from) in [
                (&mut merged.provider_code, segment.provider_code),
                (&mut merged.share_type, segment.share_type),
                (&mut merged.classification, segment.classification),
            ] {
                for (value, count) in from {
                    *into.entry(value).or_default() += count;
                }
            }
        }
        Ok(merged)
    }
}

impl SegmentCollector for FacetSegmentCollector {
    type Fruit = std::io::Result<FacetCounts>;

    fn collect(&mut self, doc: DocId, _score: Score) {
        self.provider_code.count(doc);
        self.share_type.count(doc);
        self.classification.count(doc);
    }

    fn harvest(self) -> std::io::Result<FacetCounts> {
        Ok(FacetCounts {
            provider_code: self.provider_code.into_values()?,
            share_type: self.share_type.into_values()?,
            classification: self.classification.into_values()?,
        })
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn code_sort_key_orders_like_the_code_strings() {
        let mut codes = vec!["3/000001", "101001/000002", "1/000009", "101/000001", "101001/000001", "2/000001", "101001001/999999"];
        let mut by_key = codes.clone();
        codes.sort();
        by_key.sort_by_key(|c| code_sort_key(c));
        assert_eq!(codes, by_key);
    }

    use std::collections::HashSet;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use exchange_proto::v1::DataItem;

    use super::*;

    /// An unconditionally shared enterprise resource of the market regulator; the classification is the
    /// part of the code before the slash.
    fn entry(code: &str, name: &str) -> CatalogEntry {
        let classification = code.split('/').next().unwrap_or_default();
        CatalogEntry {
            resource_code: code.to_string(),
            name: name.to_string(),
            provider_code: "samr".to_string(),
            provider_name: "市市场监督管理局".to_string(),
            classification: classification.to_string(),
            share_type: ShareType::Unconditional as i32,
            record_kind: RecordKind::Enterprise as i32,
            update_cycle: UpdateCycle::Daily as i32,
            ..Default::default()
        }
    }

    fn item(name: &str) -> DataItem {
        DataItem {
            name: name.to_string(),
            ..Default::default()
        }
    }

    fn index_with(entries: &[CatalogEntry]) -> CatalogIndex {
        let index = CatalogIndex::new().expect("new index");
        index.upsert(entries).expect("upsert");
        index
    }

    fn query(text: &str) -> SearchCatalogRequest {
        SearchCatalogRequest {
            query: text.to_string(),
            ..Default::default()
        }
    }

    fn codes(page: &SearchPage) -> Vec<&str> {
        page.hits.iter().map(|(code, _)| code.as_str()).collect()
    }

    fn search_codes(index: &CatalogIndex, req: &SearchCatalogRequest) -> Vec<String> {
        let page = index.search(req).expect("search");
        codes(&page).into_iter().map(String::from).collect()
    }

    fn facet(values: &[(&str, u64)]) -> Vec<(String, u64)> {
        values
            .iter()
            .map(|(value, count)| (value.to_string(), *count))
            .collect()
    }

    fn invalid_field(result: Result<SearchPage, SearchError>) -> (String, String) {
        match result {
            Err(SearchError::InvalidArgument { field, reason }) => (field, reason),
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    /// A small catalog across providers, classes and share types.
    fn sample_catalog() -> Vec<CatalogEntry> {
        let mut registration = entry("101001/000001", "企业登记信息");
        registration.summary = "市场主体设立、变更、注销登记的基本信息".to_string();
        registration.data_items = vec![
            item("统一社会信用代码"),
            item("企业名称"),
            item("法定代表人"),
        ];

        let mut tax_credit = entry("101002/000001", "纳税信用等级");
        tax_credit.provider_code = "tax".to_string();
        tax_credit.summary = "纳税人年度纳税信用评价结果".to_string();
        tax_credit.data_items = vec![item("统一社会信用代码"), item("信用等级")];
        tax_credit.share_type = ShareType::Conditional as i32;
        tax_credit.update_cycle = UpdateCycle::Yearly as i32;

        let mut quality = entry("201003/000001", "产品质量监督抽查结果");
        quality.summary = "监督抽查的企业、产品与检验结论".to_string();
        quality.share_type = ShareType::Conditional as i32;
        quality.update_cycle = UpdateCycle::Monthly as i32;

        let mut population = entry("102001/000001", "人口基本信息");
        population.provider_code = "police".to_string();
        population.summary = "户籍人口的姓名、性别、出生日期".to_string();
        population.data_items = vec![item("公民身份号码"), item("姓名")];
        population.share_type = ShareType::NotShared as i32;
        population.record_kind = RecordKind::Population as i32;
        population.update_cycle = UpdateCycle::RealTime as i32;

        let mut license = entry("301001001/000001", "食品经营许可证信息");
        license.summary = "食品经营许可的发证与变更记录".to_string();
        license.data_items = vec![item("许可证编号"), item("统一社会信用代码")];

        vec![registration, tax_credit, quality, population, license]
    }

    #[test]
    fn index_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<CatalogIndex>();
    }

    #[test]
    fn query_words_with_or_without_space_find_the_name() {
        let index = index_with(&sample_catalog());
        for text in ["企业登记", "企业 登记", "登记　企业", "企业，登记！"] {
            assert_eq!(
                search_codes(&index, &query(text)),
                ["101001/000001"],
                "query {text:?}"
            );
        }
        assert!(
            search_codes(&index, &query("企业登记 人口")).is_empty(),
            "every word must match"
        );
    }

    #[test]
    fn data_item_names_are_searchable() {
        let index = index_with(&sample_catalog());
        let found = search_codes(&index, &query("公民身份号码"));
        assert_eq!(found, ["102001/000001"]);
        let found: HashSet<String> = search_codes(&index, &query("统一社会信用代码"))
            .into_iter()
            .collect();
        let expected: HashSet<String> = ["101001/000001", "101002/000001", "301001001/000001"]
            .map(String::from)
            .into();
        assert_eq!(found, expected);
    }

    #[test]
    fn query_word_matches_inside_longer_document_words() {
        let mut entries = sample_catalog();
        entries.push(entry("101003/000001", "社会保险费征缴信息"));
        let index = index_with(&entries);
        // 产品质量 is one word in the document; search mode also indexed 质量.
        assert_eq!(search_codes(&index, &query("质量")), ["201003/000001"]);
        // jieba reads the document as 社会保险费 (indexed as 社会, 保险, 保险费, 社会保险费), never as
        // 社会保险: the query word only matches through its parts 社会 + 保险.
        assert_eq!(search_codes(&index, &query("社会保险")), ["101003/000001"]);
    }

    #[test]
    fn query_word_does_not_match_a_part_covering_only_some_of_it() {
        let index = index_with(&[
            entry("101001/000001", "行政许可决定信息"),
            entry("101001/000002", "食品经营许可证信息"),
        ]);
        // 许可证 contains the dictionary word 许可, but 许可 alone is not a licence.
        assert_eq!(search_codes(&index, &query("许可证")), ["101001/000002"]);
        assert_eq!(search_codes(&index, &query("许可")).len(), 2);
    }

    #[test]
    fn ascii_words_match_case_insensitively() {
        let mut entry = entry("101001/000009", "企业信用信息接口");
        entry.data_items = vec![item("USCC")];
        entry.summary = "Provides the API for credit lookups".to_string();
        let index = index_with(&[entry]);
        for text in ["uscc", "USCC", "Api", "CREDIT 企业"] {
            assert_eq!(
                search_codes(&index, &query(text)),
                ["101001/000009"],
                "query {text:?}"
            );
        }
    }

    #[test]
    fn name_match_ranks_above_summary_match() {
        let mut in_summary = entry("101001/000001", "市场主体年报信息");
        in_summary.summary = "企业年度报告中的纳税信用等级摘要".to_string();
        let in_name = entry("101001/000002", "纳税信用等级");
        let index = index_with(&[in_summary, in_name]);
        let page = index.search(&query("纳税信用等级")).expect("search");
        assert_eq!(codes(&page), ["101001/000002", "101001/000001"]);
        assert!(page.hits[0].1 > page.hits[1].1);
    }

    #[test]
    fn empty_query_lists_every_entry_by_code_with_score_zero() {
        let index = index_with(&sample_catalog());
        for text in ["", "  ", "，。"] {
            let page = index.search(&query(text)).expect("search");
            assert_eq!(page.total_hits, 5);
            assert_eq!(
                codes(&page),
                [
                    "101001/000001",
                    "101002/000001",
                    "102001/000001",
                    "201003/000001",
                    "301001001/000001"
                ]
            );
            assert!(page.hits.iter().all(|(_, score)| *score == 0.0));
        }
    }

    #[test]
    fn filters_narrow_the_hits() {
        let index = index_with(&sample_catalog());
        let cases: Vec<(SearchCatalogRequest, Vec<&str>)> = vec![
            (
                SearchCatalogRequest {
                    provider_code: "tax".into(),
                    ..Default::default()
                },
                vec!["101002/000001"],
            ),
            (
                SearchCatalogRequest {
                    classification_prefix: "1".into(),
                    ..Default::default()
                },
                vec!["101001/000001", "101002/000001", "102001/000001"],
            ),
            (
                SearchCatalogRequest {
                    classification_prefix: "101".into(),
                    ..Default::default()
                },
                vec!["101001/000001", "101002/000001"],
            ),
            (
                SearchCatalogRequest {
                    classification_prefix: "10".into(),
                    ..Default::default()
                },
                vec!["101001/000001", "101002/000001", "102001/000001"],
            ),
            (
                SearchCatalogRequest {
                    classification_prefix: "301001001".into(),
                    ..Default::default()
                },
                vec!["301001001/000001"],
            ),
            (
                SearchCatalogRequest {
                    share_type: ShareType::Conditional as i32,
                    ..Default::default()
                },
                vec!["101002/000001", "201003/000001"],
            ),
            (
                SearchCatalogRequest {
                    record_kind: RecordKind::Population as i32,
                    ..Default::default()
                },
                vec!["102001/000001"],
            ),
            (
                SearchCatalogRequest {
                    update_cycle: UpdateCycle::Monthly as i32,
                    ..Default::default()
                },
                vec!["201003/000001"],
            ),
            (
                SearchCatalogRequest {
                    query: "统一社会信用代码".into(),
                    provider_code: "samr".into(),
                    classification_prefix: "101".into(),
                    ..Default::default()
                },
                vec!["101001/000001"],
            ),
            (
                SearchCatalogRequest {
                    provider_code: "nobody".into(),
                    ..Default::default()
                },
                vec![],
            ),
        ];
        for (req, expected) in cases {
            assert_eq!(search_codes(&index, &req), expected, "request {req:?}");
        }
    }

    #[test]
    fn filters_do_not_change_scores() {
        let index = index_with(&sample_catalog());
        let plain = index.search(&query("统一社会信用代码")).expect("search");
        let filtered = index
            .search(&SearchCatalogRequest {
                provider_code: "tax".into(),
                ..query("统一社会信用代码")
            })
            .expect("search");
        let plain_score = plain
            .hits
            .iter()
            .find(|(code, _)| code == "101002/000001")
            .map(|hit| hit.1);
        assert_eq!(plain_score, Some(filtered.hits[0].1));
    }

    #[test]
    fn unusable_filters_are_invalid_arguments() {
        let index = index_with(&sample_catalog());
        for prefix in ["x", "1a", "1234567890", "-1", "１"] {
            let req = SearchCatalogRequest {
                classification_prefix: prefix.into(),
                ..Default::default()
            };
            assert_eq!(
                invalid_field(index.search(&req)).0,
                "classification_prefix",
                "prefix {prefix:?}"
            );
        }
        let req = SearchCatalogRequest {
            share_type: 9,
            ..Default::default()
        };
        assert_eq!(invalid_field(index.search(&req)).0, "share_type");
        let req = SearchCatalogRequest {
            record_kind: -1,
            ..Default::default()
        };
        assert_eq!(invalid_field(index.search(&req)).0, "record_kind");
        let req = SearchCatalogRequest {
            update_cycle: 8,
            ..Default::default()
        };
        assert_eq!(invalid_field(index.search(&req)).0, "update_cycle");
        let long_query = "企业".repeat(MAX_QUERY_CHARS);
        assert_eq!(invalid_field(index.search(&query(&long_query))).0, "query");
    }

    #[test]
    fn facets_count_every_hit_not_only_the_page() {
        let index = index_with(&sample_catalog());
        let req = SearchCatalogRequest {
            page_size: 1,
            ..Default::default()
        };
        let page = index.search(&req).expect("search");
        assert_eq!(page.hits.len(), 1);
        assert_eq!(
            page.provider_facets,
            facet(&[("samr", 3), ("police", 1), ("tax", 1)])
        );
        assert_eq!(
            page.share_type_facets,
            facet(&[("conditional", 2), ("unconditional", 2), ("not_shared", 1)])
        );
        assert_eq!(
            page.classification_facets,
            facet(&[("1", 3), ("2", 1), ("3", 1)])
        );

        let page = index.search(&SearchCatalogRequest {
            page_size: 1,
            ..query("统一社会信用代码")
        });
        let page = page.expect("search");
        assert_eq!(page.total_hits, 3);
        assert_eq!(page.provider_facets, facet(&[("samr", 2), ("tax", 1)]));
        assert_eq!(
            page.share_type_facets,
            facet(&[("unconditional", 2), ("conditional", 1)])
        );
    }

    #[test]
    fn classification_facet_breaks_down_one_level_below_the_prefix() {
        let index = index_with(&sample_catalog());
        let by_prefix = |prefix: &str| {
            let req = SearchCatalogRequest {
                classification_prefix: prefix.into(),
                ..Default::default()
            };
            index.search(&req).expect("search").classification_facets
        };
        assert_eq!(by_prefix("1"), facet(&[("101", 2), ("102", 1)]));
        assert_eq!(by_prefix("10"), facet(&[("101", 2), ("102", 1)]));
        assert_eq!(by_prefix("101"), facet(&[("101001", 1), ("101002", 1)]));
        assert_eq!(by_prefix("3"), facet(&[("301", 1)]));
        assert_eq!(by_prefix("301001"), facet(&[("301001001", 1)]));
        // Nothing below a full classification; entries classified only to a higher level are not counted.
        assert_eq!(by_prefix("301001001"), facet(&[]));
        assert_eq!(by_prefix("101001"), facet(&[]));
    }

    /// Follows next_page_token to the end and returns every code seen, in order.
    fn page_through(index: &CatalogIndex, first: SearchCatalogRequest) -> Vec<String> {
        let mut seen = Vec::new();
        let mut req = first;
        loop {
            let page = index.search(&req).expect("search");
            assert!(page.hits.len() <= req.page_size as usize);
            seen.extend(codes(&page).into_iter().map(String::from));
            if page.next_page_token.is_empty() {
                assert_eq!(seen.len() as u64, page.total_hits);
                return seen;
            }
            assert!(
                page.next_page_token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "token must be URL-safe: {}",
                page.next_page_token
            );
            req.page_token = page.next_page_token;
        }
    }

    #[test]
    fn paging_with_tokens_returns_every_hit_once() {
        let entries: Vec<CatalogEntry> = (0..47)
            .map(|n| {
                let mut entry = entry(&format!("101001/{n:06}"), "企业登记信息");
                // Varying summaries give varying scores, so the ranking is not just the code order.
                entry.summary = "企业登记".repeat(n % 5);
                entry
            })
            .collect();
        let index = index_with(&entries);
        let all: HashSet<String> = entries.iter().map(|e| e.resource_code.clone()).collect();

        for first in [
            SearchCatalogRequest {
                page_size: 7,
                ..query("企业登记")
            },
            // Only the (identical) names hold 信息: every hit has the same score.
            SearchCatalogRequest {
                page_size: 6,
                ..query("信息")
            },
            SearchCatalogRequest {
                page_size: 10,
                ..Default::default()
            },
            SearchCatalogRequest {
                page_size: 47,
                ..Default::default()
            },
        ] {
            let seen = page_through(&index, first.clone());
            let distinct: HashSet<String> = seen.iter().cloned().collect();
            assert_eq!(distinct.len(), seen.len(), "duplicates paging {first:?}");
            assert_eq!(distinct, all, "missing hits paging {first:?}");
            let single = index
                .search(&SearchCatalogRequest {
                    page_size: MAX_PAGE_SIZE,
                    ..first
                })
                .expect("search");
            assert_eq!(codes(&single), seen, "pages must follow the one-page order");
        }
    }

    #[test]
    fn default_and_maximum_page_sizes() {
        let entries: Vec<CatalogEntry> = (0..25)
            .map(|n| entry(&format!("101001/{n:06}"), "企业登记信息"))
            .collect();
        let index = index_with(&entries);
        let page = index.search(&query("")).expect("search");
        assert_eq!(page.hits.len(), DEFAULT_PAGE_SIZE as usize);
        assert!(!page.next_page_token.is_empty());
        let page = index.search(&SearchCatalogRequest {
            page_size: MAX_PAGE_SIZE,
            ..query("")
        });
        let page = page.expect("search");
        assert_eq!(page.hits.len(), 25);
        assert!(page.next_page_token.is_empty());
        let too_big = SearchCatalogRequest {
            page_size: MAX_PAGE_SIZE + 1,
            ..query("")
        };
        assert_eq!(invalid_field(index.search(&too_big)).0, "page_size");
    }

    #[test]
    fn unusable_page_tokens_are_invalid_arguments() {
        let entries: Vec<CatalogEntry> = (0..5)
            .map(|n| entry(&format!("101001/{n:06}"), "企业登记信息"))
            .collect();
        let index = index_with(&entries);
        let first = SearchCatalogRequest {
            page_size: 2,
            ..query("企业")
        };
        let token = index.search(&first).expect("search").next_page_token;
        assert!(!token.is_empty());

        let with_token = |req: SearchCatalogRequest, token: &str| SearchCatalogRequest {
            page_token: token.to_string(),
            ..req
        };
        for garbage in ["!!!", "abc", "AQAAAAI", &format!("{token}AA"), &token[1..]] {
            let (field, _) = invalid_field(index.search(&with_token(first.clone(), garbage)));
            assert_eq!(field, "page_token", "token {garbage:?}");
        }
        let other_query = SearchCatalogRequest {
            query: "登记".into(),
            ..first.clone()
        };
        let (field, reason) = invalid_field(index.search(&with_token(other_query, &token)));
        assert_eq!(field, "page_token");
        assert!(reason.contains("different query"), "{reason}");
        let other_filter = SearchCatalogRequest {
            provider_code: "samr".into(),
            ..first.clone()
        };
        assert_eq!(
            invalid_field(index.search(&with_token(other_filter, &token))).0,
            "page_token"
        );

        // The page size may change between pages: the token carries an offset, not a page number.
        let bigger_pages = SearchCatalogRequest {
            page_size: 10,
            ..first
        };
        let all = index.search(&bigger_pages).expect("search");
        let rest = index
            .search(&with_token(bigger_pages, &token))
            .expect("search");
        assert_eq!(codes(&rest), codes(&all)[2..]);
    }

    #[test]
    fn deep_offsets_are_refused() {
        let index = index_with(&sample_catalog());
        let req = query("企业");
        let fingerprint = request_fingerprint(&req);
        let at_cap = encode_page_token(MAX_RESULT_OFFSET, &fingerprint);
        let page = index.search(&SearchCatalogRequest {
            page_token: at_cap,
            ..req.clone()
        });
        assert!(page.expect("offset at the cap is served").hits.is_empty());
        let past_cap = encode_page_token(MAX_RESULT_OFFSET + 1, &fingerprint);
        let (field, reason) = invalid_field(index.search(&SearchCatalogRequest {
            page_token: past_cap,
            ..req
        }));
        assert_eq!(field, "page_token");
        assert!(reason.contains("narrow the search"), "{reason}");
    }

    #[test]
    fn upsert_replaces_an_entry() {
        let index = index_with(&sample_catalog());
        let mut renamed = entry("101001/000001", "市场主体名录");
        renamed.summary = "在册市场主体".to_string();
        index.upsert(&[renamed]).expect("upsert");
        assert_eq!(index.len(), 5);
        assert!(search_codes(&index, &query("企业登记")).is_empty());
        assert!(!search_codes(&index, &query("法定代表人")).contains(&"101001/000001".to_string()));
        assert_eq!(
            search_codes(&index, &query("市场主体名录")),
            ["101001/000001"]
        );
    }

    #[test]
    fn repeated_code_in_one_batch_keeps_the_last_version() {
        let index = index_with(&[
            entry("101001/000001", "企业登记信息"),
            entry("101001/000001", "人口基本信息"),
        ]);
        assert_eq!(index.len(), 1);
        assert!(search_codes(&index, &query("企业")).is_empty());
        assert_eq!(search_codes(&index, &query("人口")), ["101001/000001"]);
    }

    #[test]
    fn withdrawn_entries_are_removed() {
        let index = index_with(&sample_catalog());
        let mut tombstone = entry("101002/000001", "纳税信用等级");
        tombstone.withdrawn = true;
        index.upsert(&[tombstone.clone()]).expect("upsert");
        assert_eq!(index.len(), 4);
        assert!(search_codes(&index, &query("纳税")).is_empty());
        // A tombstone for an entry never indexed is harmless.
        tombstone.resource_code = "101002/000099".to_string();
        index.upsert(&[tombstone]).expect("upsert");
        assert_eq!(index.len(), 4);
    }

    #[test]
    fn remove_deletes_by_code() {
        let index = index_with(&sample_catalog());
        index
            .remove(&[
                "101001/000001".to_string(),
                "102001/000001".to_string(),
                "999/000001".to_string(),
            ])
            .expect("remove");
        assert_eq!(index.len(), 3);
        assert!(search_codes(&index, &query("企业登记")).is_empty());
        assert!(search_codes(&index, &query("人口")).is_empty());
        index.remove(&[]).expect("empty remove");
        assert_eq!(index.len(), 3);
    }

    #[test]
    fn many_small_commits_are_merged_in_the_background_without_losing_changes() {
        let index = CatalogIndex::new().expect("new index");
        for batch in 0..20 {
            let entries: Vec<CatalogEntry> =
                (0..5).map(|i| entry(&format!("101001/{:06}", batch * 5 + i + 1), "企业登记信息")).collect();
            index.upsert(&entries).expect("upsert");
            // Deletes committed while merges run must survive them.
            if batch % 4 == 3 {
                index.remove(&[format!("101001/{:06}", batch * 5 + 1)]).expect("remove");
            }
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while index.reader.searcher().segment_readers().len() > MAX_SEGMENTS {
            assert!(std::time::Instant::now() < deadline, "segments were never merged");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(index.len(), 95);
        let page = index
            .search(&SearchCatalogRequest { query: "企业 登记".into(), page_size: 200, ..Default::default() })
            .expect("search");
        assert_eq!(page.total_hits, 95);
        assert!(!page.hits.iter().any(|(code, _)| code == "101001/000016"), "a removed entry came back");
    }

    #[test]
    fn entry_without_code_rejects_the_whole_batch() {
        let index = CatalogIndex::new().expect("new index");
        assert!(index.is_empty());
        let result = index.upsert(&[
            entry("101001/000001", "企业登记信息"),
            entry("", "人口基本信息"),
        ]);
        assert!(
            matches!(result, Err(SearchError::InvalidArgument { ref field, .. }) if field == "resource_code")
        );
        assert_eq!(index.len(), 0);
        // The writer is left clean: the next batch publishes only its own entries.
        index
            .upsert(&[entry("102001/000001", "人口基本信息")])
            .expect("upsert");
        assert_eq!(search_codes(&index, &query("")), ["102001/000001"]);
    }

    #[test]
    fn concurrent_writes_and_searches() {
        let index = Arc::new(CatalogIndex::new().expect("new index"));
        let writers: Vec<_> = (0..4)
            .map(|writer| {
                let index = Arc::clone(&index);
                std::thread::spawn(move || {
                    for n in 0..10 {
                        let code = format!("10100{writer}/{n:06}");
                        index
                            .upsert(&[entry(&code, "企业登记信息")])
                            .expect("upsert");
                        assert!(index.search(&query("企业登记")).expect("search").total_hits >= 1);
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().expect("writer thread");
        }
        assert_eq!(index.len(), 40);
        assert_eq!(
            index
                .search(&query("企业 登记"))
                .expect("search")
                .total_hits,
            40
        );
    }

    /// Deterministic xorshift, so the benchmark catalog is the same on every run.
    struct Xorshift(u64);

    impl Xorshift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn pick<'a>(&mut self, words: &[&'a str]) -> &'a str {
            words[(self.next() % words.len() as u64) as usize]
        }
    }

    const SUBJECTS: &[&str] = &[
        "企业",
        "个体工商户",
        "农民专业合作社",
        "人口",
        "法人",
        "社会组织",
        "事业单位",
        "纳税人",
        "建设项目",
        "不动产",
        "车辆",
        "药品",
        "医疗器械",
        "食品",
        "特种设备",
        "学校",
        "医疗机构",
        "养老机构",
        "道路运输",
        "危险化学品",
        "排污单位",
        "出口企业",
        "高新技术企业",
        "律师事务所",
        "旅行社",
        "网约车",
        "电动自行车",
    ];
    const TOPICS: &[&str] = &[
        "登记",
        "年报",
        "纳税信用",
        "信用等级",
        "行政许可",
        "行政处罚",
        "质量监督抽查",
        "社会保险缴费",
        "住房公积金",
        "婚姻登记",
        "出生医学证明",
        "死亡证明",
        "资质认定",
        "产品质量",
        "安全生产",
        "环境监测",
        "用电",
        "用水",
        "欠税公告",
        "失信被执行人",
        "经营异常名录",
        "注销",
        "股权出质",
        "知识产权",
        "商标注册",
        "专利授权",
    ];
    const SUFFIXES: &[&str] = &[
        "信息",
        "结果",
        "记录",
        "名录",
        "数据",
        "清单",
        "证照信息",
        "统计",
    ];
    const ITEMS: &[&str] = &[
        "统一社会信用代码",
        "企业名称",
        "法定代表人",
        "注册资本",
        "成立日期",
        "登记机关",
        "经营范围",
        "住所",
        "公民身份号码",
        "姓名",
        "性别",
        "出生日期",
        "户籍地址",
        "许可证编号",
        "有效期",
        "发证机关",
        "处罚决定书文号",
        "违法事实",
        "处罚结果",
        "抽查结论",
        "检验机构",
        "纳税信用级别",
        "评价年度",
        "缴费基数",
        "缴费月份",
    ];

    fn benchmark_catalog(size: usize) -> Vec<CatalogEntry> {
        let mut rng = Xorshift(0x9E37_79B9_7F4A_7C15);
        let providers: Vec<String> = (0..60).map(|n| format!("dept{n:02}")).collect();
        (0..size)
            .map(|n| {
                let (subject, topic, suffix) =
                    (rng.pick(SUBJECTS), rng.pick(TOPICS), rng.pick(SUFFIXES));
                let classification = format!(
                    "{}{:02}{:03}{:03}",
                    1 + rng.next() % 3,
                    rng.next() % 20,
                    rng.next() % 50,
                    rng.next() % 10
                );
                let data_items = (0..5)
                    .map(|_| DataItem {
                        name: rng.pick(ITEMS).to_string(),
                        description: String::new(),
                        ..Default::default()
                    })
                    .collect();
                CatalogEntry {
                    resource_code: format!("{classification}/{n:06}"),
                    name: format!("{subject}{topic}{suffix}"),
                    summary: format!(
                        "本资源记录{subject}的{topic}情况，由{}提供，用于{}{}",
                        rng.pick(&[
                            "市场监管部门",
                            "税务部门",
                            "公安部门",
                            "人社部门",
                            "住建部门"
                        ]),
                        rng.pick(SUBJECTS),
                        rng.pick(TOPICS)
                    ),
                    provider_code: providers[(rng.next() % providers.len() as u64) as usize]
                        .clone(),
                    classification,
                    data_items,
                    share_type: 1 + (rng.next() % 3) as i32,
                    record_kind: 1 + (rng.next() % 3) as i32,
                    update_cycle: 1 + (rng.next() % 7) as i32,
                    ..Default::default()
                }
            })
            .collect()
    }

    fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
        sorted[((sorted.len() - 1) as f64 * fraction).round() as usize]
    }

    fn report(label: &str, mut latencies: Vec<Duration>, mean_hits: u64) {
        latencies.sort();
        println!(
            "{label:>22}: p50 {:?}  p99 {:?}  max {:?}  (mean hits {mean_hits})",
            percentile(&latencies, 0.50),
            percentile(&latencies, 0.99),
            latencies[latencies.len() - 1],
        );
    }

    /// Run with `cargo test --release -p directory search -- --ignored --nocapture`.
    #[test]
    #[ignore = "benchmark: run in release mode and read the figures"]
    fn benchmark_100k_entries() {
        let entries = benchmark_catalog(100_000);
        let index = CatalogIndex::new().expect("new index");
        let started = Instant::now();
        index.upsert(&entries).expect("upsert");
        println!("indexed {} entries in {:?}", index.len(), started.elapsed());

        let mut rng = Xorshift(42);
        let two_word_queries: Vec<String> = (0..2_000)
            .map(|_| format!("{} {}", rng.pick(SUBJECTS), rng.pick(TOPICS)))
            .collect();
        let glued_queries: Vec<String> = (0..2_000)
            .map(|_| format!("{}{}", rng.pick(SUBJECTS), rng.pick(TOPICS)))
            .collect();
        let single_word_queries: Vec<String> =
            (0..2_000).map(|_| rng.pick(ITEMS).to_string()).collect();
        let filtered = |text: &String| SearchCatalogRequest {
            classification_prefix: "1".into(),
            share_type: ShareType::Conditional as i32,
            ..query(text)
        };
        let runs: Vec<(&str, Vec<SearchCatalogRequest>)> = vec![
            (
                "two words",
                two_word_queries.iter().map(|q| query(q)).collect(),
            ),
            (
                "two words glued",
                glued_queries.iter().map(|q| query(q)).collect(),
            ),
            (
                "two words + 2 filters",
                two_word_queries.iter().map(filtered).collect(),
            ),
            (
                "one data item word",
                single_word_queries.iter().map(|q| query(q)).collect(),
            ),
            ("match all", vec![query(""); 200]),
        ];
        for (label, requests) in runs {
            let mut latencies = Vec::with_capacity(requests.len());
            let mut hits = 0u64;
            for req in &requests {
                let started = Instant::now();
                let page = index.search(req).expect("search");
                latencies.push(started.elapsed());
                hits += page.total_hits;
            }
            report(label, latencies, hits / requests.len() as u64);
        }

        // The floor on this corpus and machine, measured in the same run: the same two words as a bare
        // AND on the text field, top 20 by score, no facets, segmented beforehand.
        let searcher = index.reader.searcher();
        let mut latencies = Vec::with_capacity(two_word_queries.len());
        let mut hits = 0u64;
        for text in &two_word_queries {
            let bare_and = BooleanQuery::new(
                index
                    .segment_query(text)
                    .iter()
                    .map(|word| -> (Occur, Box<dyn Query>) {
                        let term = Term::from_field_text(index.fields.text, &word.word);
                        let term_query = TermQuery::new(term, IndexRecordOption::WithFreqs);
                        (Occur::Must, Box::new(term_query))
                    })
                    .collect(),
            );
            let started = Instant::now();
            let (count, _top) = searcher
                .search(
                    &bare_and,
                    &(Count, TopDocs::with_limit(20).order_by_score()),
                )
                .expect("search");
            latencies.push(started.elapsed());
            hits += count as u64;
        }
        report(
            "baseline: bare AND",
            latencies,
            hits / two_word_queries.len() as u64,
        );

        let latencies = entries[..50]
            .iter()
            .map(|entry| {
                let started = Instant::now();
                index.upsert(std::slice::from_ref(entry)).expect("upsert");
                started.elapsed()
            })
            .collect();
        report("single-entry upsert", latencies, 1);
    }
}
