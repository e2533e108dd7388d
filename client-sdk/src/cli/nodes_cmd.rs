//! `exchangectl nodes`, `node-status`, `whoami`.

use exchange_proto::v1::{ListNodesRequest, NodeStatusRequest, WhoAmIRequest};

use super::output::{now_unix_ms, NodeStatusView, NodeView, NodesView, WhoAmIView};
use super::{CliError, Ctx};

pub(super) async fn nodes(ctx: &Ctx, dept: Option<String>) -> Result<(), CliError> {
    let mut directory = ctx.directory()?;
    let resp = directory
        .list_nodes(ctx.request(ListNodesRequest { department: dept.unwrap_or_default() }))
        .await
        .map_err(|s| CliError::Client(s.into()))?
        .into_inner();
    let mut nodes: Vec<NodeView> = resp.nodes.into_iter().map(Into::into).collect();
    nodes.sort_by(|a, b| (&a.department, &a.node_name).cmp(&(&b.department, &b.node_name)));
    let view = NodesView { nodes };
    ctx.out.emit(&view, || view.human(now_unix_ms()));
    Ok(())
}

pub(super) async fn node_status(ctx: &Ctx, addr: &str) -> Result<(), CliError> {
    let mut node = ctx.node(addr)?;
    let resp = node
        .node_status(ctx.request(NodeStatusRequest {}))
        .await
        .map_err(|s| CliError::Client(s.into()))?
        .into_inner();
    let view = NodeStatusView::from(resp);
    ctx.out.emit(&view, || view.human(now_unix_ms()));
    Ok(())
}

pub(super) async fn whoami(ctx: &Ctx) -> Result<(), CliError> {
    let mut directory = ctx.directory()?;
    let resp = directory
        .who_am_i(ctx.request(WhoAmIRequest {}))
        .await
        .map_err(|s| CliError::Client(s.into()))?
        .into_inner();
    let view = WhoAmIView::from(resp);
    ctx.out.emit(&view, || view.human());
    Ok(())
}
