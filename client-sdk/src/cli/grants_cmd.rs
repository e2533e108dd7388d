//! `exchangectl grants ...`: request, list, approve, reject, revoke (the directory keeps grants).

use exchange_proto::v1::ListGrantsRequest;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::args::GrantsCommand;
use super::output::{GrantView, GrantsView};
use super::{CliError, Ctx};
use crate::records::{parse_date, GRANT_STATUSES};

pub(super) async fn run(ctx: &Ctx, cmd: GrantsCommand) -> Result<(), CliError> {
    let client = ctx.exchange()?;
    let strs =
        |v: &[String]| -> Vec<String> { v.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect() };
    let grant = match cmd {
        GrantsCommand::Request { resource, items, purpose, legal_basis } => {
            let items = strs(&items);
            let items: Vec<&str> = items.iter().map(String::as_str).collect();
            client.request_access(&resource, &items, &purpose, &legal_basis).await?
        }
        GrantsCommand::List { side, status, resource } => {
            let request = list_request(side, status, resource)?;
            let view = GrantsView { grants: client.list_grants(request).await?.into_iter().map(Into::into).collect() };
            ctx.out.emit(&view, || view.human());
            return Ok(());
        }
        GrantsCommand::Approve { id, items, expires } => {
            let expires_at = expires.as_deref().map(parse_expiry).transpose().map_err(CliError::Usage)?;
            let items = strs(&items);
            let items: Vec<&str> = items.iter().map(String::as_str).collect();
            client.approve_grant(&id, &items, expires_at).await?
        }
        GrantsCommand::Reject { id, reason } => client.reject_grant(&id, &reason).await?,
        GrantsCommand::Revoke { id, reason } => client.revoke_grant(&id, &reason).await?,
    };
    let view = GrantView::from(grant);
    ctx.out.emit(&view, || view.human());
    Ok(())
}

/// The `grants list` filters as the request (clap has checked the words already).
pub(super) fn list_request(
    side: Option<String>,
    status: Option<String>,
    resource: Option<String>,
) -> Result<ListGrantsRequest, CliError> {
    let status = match status {
        None => 0,
        Some(word) => GRANT_STATUSES
            .parse(&word)
            .map(i32::from)
            .ok_or_else(|| CliError::Usage(format!("--status {word:?} is not one of {}", GRANT_STATUSES.choices())))?,
    };
    Ok(ListGrantsRequest { resource_code: resource.unwrap_or_default(), status, side: side.unwrap_or_default() })
}

/// `--expires`: a date means the end of that day in UTC (23:59:59.999Z, the last millisecond of access);
/// an RFC 3339 time is taken as is.
pub(super) fn parse_expiry(text: &str) -> Result<OffsetDateTime, String> {
    if let Ok(t) = OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(t);
    }
    let day = parse_date(text).map_err(|_| {
        format!("--expires {text:?}: expected a date (YYYY-MM-DD, access ends at the end of that day, UTC) or an RFC 3339 time")
    })?;
    let next = day.next_day().ok_or_else(|| format!("--expires {text:?} is out of range"))?;
    Ok(next.midnight().assume_utc() - time::Duration::milliseconds(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::args::GRANT_STATUS_WORDS;
    use crate::records::unix_ms;
    use exchange_proto::v1::GrantStatus;

    #[test]
    fn expiry_is_the_end_of_the_day_in_utc() {
        let t = parse_expiry("2026-12-31").unwrap();
        assert_eq!(unix_ms(t), 1_798_761_599_999);
        assert_eq!(t.offset(), time::UtcOffset::UTC);
        let t = parse_expiry("2026-12-31T18:00:00+08:00").unwrap();
        assert_eq!(unix_ms(t), 1_798_711_200_000);
        assert!(parse_expiry("31.12.2026").unwrap_err().contains("YYYY-MM-DD"));
        assert!(parse_expiry("2026-02-30").is_err());
    }

    #[test]
    fn list_filters_become_the_request() {
        let r = list_request(Some("provider".into()), Some("superseded".into()), Some("101001/000001".into())).unwrap();
        assert_eq!(r.side, "provider");
        assert_eq!(r.status, GrantStatus::Superseded as i32);
        assert_eq!(r.resource_code, "101001/000001");
        assert_eq!(list_request(None, None, None).unwrap(), ListGrantsRequest::default());
        assert_eq!(list_request(None, Some("open".into()), None).unwrap_err().exit_code(), 2);
        for word in GRANT_STATUS_WORDS {
            assert!(GRANT_STATUSES.parse(word).is_some(), "{word}");
        }
    }
}
