// The live console: polls the admin API every second and fills index.html. Every value from the server
// goes into the page through textContent or dataset, never as markup: resource names, refusal messages and
// peer names are data, not HTML.
//
// What the end-to-end test reads (tests/tests/console.rs):
//   body[data-updated]       at_unix_ms of the last successful poll (the server's clock), "0" before one
//   #total-requests          StatusReport.traffic.requests: every gRPC call this server has served
//   #refused-list tr         one row per refused request, data-code = the gRPC status name
//   #catalog-table tbody tr  one row per entry, data-code = the resource code
//   #grants-table tbody tr   one row per grant, data-id = the grant id
//   #traffic-table tbody tr  data-direction, data-peer, data-resource
//   #ready-badge             data-ready = "true" | "false"; #cert-days the days left
//   #banner                  shown when a poll fails; the figures of the last good poll stay
'use strict';

(function () {
  const POLL_MS = 1000;
  const APIS = ['status', 'traffic', 'outbox', 'refused', 'catalog', 'grants', 'peers'];

  // The previous traffic snapshot, to turn running totals into per-second rates.
  let previous = null;

  const $ = (id) => document.getElementById(id);

  function setText(id, value) {
    $(id).textContent = value === undefined || value === null || value === '' ? '–' : String(value);
  }

  function cell(tr, value, className) {
    const td = document.createElement('td');
    td.textContent = value === undefined || value === null ? '' : String(value);
    if (className) td.className = className;
    tr.appendChild(td);
    return td;
  }

  // Replaces the rows of table `id` with one <tr> per item; `build(tr, item)` fills each row.
  function fillTable(id, items, build) {
    const table = $(id);
    const body = table.tBodies[0];
    const rows = items.map((item) => {
      const tr = document.createElement('tr');
      build(tr, item);
      return tr;
    });
    body.replaceChildren(...rows);
    const empty = table.parentElement.querySelector('.empty');
    if (empty) empty.hidden = items.length > 0;
  }

  const number = (n) => (typeof n === 'number' && isFinite(n) ? n.toLocaleString('en-US') : '–');
  const fixed = (n, digits) => (typeof n === 'number' && isFinite(n) ? n.toFixed(digits) : '–');

  function time(ms) {
    if (!ms) return '–';
    const d = new Date(ms);
    const pad = (n) => String(n).padStart(2, '0');
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function duration(seconds) {
    if (typeof seconds !== 'number' || !isFinite(seconds)) return '–';
    const s = Math.floor(seconds);
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    if (d > 0) return `${d}d ${h}h ${m}m`;
    if (h > 0) return `${h}h ${m}m`;
    if (m > 0) return `${m}m ${s % 60}s`;
    return `${seconds < 10 ? seconds.toFixed(1) : s}s`;
  }

  function bytes(n) {
    if (typeof n !== 'number') return '–';
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return `${i === 0 ? n : n.toFixed(1)} ${units[i]}`;
  }

  // Protobuf enum names as people say them: SHARE_TYPE_UNCONDITIONAL -> unconditional.
  const enumLabel = (name, prefix) => (name || '').replace(prefix, '').toLowerCase().replace(/_/g, ' ');

  function badge(id, text, kind) {
    const el = $(id);
    el.textContent = text;
    el.className = `badge ${kind}`;
  }

  function renderStatus(status, rate) {
    const identity = status.identity || {};
    setText('identity-name', identity.name || 'gov-exchange');
    setText('identity-department', identity.department);
    setText('server-kind', status.server);
    setText('server-version', status.version);
    setText('uptime', duration(status.uptime_seconds));
    setText('grpc-address', status.grpc_address);
    document.title = `${identity.name || status.server} · gov-exchange console`;

    const readiness = status.readiness || {};
    const ready = $('ready-badge');
    ready.dataset.ready = String(!!readiness.ready);
    badge('ready-badge', readiness.ready ? 'ready' : 'not ready', readiness.ready ? 'ok' : 'bad');
    $('maintenance-badge').hidden = !readiness.maintenance;

    const cert = status.certificate || {};
    setText('cert-serial', cert.serial_hex);
    setText('cert-days', cert.days_left);
    const days = $('cert-days');
    days.className = cert.days_left < 0 ? 'bad' : cert.days_left < cert.warning_days ? 'warn' : 'ok';
    days.title = cert.not_after_unix ? `expires ${time(cert.not_after_unix * 1000)}` : '';

    const dir = status.directory;
    $('directory-facts').hidden = !dir;
    if (dir) {
      setText('directory-registered', `${dir.registered ? 'registered' : 'not registered'} at ${dir.address}`);
      setText('directory-age', `${duration(dir.state_age_seconds)} (bound ${duration(dir.max_staleness_seconds)})`);
      $('directory-stale').hidden = !dir.stale;
      $('directory-error').textContent = dir.last_error || '';
    }
    $('directory-server-facts').hidden = status.server !== 'directory';
    setText('nodes-online', number(status.nodes_online));
    setText('nodes-offline', number(status.nodes_offline));
    setText('catalog-entries', number(status.catalog_entries));

    const traffic = status.traffic || {};
    setText('total-requests', traffic.requests);
    setText('total-rate', rate === null ? '–' : fixed(rate, 1));
    setText('total-errors', traffic.errors);
    setText('total-refused', traffic.refused);
    setText('total-rate-limited', traffic.rate_limited);
    setText('store-size', bytes(status.store_bytes));

    const backlog = status.backlog;
    $('backlog-summary').textContent = backlog
      ? `${number(backlog.subscriptions)} subscriptions · outbox ${number(backlog.outbox_events)} events · inbox ` +
        `${number(backlog.inbox_events)} events · oldest undelivered ${duration(backlog.oldest_undelivered_seconds)} · ` +
        `alarm above ${number(backlog.alarm_events)} events per subscriber`
      : '';

    const checks = (readiness.checks || []).map((check) => {
      const li = document.createElement('li');
      li.dataset.name = check.name;
      li.dataset.ok = String(!!check.ok);
      li.className = check.ok ? 'ok' : 'bad';
      const name = document.createElement('strong');
      name.textContent = check.name;
      li.append(name, ` ${check.ok ? 'ok' : 'failing'}${check.detail ? ': ' + check.detail : ''}`);
      return li;
    });
    $('checks').replaceChildren(...checks);
  }

  const rowKey = (row) => `${row.direction}\u0000${row.peer}\u0000${row.resource}`;

  // Requests per second of each traffic row since the previous snapshot (null on the first poll).
  function rates(traffic) {
    const out = new Map();
    if (!previous || traffic.at_unix_ms <= previous.at) return out;
    const seconds = (traffic.at_unix_ms - previous.at) / 1000;
    for (const row of traffic.rows) {
      const before = previous.requests.get(rowKey(row)) || 0;
      out.set(rowKey(row), Math.max(0, row.requests - before) / seconds);
    }
    return out;
  }

  function renderTraffic(traffic, perRow) {
    const order = { inbound: 0, outbound: 1, api: 2 };
    const rows = traffic.rows.slice().sort((a, b) =>
      (order[a.direction] ?? 3) - (order[b.direction] ?? 3) || a.peer.localeCompare(b.peer) || a.resource.localeCompare(b.resource));
    fillTable('traffic-table', rows, (tr, row) => {
      tr.dataset.direction = row.direction;
      tr.dataset.peer = row.peer;
      tr.dataset.resource = row.resource;
      const errorPct = row.requests ? (100 * row.errors) / row.requests : 0;
      if (row.errors > 0) tr.className = errorPct >= 50 ? 'bad' : 'warn';
      cell(tr, row.direction);
      cell(tr, row.peer);
      cell(tr, row.resource, 'mono');
      cell(tr, number(row.requests), 'num');
      const rate = perRow.get(rowKey(row));
      cell(tr, rate === undefined ? '–' : fixed(rate, 1), 'num');
      cell(tr, number(row.errors), 'num');
      cell(tr, fixed(errorPct, 1), 'num');
      cell(tr, row.requests ? fixed(row.latency_ms_sum / row.requests, 1) : '–', 'num');
      cell(tr, fixed(row.latency_ms_max, 1), 'num');
      cell(tr, time(row.last_unix_ms));
    });
  }

  function render(data) {
    const [status, traffic, outbox, refused, catalog, grants, peers] = data;
    traffic.rows = traffic.rows || [];
    const perRow = rates(traffic);
    // The headline rate: the status total over the same interval as the per-row rates.
    const total = (status.traffic && status.traffic.requests) || 0;
    const rate = previous && traffic.at_unix_ms > previous.at
      ? Math.max(0, total - previous.total) / ((traffic.at_unix_ms - previous.at) / 1000) : null;
    renderStatus(status, rate);
    renderTraffic(traffic, perRow);

    fillTable('peers-table', peers.peers || [], (tr, p) => {
      tr.dataset.department = p.department;
      tr.className = p.status === 'offline' ? 'bad' : '';
      [p.department, p.address, p.status].forEach((v) => cell(tr, v));
      [p.inbound_requests, p.outbound_requests, p.errors, p.grants_to_peer, p.grants_from_peer].forEach((v) => cell(tr, number(v), 'num'));
      cell(tr, time(p.last_seen_unix_ms));
    });
    const alarm = status.backlog ? status.backlog.alarm_events : 0;
    fillTable('outbox-table', outbox.rows || [], (tr, o) => {
      if (alarm && o.backlog_events > alarm) tr.className = 'bad';
      tr.dataset.side = o.side;
      tr.dataset.department = o.department;
      tr.dataset.resource = o.resource;
      [o.side, o.department].forEach((v) => cell(tr, v));
      cell(tr, o.resource, 'mono');
      cell(tr, o.state);
      [o.head_seq, o.acked_seq, o.backlog_events].forEach((v) => cell(tr, number(v), 'num'));
      cell(tr, duration(o.oldest_undelivered_seconds), 'num');
      cell(tr, o.connected ? 'yes' : 'no');
    });
    fillTable('refused-table', refused.refused || [], (tr, r) => {
      tr.dataset.code = r.code;
      cell(tr, time(r.at_unix_ms));
      cell(tr, r.peer);
      cell(tr, r.method, 'mono');
      cell(tr, r.code, 'code');
      cell(tr, r.message);
    });
    fillTable('catalog-table', catalog.entries || [], (tr, e) => {
      tr.dataset.code = e.code;
      if (e.withdrawn) tr.className = 'muted';
      cell(tr, e.code, 'mono');
      cell(tr, e.name);
      cell(tr, enumLabel(e.share_type, 'SHARE_TYPE_'));
      [e.items, e.version].forEach((v) => cell(tr, number(v), 'num'));
      cell(tr, e.withdrawn ? 'yes' : '');
    });
    fillTable('grants-table', grants.grants || [], (tr, g) => {
      tr.dataset.id = g.id;
      tr.dataset.state = g.state;
      cell(tr, g.id, 'mono');
      cell(tr, g.resource, 'mono');
      [g.provider, g.consumer, enumLabel(g.state, 'GRANT_STATUS_'), (g.items || []).join('、')].forEach((v) => cell(tr, v));
      cell(tr, g.expires_unix_ms ? time(g.expires_unix_ms) : 'never');
    });

    previous = {
      at: traffic.at_unix_ms,
      total,
      requests: new Map(traffic.rows.map((row) => [rowKey(row), row.requests])),
    };
    document.body.dataset.updated = String(traffic.at_unix_ms);
    $('updated-at').textContent = time(traffic.at_unix_ms);
  }

  class PollError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function get(api) {
    let response;
    try {
      response = await fetch(`/api/${api}`, {
        credentials: 'same-origin',
        cache: 'no-store',
        headers: { Accept: 'application/json' },
      });
    } catch (e) {
      throw new PollError(0, `cannot reach the server (${e.message})`);
    }
    if (!response.ok) {
      let detail = response.statusText;
      try {
        detail = (await response.json()).error || detail;
      } catch (_) { /* not JSON: keep the status text */ }
      throw new PollError(response.status, `/api/${api} answered ${response.status}: ${detail}`);
    }
    return response.json();
  }

  function showBanner(error) {
    const banner = $('banner');
    const last = document.body.dataset.updated !== '0' ? ` Showing the figures of ${time(Number(document.body.dataset.updated))}.` : '';
    banner.replaceChildren();
    banner.dataset.status = String(error.status || 0);
    if (error.status === 401) {
      const link = document.createElement('a');
      link.href = '/';
      link.textContent = 'Sign in again';
      banner.append(`Not signed in any more (401): the session ended or the token changed.${last} `, link);
    } else {
      banner.append(`Update failed: ${error.message}.${last}`);
    }
    banner.hidden = false;
  }

  async function poll() {
    try {
      const data = await Promise.all(APIS.map(get));
      render(data);
      $('banner').hidden = true;
    } catch (error) {
      showBanner(error instanceof PollError ? error : new PollError(0, error.message));
    } finally {
      // Scheduled after the answers, so a slow server never has polls piling up.
      setTimeout(poll, POLL_MS);
    }
  }

  poll();
})();
