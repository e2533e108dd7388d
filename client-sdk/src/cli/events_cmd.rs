//! `exchangectl events ...`: publish changes, subscribe, unsubscribe, list subscriptions, receive events.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::args::EventsCommand;
use super::output::{now_unix_ms, EventLineView, EventsPublishedView, SubscribedView, SubscriptionsView, UnsubscribedView};
use super::records_cmd::{annotate_changes, parse_records, progress_bar, read_file};
use super::{CliError, Ctx};
use crate::events::{is_transient_error, AckMode, RecordChangeKind, SubscriptionOptions, CHANGE_KINDS};

/// Without --follow, `events receive` stops when no event came for this long.
pub const RECEIVE_IDLE: Duration = Duration::from_secs(1);

pub(super) async fn run(ctx: &Ctx, cmd: EventsCommand) -> Result<(), CliError> {
    match cmd {
        EventsCommand::Publish { resource, file, kind } => publish(ctx, &resource, &file, kind.as_deref()).await,
        EventsCommand::Subscribe { resource } => subscribe(ctx, &resource).await,
        EventsCommand::Unsubscribe { resource } => unsubscribe(ctx, &resource).await,
        EventsCommand::List => list(ctx).await,
        EventsCommand::Receive { resource, after, follow, max, no_ack } => {
            receive(ctx, &resource, ReceiveArgs { after, follow, max, ack: !no_ack }).await
        }
    }
}

async fn publish(ctx: &Ctx, resource: &str, file: &Path, kind: Option<&str>) -> Result<(), CliError> {
    let kind = match kind {
        None => RecordChangeKind::Unspecified,
        Some(word) => CHANGE_KINDS
            .parse(word)
            .ok_or_else(|| CliError::Usage(format!("--kind {word}: expected {}", CHANGE_KINDS.choices())))?,
    };
    let name = if file == Path::new("-") { PathBuf::from("(stdin)") } else { file.to_path_buf() };
    let records = parse_records(&read_file(file)?).map_err(|reason| CliError::File { path: name.clone(), reason })?;
    let keys: Vec<String> = records.iter().map(|r| r.key.clone()).collect();
    let client = ctx.exchange()?;
    let progress = progress_bar(ctx, records.len(), "publishing");
    let changes = records
        .into_iter()
        .map(|r| crate::events::RecordChange { record: Some(r), kind: kind as i32 })
        .collect();
    let result = client.publish_with_progress(resource, changes, |n| progress.inc(n as u64)).await;
    progress.finish_and_clear();
    let published = result.map_err(|e| CliError::Client(annotate_changes(e, &keys)))?;
    let view = EventsPublishedView {
        file: name.display().to_string(),
        resource_code: resource.to_string(),
        via: ctx.global.node_addr().to_string(),
        kind: CHANGE_KINDS.word(kind as i32),
        changes: published.changes,
        first_seq: published.first_seq,
        last_seq: published.last_seq,
        duplicate_batches: published.duplicate_batches,
    };
    ctx.out.emit(&view, || view.human());
    Ok(())
}

async fn subscribe(ctx: &Ctx, resource: &str) -> Result<(), CliError> {
    let resp = ctx.exchange()?.subscribe(resource).await?;
    let view = SubscribedView::new(resource, resp);
    ctx.out.emit(&view, || view.human());
    Ok(())
}

async fn unsubscribe(ctx: &Ctx, resource: &str) -> Result<(), CliError> {
    let existed = ctx.exchange()?.unsubscribe(resource).await?;
    let view = UnsubscribedView { resource_code: resource.to_string(), existed };
    ctx.out.emit(&view, || view.human());
    Ok(())
}

async fn list(ctx: &Ctx) -> Result<(), CliError> {
    let view = SubscriptionsView::from(ctx.exchange()?.list_subscriptions().await?);
    ctx.out.emit(&view, || view.human(now_unix_ms()));
    Ok(())
}

struct ReceiveArgs {
    after: Option<u64>,
    follow: bool,
    max: Option<u64>,
    ack: bool,
}

/// Why `events receive` stopped.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    Idle,
    Max,
    Ended(String),
    Interrupted,
    /// Standard output was closed (`| head`): the batch that could not be written is not acknowledged.
    OutputClosed,
}

/// How many events of a batch of `len` to print when `printed` are out and at most `max` may be.
fn take_of(len: usize, printed: u64, max: Option<u64>) -> usize {
    match max {
        Some(max) => len.min(max.saturating_sub(printed) as usize),
        None => len,
    }
}

