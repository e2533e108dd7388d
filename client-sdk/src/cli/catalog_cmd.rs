//! `exchangectl catalog ...`: search, get, publish, withdraw, watch.

use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use exchange_proto::v1::{
    GetEntryRequest, ResolveResourceRequest, SearchCatalogRequest, WatchCatalogRequest, WithdrawEntriesRequest, WithdrawEntriesResponse,
};
use tonic::Code;

use super::args::SearchArgs;
use super::output::{entry_human, now_unix_ms, ChangeView, PublishView, PublishedView, ResolveView, SearchView, WithdrawView};
use super::{CliError, Ctx};
use crate::catalog::{CatalogEntrySpec, CatalogFile, EnumWords, RECORD_KINDS, SHARE_TYPES, UPDATE_CYCLES};
use crate::client::{self, BatchPublishError};
use crate::error::ClientError;

/// A filter word from the command line (`--share-type conditional`) as the wire enum; absent = any.
fn filter<E: Copy + PartialEq + Into<i32>>(words: &EnumWords<E>, flag: &str, value: &Option<String>) -> Result<i32, CliError> {
    match value {
        None => Ok(0),
        Some(w) => words
            .parse(w)
            .map(Into::into)
            .ok_or_else(|| CliError::Usage(format!("--{flag} {w:?} is not one of {}", words.choices()))),
    }
}

/// The search request the flags describe.
pub(super) fn search_request(args: &SearchArgs) -> Result<SearchCatalogRequest, CliError> {
    Ok(SearchCatalogRequest {
        query: args.query.clone().unwrap_or_default(),
        provider_code: args.provider.clone().unwrap_or_default(),
        classification_prefix: args.class.clone().unwrap_or_default(),
        share_type: filter(&SHARE_TYPES, "share-type", &args.share_type)?,
        record_kind: filter(&RECORD_KINDS, "record-kind", &args.record_kind)?,
        update_cycle: filter(&UPDATE_CYCLES, "update-cycle", &args.update_cycle)?,
        page_size: args.page_size.unwrap_or(0),
        page_token: args.page_token.clone().unwrap_or_default(),
    })
}

pub(super) async fn search(ctx: &Ctx, args: SearchArgs) -> Result<(), CliError> {
    let mut request = search_request(&args)?;
    let mut directory = ctx.directory()?;
    let mut pages = Vec::new();
    let mut seen_tokens = HashSet::new();
    loop {
        let page = directory
            .search_catalog(ctx.request(request.clone()))
            .await
            .map_err(|s| CliError::Client(s.into()))?
            .into_inner();
        let next = page.next_page_token.clone();
        pages.push(page);
        // A token seen before would loop forever; stop rather than trust it.
        if !args.all || next.is_empty() || !seen_tokens.insert(next.clone()) {
            break;
        }
        request.page_token = next;
    }
    let mut view = SearchView::from_pages(pages);
    if args.all {
        view.next_page_token.clear();
    }
    ctx.out.emit(&view, || view.human());
    Ok(())
}

pub(super) async fn get(ctx: &Ctx, code: String, include_withdrawn: bool) -> Result<(), CliError> {
    let mut directory = ctx.directory()?;
    let entry = directory
        .get_entry(ctx.request(GetEntryRequest { resource_code: code, include_withdrawn }))
        .await
        .map_err(|s| CliError::Client(s.into()))?
        .into_inner();
    let spec = CatalogEntrySpec::from(&entry);
    ctx.out.emit(&spec, || entry_human(&spec));
    Ok(())
}

pub(super) async fn resolve(ctx: &Ctx, code: String) -> Result<(), CliError> {
    let mut directory = ctx.directory()?;
    let resolved = directory
        .resolve_resource(ctx.request(ResolveResourceRequest { resource_code: code }))
        .await
        .map_err(|s| CliError::Client(s.into()))?
        .into_inner();
    let view = ResolveView::from(resolved);
    ctx.out.emit(&view, || view.human(now_unix_ms()));
    Ok(())
}

pub(super) async fn publish(ctx: &Ctx, file: &Path, node: Option<&str>, dry_run: bool) -> Result<(), CliError> {
    let entries = CatalogFile::load_entries(file)?;
    let codes: Vec<String> = entries.iter().map(|e| e.resource_code.clone()).collect();
    let via = node.map(str::to_string).unwrap_or_else(|| "directory".to_string());
    let mut view = PublishView {
        file: file.display().to_string(),
        via,
        dry_run,
        catalog_version: 0,
        entries: entries
            .iter()
            .map(|e| PublishedView { resource_code: e.resource_code.clone(), name: e.name.clone(), version: 0 })
            .collect(),
    };
    if !dry_run {
        let progress = progress_bar(ctx, entries.len());
        let result = match node {
            None => {
                let directory = ctx.directory()?;
                client::publish_batches(
                    &entries,
                    0,
                    |req| {
                        let mut c = directory.clone();
                        let req = ctx.request(req);
                        async move { c.publish_entries(req).await }
                    },
                    |n| progress.inc(n as u64),
                )
                .await
            }
            Some(addr) => {
                let node = ctx.node(addr)?;
                client::publish_batches(
                    &entries,
                    0,
                    |req| {
                        let mut c = node.clone();
                        let req = ctx.request(req);
                        async move { c.publish_catalog(req).await }
                    },
                    |n| progress.inc(n as u64),
                )
                .await
            }
        };
        progress.finish_and_clear();
        let outcome = result.map_err(|error: BatchPublishError| CliError::Publish { error, entry_codes: codes })?;
        view.catalog_version = outcome.catalog_version;
        for (e, v) in view.entries.iter_mut().zip(outcome.entry_versions) {
            e.version = v;
        }
    }
    ctx.out.emit(&view, || view.human());
    Ok(())
}

