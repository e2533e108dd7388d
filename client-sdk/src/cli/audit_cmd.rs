//! `exchangectl audit ...`: query and verify the node's audit trail (operator of the node's department).

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::args::{AuditCommand, AuditQueryArgs};
use super::output::{now_unix_ms, AuditView, VerifyView, GRPC_CODE_NAMES};
use super::{CliError, Ctx};
use crate::records::{parse_date, unix_ms, QueryAuditRequest};

pub(super) async fn run(ctx: &Ctx, cmd: AuditCommand) -> Result<(), CliError> {
    let client = ctx.exchange()?;
    match cmd {
        AuditCommand::Verify => {
            let view = VerifyView::from(client.verify_audit().await?);
            ctx.out.emit(&view, || view.human());
            if !view.intact {
                return Err(CliError::AuditTampered { problem: view.problem, seq: view.problem_seq });
            }
        }
        AuditCommand::Query(args) => {
            let request = query_request(&args, now_unix_ms())?;
            let view = AuditView::from(client.query_audit(request).await?);
            ctx.out.emit(&view, || view.human());
        }
    }
    Ok(())
}

/// The request the flags describe; relative times count back from `now_ms`.
pub(super) fn query_request(args: &AuditQueryArgs, now_ms: i64) -> Result<QueryAuditRequest, CliError> {
    let time = |flag: &str, value: &Option<String>| -> Result<i64, CliError> {
        value
            .as_deref()
            .map_or(Ok(0), |t| parse_time(t, now_ms).map_err(|e| CliError::Usage(format!("--{flag} {t:?}: {e}"))))
    };
    let (from, to) = (time("since", &args.since)?, time("until", &args.until)?);
    if from > 0 && to > 0 && from > to {
        return Err(CliError::Usage("--since is after --until".into()));
    }
    Ok(QueryAuditRequest {
        from_unix_ms: from,
        to_unix_ms: to,
        peer: args.peer.clone().unwrap_or_default(),
        resource_code: args.resource.clone().unwrap_or_default(),
        result: args.result.as_deref().map(result_filter).transpose()?.unwrap_or_default(),
        record_key: args.record_key.clone().unwrap_or_default(),
        message_id: args.message_id.clone().unwrap_or_default(),
        limit: args.limit.unwrap_or(0),
    })
}

/// `--result`: `ok`, `error` or a gRPC code name, in any case (`permission_denied` → `PERMISSION_DENIED`).
pub(super) fn result_filter(word: &str) -> Result<String, CliError> {
    let lower = word.trim().to_ascii_lowercase();
    if lower == "ok" || lower == "error" {
        return Ok(lower);
    }
    let upper = lower.to_ascii_uppercase();
    if GRPC_CODE_NAMES[1..].contains(&upper.as_str()) {
        Ok(upper)
    } else {
        Err(CliError::Usage(format!(
            "--result {word:?}: expected ok, error or a gRPC code name ({})",
            GRPC_CODE_NAMES[1..].join(", ")
        )))
    }
}

/// A point in time as milliseconds since the epoch: RFC 3339, a date (midnight UTC), or a duration
/// before `now_ms` (`30s`, `15m`, `2h`, `1d`, `1w`).
pub(super) fn parse_time(text: &str, now_ms: i64) -> Result<i64, String> {
    if let Ok(t) = OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(unix_ms(t));
    }
    if let Ok(day) = parse_date(text) {
        return Ok(unix_ms(day.midnight().assume_utc()));
    }
    let unit_ms = match text.chars().last() {
        Some('s') => 1_000,
        Some('m') => 60_000,
        Some('h') => 3_600_000,
        Some('d') => 86_400_000,
        Some('w') => 7 * 86_400_000,
        _ => return Err(bad_time()),
    };
    let n: i64 = text[..text.len() - 1].parse().ok().filter(|n| *n >= 0).ok_or_else(bad_time)?;
    n.checked_mul(unit_ms).map(|ago| now_ms - ago).ok_or_else(bad_time)
}

fn bad_time() -> String {
    "expected an RFC 3339 time (2026-01-31T08:00:00+08:00), a date (2026-01-31, UTC) or a duration ago (30s, 15m, 2h, 1d, 1w)"
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::args::{Cli, Command};
    use clap::Parser;

    const NOW: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

    fn args(flags: &[&str]) -> AuditQueryArgs {
        let cli = Cli::try_parse_from(["exchangectl", "audit", "query"].iter().chain(flags)).unwrap();
        match cli.command {
            Command::Audit(AuditCommand::Query(q)) => q,
            _ => unreachable!(),
        }
    }

    #[test]
    fn times_absolute_dates_and_relative() {
        assert_eq!(parse_time("15m", NOW), Ok(NOW - 900_000));
        assert_eq!(parse_time("2h", NOW), Ok(NOW - 7_200_000));
        assert_eq!(parse_time("1d", NOW), Ok(NOW - 86_400_000));
        assert_eq!(parse_time("30s", NOW), Ok(NOW - 30_000));
        assert_eq!(parse_time("1w", NOW), Ok(NOW - 604_800_000));
        assert_eq!(parse_time("2026-01-01T08:00:00+08:00", NOW), Ok(NOW));
        assert_eq!(parse_time("2026-01-01", NOW), Ok(NOW));
        for bad in ["", "m", "-5m", "5x", "1.5h", "yesterday", "2026-13-01", "99999999999999999d"] {
            assert!(parse_time(bad, NOW).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn flags_become_the_request() {
        let r = query_request(
            &args(&[
                "--since",
                "1d",
                "--until",
                "2026-01-01T00:00:00Z",
                "--peer",
                "commerce",
                "--resource",
                "101001/000001",
                "--result",
                "permission_denied",
                "--record-key",
                "91350100M000100Y43",
                "--message-id",
                "m-1",
                "--limit",
                "50",
            ]),
            NOW,
        )
        .unwrap();
        assert_eq!((r.from_unix_ms, r.to_unix_ms), (NOW - 86_400_000, NOW));
        assert_eq!((r.peer.as_str(), r.resource_code.as_str()), ("commerce", "101001/000001"));
        assert_eq!(r.result, "PERMISSION_DENIED");
        assert_eq!((r.record_key.as_str(), r.message_id.as_str(), r.limit), ("91350100M000100Y43", "m-1", 50));
        assert_eq!(query_request(&args(&[]), NOW).unwrap(), QueryAuditRequest::default());
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        let err = query_request(&args(&["--since", "soon"]), NOW).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().starts_with("--since \"soon\": expected an RFC 3339"), "{err}");
        let err = query_request(&args(&["--since", "1h", "--until", "2h"]), NOW).unwrap_err();
        assert!(err.to_string().contains("after --until"), "{err}");
        assert_eq!(result_filter("OK").unwrap(), "ok");
        assert_eq!(result_filter("Error").unwrap(), "error");
        assert_eq!(result_filter("RESOURCE_EXHAUSTED").unwrap(), "RESOURCE_EXHAUSTED");
        let err = result_filter("denied").unwrap_err();
        assert!(err.to_string().contains("PERMISSION_DENIED"), "{err}");
    }
}