/// Prints events as JSON lines on stdout, acknowledging each batch once it is written; the summary goes to
/// stderr, so stdout holds only events.
async fn receive(ctx: &Ctx, resource: &str, args: ReceiveArgs) -> Result<(), CliError> {
    let client = ctx.exchange()?;
    let options = SubscriptionOptions {
        ack: AckMode::Manual,
        max_batch: args.max.map_or(0, |m| m.min(1000) as u32),
        ..Default::default()
    };
    let mut sub = client.resume_subscription(resource, args.after.unwrap_or(0), options);
    // Fail fast: no subscription, node unreachable, a position the node no longer holds.
    sub.connect().await?;
    if args.follow {
        eprintln!("receiving events of {resource} (Ctrl-C to stop)");
    }
    let mut out = std::io::BufWriter::new(std::io::stdout());
    let mut tally = Tally { ack: args.ack, ..Default::default() };
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let stop = loop {
        let next = tokio::select! {
            _ = &mut ctrl_c => break Stop::Interrupted,
            next = async {
                if args.follow {
                    Ok(sub.next_batch().await)
                } else {
                    tokio::time::timeout(RECEIVE_IDLE, sub.next_batch()).await
                }
            } => next,
        };
        let batch = match next {
            Err(_) => break Stop::Idle,
            Ok(Err(e)) => {
                let _ = out.flush();
                tally.summary(resource, None);
                return Err(e.into());
            }
            Ok(Ok(None)) => break Stop::Ended(sub.ended_reason().unwrap_or_default().to_string()),
            Ok(Ok(Some(batch))) => batch,
        };
        let take = take_of(batch.len(), tally.printed, args.max);
        let lines: Vec<(u64, String)> = batch
            .into_iter()
            .take(take)
            .map(|e| (e.seq, serde_json::to_string(&EventLineView::from(e)).expect("views serialize")))
            .collect();
        let Some(batch_last) = lines.last().map(|(seq, _)| *seq) else { continue };
        let written = lines.iter().try_for_each(|(_, line)| writeln!(out, "{line}")).and_then(|_| out.flush());
        if written.is_err() {
            break Stop::OutputClosed;
        }
        tally.printed(lines[0].0, batch_last, lines.len() as u64);
        if args.ack {
            match sub.ack_upto(batch_last).await {
                Ok(_) => tally.acked = batch_last,
                // The next acknowledgement covers this batch too.
                Err(e) if is_transient_error(&e) => eprintln!("warning: acknowledging up to seq {batch_last} failed: {e}"),
                Err(e) => return Err(e.into()),
            }
        }
        if args.max.is_some_and(|m| tally.printed >= m) {
            break Stop::Max;
        }
    };
    let ended = match &stop {
        Stop::Ended(reason) => Some(reason.as_str()),
        _ => None,
    };
    tally.summary(resource, ended);
    if stop == Stop::OutputClosed {
        eprintln!("standard output was closed: the events not written are not acknowledged");
    }
    if stop == Stop::Idle && tally.printed == 0 {
        if let Some(e) = sub.last_error() {
            eprintln!("(the stream was interrupted: {e})");
        }
    }
    Ok(())
}

/// What `events receive` printed and acknowledged, for its summary.
#[derive(Debug, Default)]
struct Tally {
    printed: u64,
    first: u64,
    last: u64,
    acked: u64,
    ack: bool,
}

impl Tally {
    fn printed(&mut self, first: u64, last: u64, n: u64) {
        if self.printed == 0 {
            self.first = first;
        }
        self.last = last;
        self.printed += n;
    }

    fn text(&self, resource: &str, ended: Option<&str>) -> String {
        let mut text = if self.printed == 0 {
            format!("no new events of {resource}")
        } else {
            let ack = match (self.ack, self.acked) {
                (false, _) => "; not acknowledged (--no-ack)".to_string(),
                (true, a) if a == self.last => format!("; acknowledged up to seq {a}"),
                (true, 0) => "; not acknowledged (the acknowledgement failed; they will be delivered again)".to_string(),
                (true, a) => format!("; acknowledged up to seq {a} only (the rest will be delivered again)"),
            };
            format!(
                "received {} event{} of {resource} (seq {}-{}){ack}",
                self.printed,
                if self.printed == 1 { "" } else { "s" },
                self.first,
                self.last
            )
        };
        if let Some(reason) = ended {
            let reason = if reason.is_empty() { "(no reason given)" } else { reason };
            text.push_str(&format!("\nthe subscription to {resource} has ended: {reason}"));
        }
        text
    }

    fn summary(&self, resource: &str, ended: Option<&str>) {
        eprintln!("{}", self.text(resource, ended));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_cuts_the_last_batch() {
        assert_eq!(take_of(1000, 0, None), 1000);
        assert_eq!(take_of(1000, 0, Some(5)), 5);
        assert_eq!(take_of(3, 4, Some(5)), 1);
        assert_eq!(take_of(3, 5, Some(5)), 0);
        assert_eq!(take_of(3, 9, Some(5)), 0);
    }

    #[test]
    fn summary_says_what_was_acknowledged() {
        let r = "101001/000001";
        let mut t = Tally { ack: true, ..Default::default() };
        assert_eq!(t.text(r, None), "no new events of 101001/000001");
        t.printed(2, 1001, 1000);
        t.printed(1002, 2503, 1502);
        t.acked = 2503;
        assert_eq!(t.text(r, None), "received 2502 events of 101001/000001 (seq 2-2503); acknowledged up to seq 2503");
        t.acked = 1001;
        assert!(t.text(r, None).ends_with("acknowledged up to seq 1001 only (the rest will be delivered again)"));
        t.ack = false;
        assert!(t.text(r, Some("grant G00000001 revoked")).ends_with(
            "not acknowledged (--no-ack)\nthe subscription to 101001/000001 has ended: grant G00000001 revoked"
        ));
    }
}
