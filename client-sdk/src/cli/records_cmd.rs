//! `exchangectl records ...`: put records into the department's node, get records through it, copy a
//! whole resource through it (sync).

use std::collections::HashMap;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use exchange_proto::v1::Record;
use serde::Deserialize;

use super::args::RecordsCommand;
use super::output::{PutView, QueryView, SyncView};
use super::sync_file;
use super::{annotate_indexed, CliError, Ctx};
use crate::error::ClientError;

pub(super) async fn run(ctx: &Ctx, cmd: RecordsCommand) -> Result<(), CliError> {
    match cmd {
        RecordsCommand::Put { resource, file } => put(ctx, &resource, &file).await,
        RecordsCommand::Get { resource, keys, purpose } => get(ctx, &resource, &keys, &purpose).await,
        RecordsCommand::Sync { resource, out, purpose, restart, quiet } => {
            sync(ctx, &resource, &out, &purpose, restart, quiet).await
        }
    }
}

/// One record as written in a file: `{"key": "...", "items": {"名称": "值"}}`. A `version` (as `records
/// sync` writes it) is accepted and ignored: the node gives versions.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordLine {
    key: String,
    #[serde(default)]
    items: serde_json::Map<String, serde_json::Value>,
    #[serde(default, rename = "version")]
    _version: Option<u64>,
}

/// Reads records from a JSON array or from JSON lines (chosen by the first character). Item values may be
/// strings, numbers or booleans (written as their JSON text); `null` leaves the item out.
pub(super) fn parse_records(text: &str) -> Result<Vec<Record>, String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text); // a byte order mark from some editors
    let lines: Vec<(String, RecordLine)> = if text.trim_start().starts_with('[') {
        let all: Vec<RecordLine> =
            serde_json::from_str(text).map_err(|e| format!("not a JSON array of records: {e}"))?;
        all.into_iter().enumerate().map(|(i, r)| (format!("records[{i}]"), r)).collect()
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(n, l)| {
                serde_json::from_str(l)
                    .map(|r| (format!("line {}", n + 1), r))
                    .map_err(|e| format!("line {}: {e}", n + 1))
            })
            .collect::<Result<_, _>>()?
    };
    if lines.is_empty() {
        return Err("no records in the file".to_string());
    }
    lines
        .into_iter()
        .map(|(at, line)| {
            let items = line
                .items
                .into_iter()
                .filter_map(|(name, value)| match value {
                    serde_json::Value::Null => None,
                    serde_json::Value::String(s) => Some(Ok((name, s))),
                    serde_json::Value::Number(n) => Some(Ok((name, n.to_string()))),
                    serde_json::Value::Bool(b) => Some(Ok((name, b.to_string()))),
                    _ => Some(Err(format!("{at}: item {name:?} must be text, a number or true/false"))),
                })
                .collect::<Result<HashMap<_, _>, _>>()?;
            Ok(Record { key: line.key, items, ..Default::default() })
        })
        .collect()
}

pub(super) fn read_file(path: &Path) -> Result<String, CliError> {
    let err = |reason: String| CliError::File { path: path.to_path_buf(), reason };
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).map_err(|e| err(e.to_string()))?;
        Ok(text)
    } else {
        std::fs::read_to_string(path).map_err(|e| err(e.to_string()))
    }
}

async fn put(ctx: &Ctx, resource: &str, file: &Path) -> Result<(), CliError> {
    let name = if file == Path::new("-") { PathBuf::from("(stdin)") } else { file.to_path_buf() };
    let records = parse_records(&read_file(file)?).map_err(|reason| CliError::File { path: name.clone(), reason })?;
    let keys: Vec<String> = records.iter().map(|r| r.key.clone()).collect();
    let client = ctx.exchange()?;
    let progress = progress_bar(ctx, records.len(), "storing");
    let result = client.put_records_with_progress(resource, records, |n| progress.inc(n as u64)).await;
    progress.finish_and_clear();
    let stored = result.map_err(|e| CliError::Client(annotate_with_keys(e, &keys)))?;
    let view = PutView {
        file: name.display().to_string(),
        resource_code: resource.to_string(),
        via: ctx.global.node_addr().to_string(),
        records: keys.len(),
        stored,
    };
    ctx.out.emit(&view, || view.human());
    Ok(())
}