/// A progress bar on stderr for uploads of more than one batch; hidden for `--json`, for a single batch
/// and when stderr is not a terminal.
fn progress_bar(ctx: &Ctx, total: usize) -> indicatif::ProgressBar {
    if ctx.out.json || total <= exchange_proto::limits::MAX_BATCH_ENTRIES || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template("publishing {bar:40} {pos}/{len} entries ({eta})") {
        bar.set_style(style);
    }
    bar
}

pub(super) async fn withdraw(ctx: &Ctx, codes: Vec<String>, node: Option<&str>) -> Result<(), CliError> {
    let request = ctx.request(WithdrawEntriesRequest { resource_codes: codes.clone() });
    let result: Result<tonic::Response<WithdrawEntriesResponse>, tonic::Status> = match node {
        None => ctx.directory()?.withdraw_entries(request).await,
        Some(addr) => ctx.node(addr)?.withdraw_catalog(request).await,
    };
    let resp = result.map_err(|s| CliError::Client(s.into()))?.into_inner();
    let view = WithdrawView {
        via: node.unwrap_or("directory").to_string(),
        catalog_version: resp.catalog_version,
        withdrawn: codes,
    };
    ctx.out.emit(&view, || view.human());
    Ok(())
}

/// Errors a reconnect cannot fix: the request or the certificate is wrong, or `--from` is beyond the
/// catalog's current version (OUT_OF_RANGE).
fn is_permanent(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::Unimplemented
            | Code::NotFound
            | Code::OutOfRange
    )
}

const WATCH_BACKOFF_START: Duration = Duration::from_millis(500);
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Streams changes until Ctrl-C. When the stream breaks (directory restarted, network), it reconnects
/// with capped exponential backoff and asks for changes after the last version it printed, so nothing is
/// missed or printed twice.
pub(super) async fn watch(ctx: &Ctx, from: u64) -> Result<(), CliError> {
    let mut directory = ctx.directory()?;
    let mut last_seen = from;
    let mut backoff = WATCH_BACKOFF_START;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    eprintln!("watching catalog changes after version {last_seen} at {} (Ctrl-C to stop)", ctx.global.directory);
    loop {
        let failure: ClientError = tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            opened = directory.watch_catalog(WatchCatalogRequest { from_version: last_seen }) => match opened {
                Err(status) => status.into(),
                Ok(resp) => {
                    let mut stream = resp.into_inner();
                    loop {
                        tokio::select! {
                            _ = &mut ctrl_c => return Ok(()),
                            msg = stream.message() => match msg {
                                Ok(Some(change)) => {
                                    backoff = WATCH_BACKOFF_START;
                                    // The directory sends only versions above from_version; this guards the
                                    // "never printed twice" promise against a server that does not.
                                    if change.version <= last_seen {
                                        continue;
                                    }
                                    last_seen = change.version;
                                    let view = ChangeView::from(change);
                                    ctx.out.emit_line(&view, || view.human());
                                }
                                Ok(None) => break ClientError::Unavailable("the directory ended the stream".into()),
                                Err(status) => break status.into(),
                            }
                        }
                    }
                }
            }
        };
        if is_permanent(failure.code()) {
            return Err(failure.into());
        }
        let wait = match &failure {
            ClientError::ResourceExhausted { retry_after: Some(d), .. } => (*d).max(backoff),
            _ => backoff,
        };
        eprintln!("watch interrupted ({failure}); resuming after version {last_seen} in {:.1}s", wait.as_secs_f32());
        tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
        }
        backoff = (backoff * 2).min(WATCH_BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::args::{CatalogCommand, Cli, Command};
    use clap::Parser;
    use exchange_proto::v1::{RecordKind, ShareType};

    fn search_args(args: &[&str]) -> SearchArgs {
        let cli = Cli::try_parse_from(["exchangectl", "catalog", "search"].iter().chain(args)).unwrap();
        match cli.command {
            Command::Catalog(CatalogCommand::Search(s)) => s,
            _ => unreachable!(),
        }
    }

    #[test]
    fn search_flags_become_the_request() {
        let req = search_request(&search_args(&["纳税", "--share-type", "not_shared", "--record-kind", "population"])).unwrap();
        assert_eq!(req.query, "纳税");
        assert_eq!(req.share_type, ShareType::NotShared as i32);
        assert_eq!(req.record_kind, RecordKind::Population as i32);
        assert_eq!(req.update_cycle, 0);
        assert_eq!(req.page_size, 0, "0 lets the directory pick its default");
    }

    #[test]
    fn a_bad_filter_word_lists_the_choices() {
        let err = search_request(&search_args(&["--update-cycle", "hourly"])).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("real_time|daily|weekly"), "{err}");
    }

    #[test]
    fn permanent_watch_errors() {
        assert!(is_permanent(Code::PermissionDenied));
        assert!(is_permanent(Code::OutOfRange), "watch --from a future version must fail, not spin");
        assert!(!is_permanent(Code::Unavailable));
        assert!(!is_permanent(Code::Internal));
    }
}
