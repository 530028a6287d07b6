// harpsync dashboard: polls this node's operations API (POST /, Basic auth) and draws
// the mesh. Plain JavaScript, no library, nothing fetched from other sites.
'use strict';

(function () {
  const POLL_MS = 1500;          // an update starts this long after the last one started
  const PEER_TIMEOUT_MS = 1200;  // a peer slower than this is shown unreachable, so a
                                 // hung node never holds the page past 2 s
  const EXTRAS_EVERY = 4;        // dead letters and conflicts: every 4th update
  const HISTORY_MS = 5 * 60 * 1000;
  const STALE_MS = 5000;
  const POLL_TIMEOUT_MS = 8000; // an update unanswered this long is abandoned (a hung node
                                // or network would otherwise hold the loop forever)
  const STUCK_POLLS = 3;         // differing counts unchanged this many updates: red
  const STORE_KEY = 'harpsync-dashboard-auth';
  const SVG_NS = 'http://www.w3.org/2000/svg';
  const STATES = ['streaming', 'copying', 'catching_up', 'paused', 'clock_skew',
    'resync_required', 'down'];  // in order of severity: a link shows its worst socket
  const LABELS = {
    streaming: 'streaming', copying: 'copying', catching_up: 'catching up',
    paused: 'paused', resync_required: 'resync required', clock_skew: 'clock skew',
    down: 'down',
  };

  let auth = null;
  let user = null;              // {username, super_user}
  let timer = null;
  let ticker = null;            // refreshes the "live" badge whatever the requests do
  let polling = false;
  let extrasRunning = false;
  let generation = 0;
  let polls = 0;
  let lastOk = 0;
  let failure = null;           // why the last update failed (null: it did not)
  let overview = null;
  const history = new Map();     // "from>to" -> {last: {t, total}, rates: [{t, rate}]}
  const countHistory = new Map(); // "db.table" -> {sig, polls}
  const missing = new Set();     // optional operations this node does not have

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'text') node.textContent = v;
      else if (k === 'className') node.className = v;
      else node.setAttribute(k, v === true ? '' : String(v));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child);
    }
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === 'text') node.textContent = v;
      else node.setAttribute(k, String(v));
    }
    for (const child of children) if (child) node.append(child);
    return node;
  }

  function basic(username, password) {
    const bytes = new TextEncoder().encode(`${username}:${password}`);
    let text = '';
    for (const b of bytes) text += String.fromCharCode(b);
    return 'Basic ' + btoa(text);
  }

  async function call(body, timeoutMs) {
    const response = await fetch('/', {
      method: 'POST', cache: 'no-store', credentials: 'omit',
      headers: { 'Content-Type': 'application/json', Authorization: auth },
      body: JSON.stringify(body),
      signal: timeoutMs ? AbortSignal.timeout(timeoutMs) : undefined,
    });
    let data;
    try { data = await response.json(); } catch (e) { data = { error: `HTTP ${response.status}` }; }
    if (!response.ok) {
      const error = new Error((data && data.error) || `HTTP ${response.status}`);
      error.status = response.status;
      throw error;
    }
    return data;
  }

  function notFound(error) {
    return /Operation '.*' not found/.test(error.message);
  }

  // -- signing in ---------------------------------------------------------------------
  async function signIn(candidate, remember) {
    auth = candidate;
    const info = await call({ operation: 'user_info' });
    const role = info.role || {};
    const permission = (role && role.permission) || {};
    user = { username: info.username, super_user: permission.super_user === true };
    if (remember) sessionStorage.setItem(STORE_KEY, candidate);
    $('login').hidden = true;
    $('main').hidden = false;
    $('logout').hidden = false;
    $('who').textContent = `${user.username}${user.super_user ? ' (super user)' : ' (read only)'}`;
    document.body.classList.toggle('read-only', !user.super_user);
    start();
  }

  function signOut(message) {
    if (timer) clearTimeout(timer);
    timer = null;
    if (ticker) clearInterval(ticker);
    ticker = null;
    lastOk = 0;
    failure = null;
    generation += 1;
    auth = null;
    user = null;
    overview = null;
    sessionStorage.removeItem(STORE_KEY);
    $('main').hidden = true;
    $('login').hidden = false;
    $('logout').hidden = true;
    $('who').textContent = '';
    $('login-error').textContent = message || '';
    setLive('not connected', '');
  }

  function start() {
    if (timer) clearTimeout(timer);
    if (!ticker) ticker = setInterval(showAge, 1000);
    generation += 1;
    loop(generation);
  }

  async function loop(mine) {
    const began = Date.now();
    await poll();
    if (!auth || mine !== generation) return;  // signed out, or a newer loop runs
    timer = setTimeout(() => loop(mine), Math.max(0, POLL_MS - (Date.now() - began)));
  }

  // -- polling ------------------------------------------------------------------------
  async function poll() {
    if (!auth) return;
    showAge();
    if (polling) return;
    polling = true;
    try {
      const data = await call({ operation: 'cluster_overview', timeout: PEER_TIMEOUT_MS },
        POLL_TIMEOUT_MS);
      overview = data;
      lastOk = Date.now();
      failure = null;
      render(data);
      if (polls % EXTRAS_EVERY === 0) extras(data);  // not awaited: never delays updates
      polls += 1;
      showAge();
    } catch (error) {
      if (error.status === 401) {
        signOut('The node refused these credentials.');
      } else {
        failure = error.name === 'TimeoutError' ? 'the node does not answer'
          : `update failed: ${error.message}`;
        setLive(failure, 'stale');
        showAge();
      }
    } finally {
      polling = false;
    }
  }

  function setLive(text, cls) {
    const live = $('live');
    live.textContent = text;
    live.className = 'live' + (cls ? ' ' + cls : '');
  }

  function showAge() {
    if (!lastOk) return;
    const age = Date.now() - lastOk;
    if (age > STALE_MS) {
      setLive(`no update for ${Math.round(age / 1000)} s${failure ? ` (${failure})` : ''}`,
        'stale');
    } else if (failure) {
      setLive(failure, 'stale');
    } else {
      setLive(`live · updated ${new Date(lastOk).toLocaleTimeString()}`, 'ok');
    }
  }

  // -- the model: one entry per direction of each link ---------------------------------
  function worst(states) {
    let index = -1;
    for (const s of states) index = Math.max(index, STATES.indexOf(s));
    return index < 0 ? 'down' : STATES[index];
  }

  function directions(data) {
    const byName = new Map(data.nodes.map((n) => [n.name, n]));
    const out = new Map();
    const entry = (from, to) => {
      const key = `${from}>${to}`;
      if (!out.has(key)) out.set(key, { key, from, to, sockets: [], reason: null });
      return out.get(key);
    };
    for (const node of data.nodes) {
      for (const link of node.links || []) entry(link.peer, node.name).sockets.push(link);
    }
    // A node that does not answer cannot report what it receives: those directions
    // are down as far as anyone can tell.
    for (const node of data.nodes) {
      if (node.reachable) continue;
      for (const other of data.nodes) {
        if (other.name === node.name) continue;
        if ((other.links || []).some((l) => l.peer === node.name)) {
          entry(other.name, node.name).reason = `${node.name} does not answer`;
        }
      }
    }
    for (const d of out.values()) {
      const receiver = byName.get(d.to);
      const down = !receiver || !receiver.reachable;
      d.state = down ? 'down' : worst(d.sockets.map((s) => s.status));
      // A down link's last latency and lag describe the past: show none.
      d.latency = d.state === 'down' ? null : max(d.sockets.map((s) => s.latency));
      d.lag_ms = d.state === 'down' ? null : max(d.sockets.map((s) => s.lag_ms));
      d.lag_txns = d.sockets.reduce((a, s) => a + (s.lag_txns || 0), 0);
      d.total = d.sockets.reduce((a, s) => a + (s.txns_received || 0), 0);
      d.verified = d.sockets.map((s) => s.verified).filter(Boolean);
      d.errors = d.sockets.filter((s) => s.last_error);
    }
    return [...out.values()].sort((a, b) => (a.from + a.to).localeCompare(b.from + b.to));
  }

  function max(values) {
    const nums = values.filter((v) => typeof v === 'number');
    return nums.length ? Math.max(...nums) : null;
  }

  function track(dirs, now) {
    const seen = new Set();
    for (const d of dirs) {
      seen.add(d.key);
      let h = history.get(d.key);
      if (!h) { h = { last: null, rates: [] }; history.set(d.key, h); }
      if (h.last && now > h.last.t) {
        const delta = d.total - h.last.total;  // negative after a restart: no rate
        if (delta >= 0) h.rates.push({ t: now, rate: (delta * 1000) / (now - h.last.t) });
      }
      h.last = { t: now, total: d.total };
      while (h.rates.length && now - h.rates[0].t > HISTORY_MS) h.rates.shift();
      d.rates = h.rates;
    }
    for (const key of [...history.keys()]) if (!seen.has(key)) history.delete(key);
  }

  // -- rendering ----------------------------------------------------------------------
  function render(data) {
    $('node-name').textContent = data.node_name;
    document.title = `harpsync · ${data.node_name}`;
    const dirs = directions(data);
    track(dirs, Date.now());
    drawMesh(data, dirs);
    drawLinks(data, dirs);
    drawRecords(data);
    drawErrors(data, dirs);
    drawVerification(data, dirs);
  }

  function fmt(value, digits, unit) {
    if (value === null || value === undefined) return '–';
    return `${Number(value).toFixed(digits)}${unit || ''}`;
  }

  function drawLegend() {
    const legend = $('legend');
    legend.replaceChildren(...['streaming', 'copying', 'catching_up', 'paused',
      'resync_required', 'clock_skew', 'down'].map((s) => el('li', {},
      el('span', { className: `swatch b-${s}` }), LABELS[s])));
  }

  function layout(names, width, height) {
    const cx = width / 2;
    const cy = height / 2;
    const r = Math.min(width, height) / 2 - 70;
    const pos = new Map();
    names.forEach((name, i) => {
      if (names.length === 1) { pos.set(name, { x: cx, y: cy }); return; }
      const angle = -Math.PI / 2 + (2 * Math.PI * i) / names.length;
      pos.set(name, { x: cx + r * Math.cos(angle), y: cy + r * Math.sin(angle) });
    });
    // Centre the drawing (a triangle's circle leaves its lower part empty).
    const ys = [...pos.values()].map((p) => p.y);
    const shift = cy - (Math.min(...ys) + Math.max(...ys)) / 2;
    for (const p of pos.values()) p.y += shift;
    return pos;
  }

  function drawMesh(data, dirs) {
    const mesh = $('mesh');
    const names = data.nodes.map((n) => n.name).sort();
    const pos = layout(names, 640, 420);
    const radius = 36;
    const defs = svg('defs', {});
    for (const s of STATES) {
      defs.append(svg('marker', { id: `arrow-${s}`, viewBox: '0 0 10 10', refX: 9, refY: 5,
        markerWidth: 5, markerHeight: 5, orient: 'auto-start-reverse' },
      svg('path', { d: 'M0,0 L10,5 L0,10 z', class: `s-${s}` })));
    }
    const links = svg('g', { class: 'links' });
    const labels = svg('g', { class: 'labels' });
    for (const d of dirs) {
      const a = pos.get(d.from);
      const b = pos.get(d.to);
      if (!a || !b) continue;
      const dx = b.x - a.x;
      const dy = b.y - a.y;
      const len = Math.hypot(dx, dy) || 1;
      const ux = dx / len;
      const uy = dy / len;
      const ox = -uy * 5;  // each direction on its own side of the pair
      const oy = ux * 5;
      const x1 = a.x + ux * (radius + 4) + ox;
      const y1 = a.y + uy * (radius + 4) + oy;
      const x2 = b.x - ux * (radius + 6) + ox;
      const y2 = b.y - uy * (radius + 6) + oy;
      const line = svg('line', { class: `link s-${d.state}`, x1, y1, x2, y2,
        'data-from': d.from, 'data-to': d.to, 'data-state': d.state,
        'marker-end': `url(#arrow-${d.state})` },
      svg('title', { text: `${d.from} → ${d.to}: ${LABELS[d.state]}` +
        (d.reason ? ` (${d.reason})` : '') }));
      links.append(line);
      // The label runs along its own line, on that line's side of the pair, so the
      // labels of a pair (and of neighbouring pairs) never cross.
      const text = d.state === 'down' || d.state === 'paused' ? LABELS[d.state]
        : `${fmt(d.latency, 1, ' ms')} · lag ${fmt(d.lag_ms, 0, ' ms')}`;
      let angle = (Math.atan2(dy, dx) * 180) / Math.PI;
      if (angle > 90) angle -= 180;
      if (angle < -90) angle += 180;
      const lx = (a.x + b.x) / 2 + ox * 3.4;
      const ly = (a.y + b.y) / 2 + oy * 3.4;
      labels.append(svg('text', { class: 'link-label', x: lx, y: ly, text,
        'text-anchor': 'middle', 'dominant-baseline': 'middle',
        transform: `rotate(${angle.toFixed(1)} ${lx.toFixed(1)} ${ly.toFixed(1)})` }));
    }
    const nodes = svg('g', { class: 'nodes' });
    for (const n of data.nodes) {
      const p = pos.get(n.name);
      const cls = ['node', n.reachable ? 'up' : 'down', n.name === data.node_name ? 'self' : '']
        .join(' ').trim();
      const counts = Object.values(n.tables || {}).reduce(
        (a, t) => a + Object.values(t).reduce((x, y) => x + y, 0), 0);
      const sub = n.reachable ? `${counts.toLocaleString()} records` : 'down';
      nodes.append(svg('g', { class: cls, 'data-node': n.name, 'data-state': n.reachable ? 'up' : 'down' },
        svg('circle', { cx: p.x, cy: p.y, r: radius }),
        svg('text', { x: p.x, y: p.y + 5, text: n.name }),
        // below the shape, or above it for nodes in the upper half (clear of links)
        svg('text', { class: 'sub', x: p.x,
          y: p.y < 210 ? p.y - radius - 8 : p.y + radius + 16, text: sub }),
        svg('title', { text: `${n.name}${n.url ? ' ' + n.url : ''}` +
          (n.reachable ? `, answered in ${n.response_ms} ms` : `: ${n.error || 'unreachable'}`) })));
    }
    mesh.replaceChildren(defs, links, labels, nodes);
  }

  function sparkline(rates) {
    const width = 100;
    const height = 24;
    const box = svg('svg', { class: 'spark', width, height, viewBox: `0 0 ${width} ${height}` });
    if (!rates || rates.length < 2) return box;
    const now = Date.now();
    const top = Math.max(1, ...rates.map((r) => r.rate));
    // The time axis grows with the history, from one minute up to HISTORY_MS.
    const span = Math.min(HISTORY_MS, Math.max(60000, now - rates[0].t));
    const points = rates.map((r) => {
      const x = width - ((now - r.t) / span) * width;
      const y = height - 2 - (r.rate / top) * (height - 4);
      return `${x.toFixed(1)},${y.toFixed(1)}`;
    });
    const first = points[0].split(',')[0];
    const last = points[points.length - 1].split(',')[0];
    box.append(svg('polygon', { points: `${first},${height} ${points.join(' ')} ${last},${height}` }));
    box.append(svg('polyline', { points: points.join(' ') }));
    return box;
  }

  function verifiedText(list) {
    if (!list || !list.length) return '–';
    const bad = list.filter((v) => v.in_sync === false);
    const times = list.map((v) => Date.parse(v.at) || Number(v.at) || 0).filter(Boolean);
    const when = times.length ? ` ${ago(Math.max(...times))}` : '';
    if (bad.length) {
      const diffs = bad.reduce((a, v) => a + (v.differences || 0), 0);
      return `differs (${diffs})${when}`;
    }
    return `in sync${when}`;
  }

  function ago(t) {
    const s = Math.max(0, Math.round((Date.now() - t) / 1000));
    if (s < 60) return `${s} s ago`;
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    return `${Math.round(s / 3600)} h ago`;
  }

  function drawLinks(data, dirs) {
    const body = $('links').querySelector('tbody');
    const byName = new Map(data.nodes.map((n) => [n.name, n]));
    const rows = dirs.map((d) => {
      const rate = d.rates && d.rates.length ? d.rates[d.rates.length - 1].rate : null;
      const actions = el('td', { className: 'controls-col' });
      if (user && user.super_user) {
        const receiver = byName.get(d.to);
        if (d.to === data.node_name) {
          const paused = d.sockets.some((s) => s.state === 'paused');
          actions.append(el('button', {
            type: 'button', className: 'link-action', 'data-action': paused ? 'resume' : 'pause',
            'data-peer': d.from, text: paused ? 'Resume' : 'Pause',
          }));
        } else if (receiver && receiver.reachable) {
          actions.append(el('span', { className: 'hint', text: `on ${d.to}`,
            title: `Pause and resume this link on ${d.to}'s dashboard` }));
        }
      }
      const state = el('span', { className: `badge b-${d.state}`, text: LABELS[d.state] });
      const title = d.errors.map((s) => `${s.database}: ${s.last_error}`).join('\n');
      if (title) state.title = `last errors:\n${title}`;
      return el('tr', { 'data-from': d.from, 'data-to': d.to, 'data-state': d.state },
        el('td', { text: `${d.from} → ${d.to}` }),
        el('td', {}, state),
        el('td', { className: 'num', text: fmt(d.latency, 1, ' ms') }),
        el('td', { className: 'num', text: fmt(d.lag_ms, 0, ' ms') }),
        el('td', { className: 'num', text: String(d.lag_txns) }),
        el('td', {}, sparkline(d.rates), el('span', { className: 'rate',
          text: rate === null ? '' : `${rate < 10 ? rate.toFixed(1) : Math.round(rate).toLocaleString()} txn/s` })),
        el('td', { text: verifiedText(d.verified) }),
        actions);
    });
    if (!rows.length) {
      rows.push(el('tr', {}, el('td', { colspan: 8, className: 'empty',
        text: 'This node has no peers yet (add_node joins one).' })));
    }
    const patched = rows.map((row) => patchRow(body, row));
    const current = [...body.rows];
    if (patched.length !== current.length || patched.some((row, i) => row !== current[i])) {
      body.replaceChildren(...patched);
    }
    for (const th of document.querySelectorAll('.controls-col')) {
      th.hidden = !(user && user.super_user);
    }
  }

  // Rows and their buttons are updated in place, not rebuilt: a button replaced between
  // a press and its release would swallow the click.
  function patchRow(body, fresh) {
    const key = fresh.dataset.from ? `${fresh.dataset.from}>${fresh.dataset.to}` : null;
    const old = key && [...body.rows].find((r) => `${r.dataset.from}>${r.dataset.to}` === key);
    if (!old || old.cells.length !== fresh.cells.length) return fresh;
    old.dataset.state = fresh.dataset.state;
    [...fresh.cells].forEach((cell, i) => {
      const current = old.cells[i];
      if (current.innerHTML !== cell.innerHTML) current.replaceChildren(...cell.childNodes);
    });
    return old;
  }

  function drawRecords(data) {
    const table = $('records');
    const nodes = data.nodes.map((n) => n.name).sort();
    const byName = new Map(data.nodes.map((n) => [n.name, n]));
    const keys = new Set();
    for (const n of data.nodes) {
      for (const [db, tables] of Object.entries(n.tables || {})) {
        for (const t of Object.keys(tables)) keys.add(`${db}.${t}`);
      }
    }
    table.querySelector('thead').replaceChildren(el('tr', {}, el('th', { text: 'Table' }),
      ...nodes.map((n) => el('th', { className: 'num', text: n }))));
    const rows = [];
    const seen = new Set();
    for (const key of [...keys].sort()) {
      seen.add(key);
      const dot = key.indexOf('.');
      const db = key.slice(0, dot);
      const t = key.slice(dot + 1);
      const values = nodes.map((name) => {
        const n = byName.get(name);
        if (!n || !n.reachable) return undefined;   // unknown, not a disagreement
        const tables = (n.tables || {})[db] || {};
        return t in tables ? tables[t] : null;       // null: the table is missing there
      });
      const known = values.filter((v) => v !== undefined);
      const distinct = new Set(known.map((v) => (v === null ? 'missing' : v)));
      let cls = '';
      const sig = JSON.stringify(values);
      const prev = countHistory.get(key);
      const same = prev && prev.sig === sig ? prev.polls + 1 : 1;
      countHistory.set(key, { sig, polls: same });
      if (distinct.size > 1) cls = same >= STUCK_POLLS ? 'stuck' : 'differs';
      const tally = new Map();
      for (const v of known) tally.set(v, (tally.get(v) || 0) + 1);
      const top = Math.max(0, ...tally.values());
      rows.push(el('tr', { className: cls, 'data-table': key },
        el('td', { text: key }),
        ...values.map((v) => el('td', {
          // the odd one out, when most nodes agree
          className: 'num' + (cls && v !== undefined && tally.get(v) < top ? ' minority' : ''),
          text: v === undefined ? '?' : v === null ? 'missing' : v.toLocaleString(),
        }))));
    }
    for (const key of [...countHistory.keys()]) if (!seen.has(key)) countHistory.delete(key);
    if (!rows.length) {
      rows.push(el('tr', {}, el('td', { className: 'empty', colspan: nodes.length + 1,
        text: 'No tables yet.' })));
    }
    table.querySelector('tbody').replaceChildren(...rows);
  }

  function drawErrors(data, dirs) {
    const items = [];
    for (const n of data.nodes) {
      if (!n.reachable) {
        items.push({ t: Date.now(), where: n.name, text: n.error || 'does not answer' });
      }
    }
    for (const d of dirs) {
      for (const s of d.errors) {
        items.push({ t: Date.parse(s.last_error_at) || 0, where: `${d.from} → ${d.to} (${s.database})`,
          text: s.last_error });
      }
    }
    items.sort((a, b) => b.t - a.t);
    const list = $('errors');
    if (!items.length) {
      list.replaceChildren(el('li', { className: 'empty', text: 'No errors.' }));
      return;
    }
    list.replaceChildren(...items.slice(0, 30).map((e) => el('li', {},
      el('span', { className: 'when', text: e.t ? ago(e.t) : '' }),
      el('span', { className: 'where', text: e.where }), e.text)));
  }

  function has(data, op) {
    return (data.operations || []).includes(op) && !missing.has(op);
  }

  function drawVerification(data, dirs) {
    const canVerify = has(data, 'verify_cluster');
    const canRepair = has(data, 'repair_cluster');
    const results = dirs.flatMap((d) => d.sockets.filter((s) => s.verified)
      .map((s) => ({ d, s })));
    $('verify-card').hidden = !(canVerify || canRepair || results.length);
    const superUser = user && user.super_user;
    $('verify-controls').hidden = !(superUser && (canVerify || canRepair));
    $('verify-button').hidden = !canVerify;
    $('repair-button').hidden = !canRepair;
    if (!results.length) {
      $('verify-summary').replaceChildren(el('p', { className: 'empty',
        text: 'No verification result yet.' }));
      return;
    }
    $('verify-summary').replaceChildren(el('table', {}, el('tbody', {},
      ...results.map(({ d, s }) => el('tr', {},
        el('td', { text: `${d.from} → ${d.to} (${s.database})` }),
        el('td', { text: verifiedText([s.verified]),
          className: s.verified.in_sync === false ? 'bad-text' : 'ok-text' }))))));
  }

  // -- dead letters, conflicts: operations of other issues, shown once they exist ------
  async function extras(data) {
    if (extrasRunning) return;
    extrasRunning = true;
    try {
      await listing(data, 'list_dead_letters', 'dead-card', 'dead-letters');
      await listing(data, 'list_conflicts', 'conflicts-card', 'conflicts');
    } finally {
      extrasRunning = false;
    }
  }

  async function listing(data, op, cardId, boxId) {
    if (!has(data, op)) { $(cardId).hidden = true; return; }
    try {
      const result = await call({ operation: op, limit: 50 });
      $(cardId).hidden = false;
      $(boxId).replaceChildren(...describeListing(result));
    } catch (error) {
      if (notFound(error)) missing.add(op);
      $(cardId).hidden = notFound(error) || error.status === 403;
      if (!$(cardId).hidden) {
        $(boxId).replaceChildren(el('p', { className: 'error', text: error.message }));
      }
    }
  }

  function describeListing(result) {
    const entries = Array.isArray(result) ? result
      : (result.entries || result.dead_letters || result.conflicts || result.records || []);
    const out = [];
    // The listing holds at most the limit asked for; the count is of them all.
    const total = (result && (result.total ?? result.count
      ?? (result.summary && result.summary.total))) ?? entries.length;
    const shown = Math.min(entries.length, 15);
    out.push(el('p', { className: total ? 'bad-text' : 'ok-text',
      text: total ? `${total} entr${total === 1 ? 'y' : 'ies'}` : 'None.' }));
    if (total > shown) {
      out.push(el('p', { className: 'hint', text: `The first ${shown} are shown.` }));
    }
    if (result && result.summary) {
      out.push(el('pre', { className: 'small', text: JSON.stringify(result.summary, null, 1) }));
    }
    if (entries.length) {
      const cols = [...new Set(entries.slice(0, 5).flatMap((e) => Object.keys(e)))].slice(0, 8);
      out.push(el('table', {},
        el('thead', {}, el('tr', {}, ...cols.map((c) => el('th', { text: c })))),
        el('tbody', {}, ...entries.slice(0, 15).map((e) => el('tr', {},
          ...cols.map((c) => el('td', { text: short(e[c]) })))))));
    }
    return out;
  }

  function short(value) {
    const text = typeof value === 'string' ? value : JSON.stringify(value);
    if (text === undefined) return '';
    return text.length > 80 ? text.slice(0, 77) + '...' : text;
  }

  // -- actions ------------------------------------------------------------------------
  async function act(description, body) {
    if (!window.confirm(description)) return;
    const out = $('action-result');
    try {
      const result = await call(body);
      out.textContent = result.message || `${body.operation} done`;
      out.className = 'hint ok-text';
      return result;
    } catch (error) {
      out.textContent = `${body.operation} failed: ${error.message}`;
      out.className = 'hint bad-text';
      return null;
    } finally {
      poll();
    }
  }

  function onLinkAction(event) {
    const button = event.target.closest('button.link-action');
    if (!button || !overview) return;
    const peer = button.dataset.peer;
    const action = button.dataset.action;
    const here = overview.node_name;
    act(`${action === 'pause' ? 'Pause' : 'Resume'} replication from ${peer} to ${here}?`,
      { operation: `${action}_replication`, hostname: peer });
  }

  async function onVerify(repair) {
    const op = repair ? 'repair_cluster' : 'verify_cluster';
    const box = $('verify-result');
    const text = repair ? 'Repair every differing record on this node and its peers?'
      : 'Verify this node\'s tables against its peers now?';
    if (!window.confirm(text)) return;
    box.replaceChildren(el('p', { className: 'hint', text: `${op} running...` }));
    try {
      const result = await call({ operation: op });
      box.replaceChildren(...(repair ? describeRepair(result) : describeVerify(result)));
    } catch (error) {
      if (notFound(error)) missing.add(op);
      box.replaceChildren(el('p', { className: 'error', text: `${op} failed: ${error.message}` }));
    }
    poll();
  }

  // A repair answers with the verification it started from (so its in_sync is false
  // whenever it had something to do) and, per table, the ids it wrote on each node.
  function written(entry) {
    return Object.values(entry.changed || {}).reduce((a, ids) => a + ids.length, 0);
  }

  function plural(n, one, many) {
    return `${n.toLocaleString()} ${n === 1 ? one : many}`;
  }

  function checkedRows(checked, cell) {
    const rows = checked.slice(0, 50).map((c) => el('tr', {},
      el('td', { text: `${c.node || ''}` }), el('td', { text: `${c.database}.${c.table}` }),
      cell(c)));
    return rows.length ? [el('table', {}, el('tbody', {}, ...rows))] : [];
  }

  function describeVerify(result) {
    const checked = result.checked || [];
    const failed = checked.filter((c) => c.error);
    const bad = checked.filter((c) => !c.error && c.in_sync === false);
    let summary = el('p', { className: 'ok-text', text: result.message || 'In sync' });
    if (bad.length || failed.length) {
      const parts = [];
      if (bad.length) parts.push(`${plural(bad.length, 'table differs', 'tables differ')}`);
      if (failed.length) parts.push(`${plural(failed.length, 'table', 'tables')} could not be checked`);
      summary = el('p', { className: 'bad-text', text: `Not in sync: ${parts.join(', ')}` });
    }
    return [summary, ...checkedRows(checked, (c) => el('td', {
      className: c.error || c.in_sync === false ? 'bad-text' : 'ok-text',
      text: c.error ? `not checked: ${c.error}`
        : c.in_sync === false ? `${plural(c.differences || 0, 'record differs', 'records differ')}`
          : 'in sync' }))];
  }

  function describeRepair(result) {
    const checked = result.checked || [];
    const failed = checked.filter((c) => c.error);
    const total = checked.reduce((a, c) => a + written(c), 0);
    const tables = checked.filter((c) => written(c) > 0).length;
    const parts = [];
    if (total) parts.push(`Repaired: ${plural(total, 'record', 'records')} written in ${plural(tables, 'table', 'tables')}`);
    if (failed.length) parts.push(`${plural(failed.length, 'table', 'tables')} could not be repaired`);
    const unresolved = checked.filter((c) => !c.error && c.in_sync === false && !written(c));
    if (unresolved.length) {
      parts.push(`${plural(unresolved.length, 'table differs', 'tables differ')} with nothing written`);
    }
    const text = parts.length ? parts.join('; ') : 'In sync: nothing to repair';
    const bad = failed.length || unresolved.length;
    return [el('p', { className: bad ? 'bad-text' : 'ok-text', text }),
      ...checkedRows(checked, (c) => el('td', {
        className: c.error ? 'bad-text' : 'ok-text',
        text: c.error ? `not repaired: ${c.error}`
          : written(c) ? `${plural(written(c), 'record', 'records')} repaired` : 'in sync' }))];
  }

  // -- wiring -------------------------------------------------------------------------
  document.addEventListener('DOMContentLoaded', () => {
    drawLegend();
    $('login-form').addEventListener('submit', async (event) => {
      event.preventDefault();
      const username = $('username').value;
      const password = $('password').value;
      $('login-error').textContent = '';
      try {
        await signIn(basic(username, password), true);
        $('password').value = '';
      } catch (error) {
        auth = null;
        $('login-error').textContent = error.status === 401
          ? 'Wrong username or password.' : `Sign in failed: ${error.message}`;
      }
    });
    $('logout').addEventListener('click', () => signOut(''));
    $('links').addEventListener('click', onLinkAction);
    $('verify-button').addEventListener('click', () => onVerify(false));
    $('repair-button').addEventListener('click', () => onVerify(true));
    const saved = sessionStorage.getItem(STORE_KEY);
    if (saved) signIn(saved, false).catch(() => signOut(''));
  });
}());