/// `records[3].items[住所]` → `records[3] (91350100M000100Y43).items[住所]`, so a refusal points at the
/// line of the file.
fn annotate_with_keys(mut error: ClientError, keys: &[String]) -> ClientError {
    if let ClientError::InvalidArgument { violations, .. } = &mut error {
        for v in violations {
            v.field = annotate_indexed(&v.field, "records", keys);
        }
    }
    error
}

/// `changes[3].record.items[住所]` → `changes[3] (91350100M000100Y43).record.items[住所]` (events publish).
pub(super) fn annotate_changes(mut error: ClientError, keys: &[String]) -> ClientError {
    if let ClientError::InvalidArgument { violations, .. } = &mut error {
        for v in violations {
            v.field = annotate_indexed(&v.field, "changes", keys);
        }
    }
    error
}

/// A progress bar on stderr for uploads of more than one batch; hidden for `--json`, for a single batch
/// and when stderr is not a terminal.
pub(super) fn progress_bar(ctx: &Ctx, total: usize, verb: &str) -> indicatif::ProgressBar {
    if ctx.out.json || total <= exchange_proto::limits::MAX_BATCH_RECORDS || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template(&format!("{verb} {{bar:40}} {{pos}}/{{len}} records ({{eta}})")) {
        bar.set_style(style);
    }
    bar
}

/// The `records sync` progress bar on stderr: count/total, rate and time left. Hidden with --quiet, --json,
/// or when stderr or stdout is not a terminal (a script or a log).
fn sync_bar(ctx: &Ctx, quiet: bool, resource: &str) -> indicatif::ProgressBar {
    if quiet || ctx.out.json || !std::io::stderr().is_terminal() || !std::io::stdout().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::no_length().with_message(resource.to_string());
    let template = "{msg} {wide_bar} {human_pos}/{human_len} records, {rate}, ETA {eta}";
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        let style = style.with_key("rate", |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{:.0} records/s", s.per_sec());
        });
        bar.set_style(style);
    }
    bar
}

/// What a sync run did, for its summary and for the resume hint.
struct SyncRun {
    written: u64,
    total: u64,
    head_seq: u64,
}

/// `records sync`: every record of a resource, through the node, appended to a JSON-lines file; continues
/// an existing file after its last complete line. Flushed at the end, on an error and on Ctrl-C.
async fn sync(ctx: &Ctx, resource: &str, out: &Path, purpose: &str, restart: bool, quiet: bool) -> Result<(), CliError> {
    let file_err = |reason: String| CliError::File { path: out.to_path_buf(), reason };
    let created = restart || !out.exists();
    let (file, resume) = sync_file::open(out, restart).map_err(file_err)?;
    if resume.partial_len > 0 {
        eprintln!(
            "note: dropped a partial last line ({} bytes) left in {} by an interrupted run",
            resume.partial_len,
            out.display()
        );
    }
    if resume.records > 0 {
        eprintln!("continuing {}: {} records are in it already", out.display(), resume.records);
    }
    let client = ctx.exchange()?;
    let mut reader = client.snapshot_reader(resource, &resume.last_key, purpose);
    let mut writer = std::io::BufWriter::with_capacity(1 << 20, file);
    let bar = sync_bar(ctx, quiet, resource);
    let started = Instant::now();
    let mut run = SyncRun { written: 0, total: 0, head_seq: 0 };
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let outcome: Result<(), CliError> = loop {
        let page = tokio::select! {
            _ = &mut ctrl_c => break Err(CliError::Interrupted(String::new())),
            page = reader.next_page() => page,
        };
        let page = match page {
            Ok(Some(page)) => page,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e.into()),
        };
        if run.total == 0 && run.head_seq == 0 {
            run.total = reader.total_records().unwrap_or(0);
            run.head_seq = reader.head_seq().unwrap_or(0);
            bar.set_length(run.total.max(resume.records));
            bar.set_position(resume.records);
            bar.reset_eta();
        }
        let written = page.records.iter().try_for_each(|r| writeln!(writer, "{}", sync_file::record_line(r)));
        if let Err(e) = written {
            break Err(file_err(format!("write failed: {e}")));
        }
        run.written += page.records.len() as u64;
        bar.inc(page.records.len() as u64);
    };
    let flushed = writer.flush().and_then(|_| writer.get_ref().sync_all());
    bar.finish_and_clear();
    let in_file = resume.records + run.written;
    let resume_hint = format!(
        "{} records written to {} ({in_file} in it); run the same command again to continue after the last \
         complete line (--restart starts over)",
        run.written,
        out.display()
    );
    if let Err(e) = flushed {
        return Err(file_err(format!("flush failed: {e}; {resume_hint}")));
    }
    if let Err(e) = outcome {
        if in_file == 0 && created {
            // Nothing to continue: leave no empty file behind.
            let _ = std::fs::remove_file(out);
        }
        return Err(match e {
            CliError::Interrupted(_) if run.written == 0 => CliError::Interrupted("interrupted before any record was written".into()),
            CliError::Interrupted(_) => CliError::Interrupted(format!("interrupted: {resume_hint}")),
            e => {
                if run.written > 0 {
                    eprintln!("{resume_hint}");
                }
                e
            }
        });
    }
    let seconds = started.elapsed().as_secs_f64();
    let view = SyncView {
        resource_code: resource.to_string(),
        file: out.display().to_string(),
        via: ctx.global.node_addr().to_string(),
        records_written: run.written,
        records_in_file: in_file,
        total_records: run.total,
        head_seq: run.head_seq,
        seconds,
        records_per_second: if seconds > 0.0 { run.written as f64 / seconds } else { 0.0 },
        continued: resume.records > 0,
        dropped_partial_bytes: resume.partial_len,
    };
    ctx.out.emit(&view, || view.human());
    Ok(())
}

async fn get(ctx: &Ctx, resource: &str, keys: &[String], purpose: &str) -> Result<(), CliError> {
    let client = ctx.exchange()?;
    let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let result = client.query(resource, &key_refs, purpose).await?;
    let view = QueryView::new(resource, keys, result);
    ctx.out.emit(&view, || view.human());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::FieldViolation;

    #[test]
    fn json_array_and_json_lines_read_the_same() {
        let array = r#"[
            {"key": "91350100M000100Y43", "items": {"企业名称": "某某公司", "注册资本": 1000.5, "成立日期": "2015-06-01"}},
            {"key": "91310115MA1H8R7C67", "items": {"登记状态": "存续", "住所": null, "在业": true}}
        ]"#;
        let lines = "\u{feff}{\"key\": \"91350100M000100Y43\", \"items\": {\"企业名称\": \"某某公司\", \"注册资本\": 1000.5, \"成立日期\": \"2015-06-01\"}}\n\n\
                     {\"key\": \"91310115MA1H8R7C67\", \"items\": {\"登记状态\": \"存续\", \"住所\": null, \"在业\": true}}\n";
        let a = parse_records(array).unwrap();
        let l = parse_records(lines).unwrap();
        assert_eq!(a, l);
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].items["注册资本"], "1000.5");
        assert_eq!(a[1].items.len(), 2, "null leaves the item out");
        assert_eq!(a[1].items["在业"], "true");
    }

    #[test]
    fn file_errors_say_where() {
        let err = parse_records("{\"key\": \"a\"}\n{\"key\": \"b\", \"item\": {}}\n").unwrap_err();
        assert!(err.starts_with("line 2: unknown field `item`"), "{err}");
        let err = parse_records(r#"[{"key": "a", "items": {"x": [1]}}]"#).unwrap_err();
        assert_eq!(err, "records[0]: item \"x\" must be text, a number or true/false");
        let err = parse_records("[{\"items\": {}}]").unwrap_err();
        assert!(err.contains("missing field `key`"), "{err}");
        assert_eq!(parse_records("  \n").unwrap_err(), "no records in the file");
        assert_eq!(parse_records("[]").unwrap_err(), "no records in the file");
    }

    #[test]
    fn refusals_name_the_key_of_each_bad_record() {
        let error = ClientError::InvalidArgument {
            message: "invalid request".into(),
            violations: vec![
                FieldViolation { field: "records[1].items[成立日期]".into(), description: "not a date".into() },
                FieldViolation { field: "resource_code".into(), description: "not published by tax".into() },
            ],
        };
        let keys = vec!["a".to_string(), "91350100M000100Y43".to_string()];
        let text = CliError::Client(annotate_with_keys(error, &keys)).to_string();
        assert!(text.contains("\n  - records[1] (91350100M000100Y43).items[成立日期]: not a date"), "{text}");
        assert!(text.contains("\n  - resource_code: not published by tax"), "{text}");
    }
}
