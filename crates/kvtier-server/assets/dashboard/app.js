// kvtier dashboard: polls /api/status and /api/timeseries every 2 s (and /api/hit-rate-curve
// every 10 s) and renders the status tree, headline tiles, SVG charts, the hit-rate curve and the
// engine / L2 tables. Plain JS, no dependencies.
//
// Access control: a token given as ?token=... is moved to sessionStorage (and out of the address
// bar); every fetch sends it as `Authorization: Bearer <token>`. A 401 shows the token form
// instead of the data.
'use strict';

(() => {
  const REFRESH_MS = 2000;
  const MAX_BACKOFF_MS = 10000;
  const TOKEN_KEY = 'kvtier.dashboard.token';
  const SVG_NS = 'http://www.w3.org/2000/svg';
  const CHART_HEIGHT = 170;
  const MIN_SPAN_MS = 60 * 1000;
  const MAX_SPAN_MS = 10 * 60 * 1000;
  const CURVE_MS = 10000;

  const $ = (sel, root = document) => root.querySelector(sel);

  const state = {
    token: null,
    series: { epoch: null, lastSeq: 0, capacity: 600, samples: [] },
    tree: null,
    curve: null,
    curveAt: 0,
    open: new Map(), // tree path -> open, as chosen by the user
    prevHealthy: new Map(), // tree path -> healthy at the previous render
    timer: null,
    failures: 0,
    stopped: false,
  };

  // ---- token --------------------------------------------------------------------------------

  function storage() {
    try {
      return window.sessionStorage;
    } catch (_) {
      return null; // storage disabled: the token lives for this page only
    }
  }

  function initToken() {
    const url = new URL(window.location.href);
    const fromUrl = url.searchParams.get('token');
    const store = storage();
    if (fromUrl !== null) {
      state.token = fromUrl.trim() || null;
      if (store) {
        if (state.token) store.setItem(TOKEN_KEY, state.token);
        else store.removeItem(TOKEN_KEY);
      }
      url.searchParams.delete('token');
      window.history.replaceState(null, '', url.pathname + url.search + url.hash);
    } else if (store) {
      state.token = store.getItem(TOKEN_KEY);
    }
    $('#token-button').hidden = !state.token;
  }

  function setToken(token) {
    state.token = token || null;
    const store = storage();
    if (store) {
      if (state.token) store.setItem(TOKEN_KEY, state.token);
      else store.removeItem(TOKEN_KEY);
    }
    $('#token-button').hidden = !state.token;
  }

  // ---- fetching -----------------------------------------------------------------------------

  class AuthError extends Error {}
  class HttpError extends Error {}

  async function api(path) {
    const headers = { Accept: 'application/json' };
    if (state.token) headers.Authorization = 'Bearer ' + state.token;
    let r;
    try {
      r = await fetch(path, { headers, cache: 'no-store', credentials: 'omit' });
    } catch (e) {
      throw new HttpError(`cannot reach the server (${e.message})`);
    }
    if (r.status === 401) throw new AuthError('unauthorized');
    if (!r.ok) {
      let reason = '';
      try {
        reason = (await r.json()).reason || '';
      } catch (_) {
        /* not JSON */
      }
      throw new HttpError(`${path}: HTTP ${r.status}${reason ? ': ' + reason : ''}`);
    }
    return r.json();
  }

  function schedule(ms) {
    clearTimeout(state.timer);
    if (!state.stopped) state.timer = setTimeout(refresh, ms);
  }

  async function refresh() {
    const since = state.series.lastSeq;
    try {
      const wantCurve = Date.now() - state.curveAt >= CURVE_MS;
      const [tree, ts, curve] = await Promise.all([
        api('/api/status'),
        api('/api/timeseries' + (since > 0 ? '?since=' + since : '')),
        wantCurve ? api('/api/hit-rate-curve') : Promise.resolve(null),
      ]);
      if (curve) {
        state.curve = curve;
        // Poll again soon while the curve has no points yet (no lookups, or no object size).
        state.curveAt = curve.points && curve.points.length ? Date.now() : 0;
      }
      state.failures = 0;
      showAuth(false);
      showError(null);
      if (ingest(ts)) {
        // The server restarted (or its ring moved backwards): start the series over.
        schedule(0);
        return;
      }
      state.tree = tree;
      render();
      $('#conn').textContent = 'updated ' + clock(Date.now());
      schedule(REFRESH_MS);
    } catch (e) {
      if (e instanceof AuthError) {
        state.stopped = true;
        showAuth(true);
        $('#conn').textContent = '';
        return;
      }
      state.failures += 1;
      const backoff = Math.min(MAX_BACKOFF_MS, REFRESH_MS * state.failures);
      showError(`${e.message}. Retrying in ${Math.round(backoff / 1000)} s; the figures below are from ` +
        `the last successful refresh.`);
      $('#conn').textContent = 'connection lost';
      setBadge(null);
      schedule(backoff);
    }
  }

  // Appends new samples. Returns true when the series had to be reset (caller refetches).
  function ingest(ts) {
    const s = state.series;
    if (s.epoch !== null && (ts.epoch !== s.epoch || ts.latest_seq < s.lastSeq)) {
      s.epoch = null;
      s.lastSeq = 0;
      s.samples = [];
      return true;
    }
    s.epoch = ts.epoch;
    s.capacity = ts.capacity || s.capacity;
    for (const p of ts.samples) {
      if (p.seq > s.lastSeq) {
        s.samples.push(p);
        s.lastSeq = p.seq;
      }
    }
    if (s.samples.length > s.capacity) s.samples.splice(0, s.samples.length - s.capacity);
    return false;
  }

  // ---- panels -------------------------------------------------------------------------------

  function showAuth(on) {
    const panel = $('#auth');
    panel.hidden = !on;
    $('#content').hidden = on;
    if (!on) return;
    $('#auth-title').textContent = state.token
      ? 'The access token was rejected'
      : 'This server requires an access token';
    $('#auth-rejected').hidden = !state.token;
    $('#auth-example').textContent = window.location.pathname + '?token=<token>';
    setBadge(null, 'locked');
    $('#auth-token').focus();
  }

  function showError(msg) {
    const el = $('#error');
    el.hidden = !msg;
    el.textContent = msg || '';
  }

  function setBadge(healthy, text) {
    const b = $('#health-badge');
    b.classList.remove('ok', 'bad', 'unknown');
    if (healthy === true) {
      b.classList.add('ok');
      b.textContent = 'healthy';
    } else if (healthy === false) {
      b.classList.add('bad');
      b.textContent = 'unhealthy';
    } else {
      b.classList.add('unknown');
      b.textContent = text || 'unknown';
    }
    b.dataset.healthy = healthy === null ? '' : String(healthy);
  }

  // ---- formatting ---------------------------------------------------------------------------

  const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];

  function fmtBytes(n) {
    if (n === null || n === undefined || !isFinite(n)) return '–';
    let i = 0;
    let v = Math.abs(n);
    while (v >= 1024 && i < UNITS.length - 1) {
      v /= 1024;
      i += 1;
    }
    const digits = i === 0 ? 0 : v < 10 ? 2 : v < 100 ? 1 : 0;
    return (n < 0 ? '-' : '') + v.toFixed(digits) + ' ' + UNITS[i];
  }

  function fmtNum(n, digits = 3) {
    if (n === null || n === undefined || !isFinite(n)) return '–';
    if (Number.isInteger(n)) return n.toLocaleString('en-US');
    if (n === 0) return '0';
    const a = Math.abs(n);
    if (a >= 1000) return Math.round(n).toLocaleString('en-US');
    return Number(n.toPrecision(digits)).toString();
  }

  function fmtDur(s) {
    if (s === null || s === undefined || !isFinite(s)) return '–';
    if (s === 0) return '0';
    if (s < 1e-3) return fmtNum(s * 1e6) + ' µs';
    if (s < 1) return fmtNum(s * 1e3) + ' ms';
    if (s < 120) return fmtNum(s) + ' s';
    if (s < 7200) return fmtNum(s / 60) + ' min';
    return fmtNum(s / 3600) + ' h';
  }

  function fmtPct(r) {
    if (r === null || r === undefined || !isFinite(r)) return '–';
    return (r * 100).toFixed(r >= 0.999 || r === 0 ? 0 : 1) + ' %';
  }

  function fmtUptime(s) {
    if (!isFinite(s)) return '';
    const d = Math.floor(s / 86400);
    const h = Math.floor((s % 86400) / 3600);
    const m = Math.floor((s % 3600) / 60);
    const sec = Math.floor(s % 60);
    if (d) return `${d}d ${h}h`;
    if (h) return `${h}h ${m}m`;
    if (m) return `${m}m ${sec}s`;
    return `${sec}s`;
  }

  function clock(ms) {
    const d = new Date(ms);
    const p = (x) => String(x).padStart(2, '0');
    return `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
  }

  function fmtField(key, v) {
    if (typeof v === 'number') {
      if (/bytes/.test(key)) return fmtBytes(v);
      if (/_seconds$/.test(key)) return fmtDur(v);
      if (/ratio$/.test(key)) return fmtPct(v);
      return fmtNum(v);
    }
    if (v === null) return 'null';
    if (typeof v === 'string') return v === '' ? '""' : v;
    if (typeof v === 'boolean') return String(v);
    return JSON.stringify(v);
  }

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // ---- render -------------------------------------------------------------------------------

  function dig(obj, ...keys) {
    let v = obj;
    for (const k of keys) {
      if (v === null || typeof v !== 'object') return undefined;
      v = v[k];
    }
    return v;
  }

  function lastN(n) {
    const s = state.series.samples;
    return s.slice(Math.max(0, s.length - n));
  }

  function mean(xs) {
    return xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : null;
  }

  function render() {
    const tree = state.tree;
    setBadge(!!tree.is_healthy);
    $('#version').textContent =
      `v${tree.version || '?'} · up ${fmtUptime(tree.uptime_seconds)}` +
      (tree.shm_name ? ` · shm ${tree.shm_name}` : '');
    renderUnhealthy(tree);
    renderTiles(tree);
    renderCharts();
    renderTree(tree);
    renderEngines(tree);
    renderL2(tree);
  }

  function tile(id, value, sub, title) {
    const t = document.getElementById(id);
    $('[data-v]', t).textContent = value;
    $('[data-sub]', t).textContent = sub || '';
    if (title) t.title = title;
    return t;
  }

  function renderTiles(tree) {
    const l1 = dig(tree, 'storage_manager', 'l1_manager') || {};
    const used = l1.memory_used_bytes;
    const total = l1.memory_total_bytes;
    const t = tile('tile-l1', fmtBytes(used),
      total ? `of ${fmtBytes(total)} · ${fmtPct(used / total)}` : '');
    $('.bar-fill', t).style.width = total ? Math.min(100, (100 * used) / total).toFixed(1) + '%' : '0';
    tile('tile-objects', fmtNum(l1.total_object_count),
      `write-locked ${fmtNum(l1.write_locked_count)} · evicted ${fmtNum(l1.evicted_object_count_total)}`);
    tile('tile-locked', fmtNum(l1.read_locked_count), `read-locked · temporary ${fmtNum(l1.temporary_count)}`);
    const sessions = tree.sessions || {};
    tile('tile-sessions', fmtNum(tree.active_sessions),
      `created ${fmtNum(sessions.created_total)} · expired ${fmtNum(sessions.expired_total)}`);

    const minute = lastN(60);
    const req = minute.reduce((a, p) => a + p.lookup_chunks_requested, 0);
    const hit = minute.reduce((a, p) => a + p.lookup_chunks_hit, 0);
    const tr = tree.transfers || {};
    const life = tr.lookup_chunks_requested_total
      ? tr.lookup_chunks_hit_total / tr.lookup_chunks_requested_total : null;
    tile('tile-hit', req ? fmtPct(hit / req) : '–',
      req ? `${fmtNum(hit)} / ${fmtNum(req)} chunks · lifetime ${fmtPct(life)}`
        : 'no lookups in the last minute');

    const recent = lastN(5);
    const avg = (k) => mean(recent.map((p) => p[k]));
    tile('tile-store', fmtBytes(avg('store_bytes_per_second')) + '/s',
      `${fmtNum(avg('store_chunks_per_second'))} chunks/s (5 s avg)`);
    tile('tile-retrieve', fmtBytes(avg('retrieve_bytes_per_second')) + '/s',
      `${fmtNum(avg('retrieve_chunks_per_second'))} chunks/s (5 s avg)`);
    const last = recent[recent.length - 1];
    if (last && last.rpc_latency_p99_seconds !== null) {
      tile('tile-rpc', fmtDur(last.rpc_latency_p99_seconds),
        `p50 ${fmtDur(last.rpc_latency_p50_seconds)} · ${fmtNum(last.rpc_requests_per_second)} req/s`);
    } else {
      tile('tile-rpc', 'idle', 'no requests in the last second');
    }
  }

  // ---- charts -------------------------------------------------------------------------------

  function svg(tag, attrs) {
    const e = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    return e;
  }

  // A "nice" upper bound and tick count for a positive maximum; `binary` uses powers of 1024.
  function niceScale(max, binary) {
    if (!(max > 0)) return { max: 1, ticks: 4 };
    let unit = 1;
    if (binary) {
      while (max / unit >= 1024) unit *= 1024;
    }
    const v = max / unit;
    const exp = Math.pow(10, Math.floor(Math.log10(v)));
    const f = v / exp;
    const nf = f <= 1 ? 1 : f <= 2 ? 2 : f <= 2.5 ? 2.5 : f <= 5 ? 5 : 10;
    return { max: nf * exp * unit, ticks: nf === 2.5 || nf === 5 ? 5 : 4 };
  }

  // series: [{name, cls, values: [number|null per sample]}]
  function drawChart(fig, samples, series, opts) {
    const plot = $('.plot', fig);
    const legend = $('.legend', fig);
    const width = Math.max(240, Math.floor(plot.clientWidth || 300));
    const height = CHART_HEIGHT;
    const m = { l: 62, r: 10, t: 8, b: 22 };
    const iw = width - m.l - m.r;
    const ih = height - m.t - m.b;

    const times = samples.map((p) => p.unix_ms);
    const tEnd = times.length ? times[times.length - 1] : Date.now();
    const span = Math.min(MAX_SPAN_MS, Math.max(MIN_SPAN_MS, times.length ? tEnd - times[0] : 0));
    const tStart = tEnd - span;
    let vmax = 0;
    let nonzero = 0;
    samples.forEach((_, i) => {
      let any = false;
      for (const s of series) {
        const v = s.values[i];
        if (v !== null && isFinite(v)) {
          vmax = Math.max(vmax, v);
          if (v > 0) any = true;
        }
      }
      if (any) nonzero += 1;
    });
    const scale = opts.fixedMax ? { max: opts.fixedMax, ticks: 4 }
      : niceScale(vmax > 0 ? vmax : opts.emptyMax || 1, opts.binary);
    const x = (t) => m.l + ((t - tStart) / span) * iw;
    const y = (v) => m.t + ih - (Math.min(v, scale.max) / scale.max) * ih;

    const root = svg('svg', {
      viewBox: `0 0 ${width} ${height}`,
      width,
      height,
      role: 'img',
      'aria-label': fig.querySelector('figcaption').textContent,
    });
    for (let i = 0; i <= scale.ticks; i += 1) {
      const v = (scale.max * i) / scale.ticks;
      const yy = y(v);
      root.appendChild(svg('line', { x1: m.l, x2: width - m.r, y1: yy, y2: yy, class: 'grid' }));
      const label = svg('text', { x: m.l - 6, y: yy + 4, class: 'axis', 'text-anchor': 'end' });
      label.textContent = opts.fmt(v);
      root.appendChild(label);
    }
    for (let i = 0; i <= 3; i += 1) {
      const t = tStart + (span * i) / 3;
      const label = svg('text', {
        x: x(t),
        y: height - 6,
        class: 'axis',
        'text-anchor': i === 0 ? 'start' : i === 3 ? 'end' : 'middle',
      });
      label.textContent = clock(t);
      root.appendChild(label);
    }
    series.forEach((s, si) => {
      // Split at nulls so an undefined interval is a gap, not a line to zero.
      let d = '';
      let area = '';
      let run = [];
      const flush = () => {
        if (!run.length) return;
        d += 'M' + run.map(([xx, yy]) => `${xx.toFixed(1)},${yy.toFixed(1)}`).join('L');
        if (si === 0 && opts.area) {
          const base = y(0).toFixed(1);
          area += `M${run[0][0].toFixed(1)},${base}L` +
            run.map(([xx, yy]) => `${xx.toFixed(1)},${yy.toFixed(1)}`).join('L') +
            `L${run[run.length - 1][0].toFixed(1)},${base}Z`;
        }
        run = [];
      };
      samples.forEach((p, i) => {
        const v = s.values[i];
        if (v === null || !isFinite(v) || p.unix_ms < tStart) {
          flush();
        } else {
          run.push([x(p.unix_ms), y(v)]);
        }
      });
      flush();
      if (area) root.appendChild(svg('path', { d: area, class: `area ${s.cls}` }));
      if (d) {
        const path = svg('path', { d, class: `line ${s.cls}`, 'data-series': s.name });
        root.appendChild(path);
      }
      // A lone point (e.g. the first sample) is invisible as a path: mark the latest one.
      const li = s.values.length - 1;
      if (li >= 0 && s.values[li] !== null && isFinite(s.values[li])) {
        root.appendChild(svg('circle', {
          cx: x(times[li]), cy: y(s.values[li]), r: 2.5, class: `dot-end ${s.cls}`,
        }));
      }
    });
    const cursor = svg('line', { x1: 0, x2: 0, y1: m.t, y2: m.t + ih, class: 'cursor', visibility: 'hidden' });
    root.appendChild(cursor);
    const hit = svg('rect', { x: m.l, y: m.t, width: iw, height: ih, class: 'hit' });
    root.appendChild(hit);

    const tip = el('div', 'tip');
    tip.hidden = true;
    const hover = (ev) => {
      if (!samples.length) return;
      const rect = root.getBoundingClientRect();
      const px = ((ev.clientX - rect.left) / rect.width) * width;
      const t = tStart + ((px - m.l) / iw) * span;
      let lo = 0;
      let hi = samples.length - 1;
      while (lo < hi) {
        const mid = (lo + hi) >> 1;
        if (times[mid] < t) lo = mid + 1;
        else hi = mid;
      }
      if (lo > 0 && Math.abs(times[lo - 1] - t) < Math.abs(times[lo] - t)) lo -= 1;
      const cx = x(times[lo]);
      cursor.setAttribute('x1', cx);
      cursor.setAttribute('x2', cx);
      cursor.setAttribute('visibility', 'visible');
      tip.textContent = '';
      tip.appendChild(el('div', 'tip-time', clock(times[lo])));
      for (const s of series) {
        const row = el('div', 'tip-row');
        row.appendChild(el('span', `swatch ${s.cls}`));
        row.appendChild(document.createTextNode(`${s.name}: ${opts.fmt(s.values[lo])}`));
        tip.appendChild(row);
      }
      tip.hidden = false;
      const left = (cx / width) * rect.width;
      tip.style.left = Math.min(Math.max(0, left + 8), rect.width - 150) + 'px';
    };
    const leave = () => {
      cursor.setAttribute('visibility', 'hidden');
      tip.hidden = true;
    };
    hit.addEventListener('mousemove', hover);
    hit.addEventListener('mouseleave', leave);

    plot.replaceChildren(root, tip);
    legend.replaceChildren(...series.map((s) => {
      const item = el('span', 'legend-item');
      item.appendChild(el('span', `swatch ${s.cls}`));
      const lastV = s.values.length ? s.values[s.values.length - 1] : null;
      item.appendChild(document.createTextNode(`${s.name} ${opts.fmt(lastV)}`));
      return item;
    }));
    if (opts.note) legend.appendChild(el('span', 'legend-note', opts.note));
    fig.dataset.points = String(samples.filter((p) => p.unix_ms >= tStart).length);
    fig.dataset.nonzero = String(nonzero);
  }

  function renderCharts() {
    const all = state.series.samples;
    const tEnd = all.length ? all[all.length - 1].unix_ms : 0;
    const samples = all.filter((p) => p.unix_ms >= tEnd - MAX_SPAN_MS);
    const col = (k) => samples.map((p) => (p[k] === undefined ? null : p[k]));
    const total = samples.length ? samples[samples.length - 1].l1_total_bytes : 0;

    drawChart($('#chart-l1'), samples, [{ name: 'used', cls: 's1', values: col('l1_used_bytes') }], {
      fmt: fmtBytes, binary: true, fixedMax: total || undefined, area: true,
      note: total ? `of ${fmtBytes(total)}` : '',
    });
    drawChart($('#chart-hit'), samples, [{ name: 'hit rate', cls: 's2', values: col('hit_rate') }], {
      fmt: fmtPct, fixedMax: 1, area: true, note: 'gaps: no lookups',
    });
    const bytes = samples.some((p) => p.store_bytes_per_second > 0 || p.retrieve_bytes_per_second > 0);
    const chunks = samples.some((p) => p.store_chunks_per_second > 0 || p.retrieve_chunks_per_second > 0);
    if (!bytes && chunks) {
      drawChart($('#chart-throughput'), samples, [
        { name: 'store', cls: 's1', values: col('store_chunks_per_second') },
        { name: 'retrieve', cls: 's3', values: col('retrieve_chunks_per_second') },
      ], { fmt: (v) => fmtNum(v) + '/s', note: 'chunks per second', emptyMax: 10 });
    } else {
      drawChart($('#chart-throughput'), samples, [
        { name: 'store', cls: 's1', values: col('store_bytes_per_second') },
        { name: 'retrieve', cls: 's3', values: col('retrieve_bytes_per_second') },
      ], { fmt: (v) => fmtBytes(v) + '/s', binary: true, emptyMax: 1 << 20 });
    }
    drawChart($('#chart-rpc'), samples, [
      { name: 'p99', cls: 's4', values: col('rpc_latency_p99_seconds') },
      { name: 'p50', cls: 's2', values: col('rpc_latency_p50_seconds') },
    ], { fmt: fmtDur, note: 'per 1 s interval', emptyMax: 1e-3 });
    drawCurve($('#chart-curve'), state.curve, state.tree);
  }

  // The live hit-rate curve: estimated hit rate (y, 0-100 %) against cache size (x, log scale),
  // one point per size of /api/hit-rate-curve, L1's size marked, L2 capacities as diamonds.
  function drawCurve(fig, curve, tree) {
    const plot = $('.plot', fig);
    const legend = $('.legend', fig);
    const points = (curve && curve.points) || [];
    const l2 = (curve && curve.l2) || [];
    fig.dataset.points = String(points.length);
    fig.dataset.current = '0';
    if (!curve || !points.length) {
      const why = !curve ? 'waiting for /api/hit-rate-curve'
        : !curve.enabled ? 'off (kvtier serve --hit-rate-curve off)'
          : 'no estimate yet: it needs lookups and an object in L1';
      plot.replaceChildren(el('div', 'curve-empty muted', why));
      legend.replaceChildren();
      return;
    }
    const width = Math.max(240, Math.floor(plot.clientWidth || 300));
    const height = CHART_HEIGHT;
    const m = { l: 62, r: 14, t: 8, b: 22 };
    const iw = width - m.l - m.r;
    const ih = height - m.t - m.b;
    const sizes = points.map((p) => p.size_bytes).concat(l2.map((p) => p.size_bytes));
    const lmin = Math.log2(Math.min(...sizes));
    const lmax = Math.log2(Math.max(...sizes));
    const lspan = Math.max(1e-9, lmax - lmin);
    const x = (b) => m.l + ((Math.log2(b) - lmin) / lspan) * iw;
    const y = (v) => m.t + ih - Math.min(1, Math.max(0, v)) * ih;
    const root = svg('svg', {
      viewBox: `0 0 ${width} ${height}`, width, height, role: 'img',
      'aria-label': fig.querySelector('figcaption').textContent,
    });
    for (let i = 0; i <= 4; i += 1) {
      const v = i / 4;
      root.appendChild(svg('line', { x1: m.l, x2: width - m.r, y1: y(v), y2: y(v), class: 'grid' }));
      const label = svg('text', { x: m.l - 6, y: y(v) + 4, class: 'axis', 'text-anchor': 'end' });
      label.textContent = fmtPct(v);
      root.appendChild(label);
    }
    points.forEach((p, i) => {
      const label = svg('text', {
        x: x(p.size_bytes), y: height - 6, class: 'axis',
        'text-anchor': i === 0 ? 'start' : i === points.length - 1 ? 'end' : 'middle',
      });
      label.textContent = fmtBytes(p.size_bytes);
      root.appendChild(label);
    });
    const cur = points.find((p) => p.current);
    if (cur) {
      root.appendChild(svg('line', {
        x1: x(cur.size_bytes), x2: x(cur.size_bytes), y1: m.t, y2: m.t + ih,
        class: 'current-size', 'data-size': cur.size_bytes,
      }));
    }
    const d = 'M' + points.map((p) => `${x(p.size_bytes).toFixed(1)},${y(p.estimated_hit_rate).toFixed(1)}`).join('L');
    root.appendChild(svg('path', { d, class: 'line s2', 'data-series': 'estimate' }));
    for (const p of points) {
      const c = svg('circle', {
        cx: x(p.size_bytes), cy: y(p.estimated_hit_rate), r: p.current ? 5 : 3,
        class: p.current ? 'curve-point current-marker' : 'curve-point s2',
        'data-ratio': p.ratio_to_current,
      });
      const title = svg('title');
      title.textContent = `${fmtBytes(p.size_bytes)} (${p.ratio_to_current}× L1): ${fmtPct(p.estimated_hit_rate)}`;
      c.appendChild(title);
      root.appendChild(c);
    }
    for (const p of l2) {
      const cx = x(p.size_bytes);
      const cy = y(p.estimated_hit_rate);
      const dm = svg('path', {
        d: `M${cx},${cy - 5}L${cx + 5},${cy}L${cx},${cy + 5}L${cx - 5},${cy}Z`, class: 'l2-point',
      });
      const title = svg('title');
      title.textContent = `${p.adapter}: ${fmtBytes(p.size_bytes)}: ${fmtPct(p.estimated_hit_rate)}`;
      dm.appendChild(title);
      root.appendChild(dm);
    }
    plot.replaceChildren(root);
    const tr = (tree && tree.transfers) || {};
    const measured = tr.lookup_chunks_requested_total
      ? tr.lookup_chunks_hit_total / tr.lookup_chunks_requested_total : null;
    const items = [];
    const item = (cls, text) => {
      const it = el('span', 'legend-item');
      it.appendChild(el('span', `swatch ${cls}`));
      it.appendChild(document.createTextNode(text));
      items.push(it);
    };
    if (cur) item('current', `L1 ${fmtBytes(cur.size_bytes)}: ${fmtPct(cur.estimated_hit_rate)} est.`);
    if (measured !== null) item('s1', `measured ${fmtPct(measured)}`);
    if (l2.length) item('l2', 'L2 capacity');
    legend.replaceChildren(...items);
    legend.appendChild(el('span', 'legend-note',
      `LRU model · sample rate ${fmtNum(curve.sample_rate)} · ${fmtNum(curve.lookups_observed)} lookups`));
    fig.dataset.current = cur ? '1' : '0';
  }

  // ---- status tree --------------------------------------------------------------------------

  const isNode = (v) => v !== null && typeof v === 'object' && !Array.isArray(v) &&
    typeof v.is_healthy === 'boolean';
  const isObj = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);

  // The part of a node's reason that is its own (not just "unhealthy: <children>").
  function ownReason(node) {
    const r = node.unhealthy_reason;
    if (node.is_healthy || typeof r !== 'string') return null;
    const hasBadChild = Object.values(node).some((v) =>
      (isNode(v) && !v.is_healthy) ||
      (Array.isArray(v) && v.some((c) => isNode(c) && !c.is_healthy)) ||
      (isObj(v) && !isNode(v) && Object.values(v).some((c) => isNode(c) && !c.is_healthy)));
    if (!hasBadChild) return r;
    if (r.startsWith('unhealthy: ')) return null;
    const i = r.lastIndexOf('; unhealthy: ');
    return i >= 0 ? r.slice(0, i) : r;
  }

  function collectUnhealthy(node, path, out) {
    if (!isNode(node) || node.is_healthy) return;
    const own = ownReason(node);
    if (own) out.push({ path, reason: own });
    for (const [k, v] of Object.entries(node)) {
      if (isNode(v)) collectUnhealthy(v, `${path}.${k}`, out);
      else if (Array.isArray(v)) v.forEach((c, i) => collectUnhealthy(c, `${path}.${k}[${i}]`, out));
      else if (isObj(v)) {
        for (const [n, c] of Object.entries(v)) collectUnhealthy(c, `${path}.${k}.${n}`, out);
      }
    }
  }

  function renderUnhealthy(tree) {
    const out = [];
    collectUnhealthy(tree, 'engine', out);
    const section = $('#unhealthy');
    section.hidden = out.length === 0;
    $('#unhealthy-list').replaceChildren(...out.map(({ path, reason }) => {
      const li = el('li');
      const a = el('a', 'path', path);
      a.href = '#';
      a.addEventListener('click', (ev) => {
        ev.preventDefault();
        const target = document.querySelector(`[data-path="${CSS.escape(path)}"]`);
        if (target) {
          target.open = true;
          target.scrollIntoView({ behavior: 'smooth', block: 'center' });
        }
      });
      li.appendChild(a);
      li.appendChild(el('span', 'reason-text', reason));
      return li;
    }));
  }

  function group(key, path, depth, value) {
    const healthy = isNode(value) ? value.is_healthy : null;
    const d = el('details', isNode(value) ? `node ${healthy ? 'healthy' : 'unhealthy'}` : 'obj');
    d.dataset.path = path;
    if (healthy !== null) d.dataset.healthy = String(healthy);
    const was = state.prevHealthy.get(path);
    if (healthy === false && was !== false) state.open.delete(path); // newly unhealthy: show it
    if (healthy !== null) state.prevHealthy.set(path, healthy);
    const chosen = state.open.get(path);
    d.open = chosen !== undefined ? chosen : healthy === false || (healthy !== null && depth < 2);
    const summary = el('summary');
    if (healthy !== null) summary.appendChild(el('span', 'dot'));
    summary.appendChild(el('span', 'key', key));
    if (healthy === false) summary.appendChild(el('span', 'tag-bad', 'unhealthy'));
    else if (!isNode(value)) summary.appendChild(el('span', 'count', `{${Object.keys(value).length}}`));
    summary.addEventListener('click', () => state.open.set(path, !d.open));
    d.appendChild(summary);
    if (healthy === false && typeof value.unhealthy_reason === 'string') {
      d.appendChild(el('div', 'reason', value.unhealthy_reason));
    }
    d.appendChild(body(value, path, depth + 1));
    return d;
  }

  function body(obj, path, depth) {
    const wrap = el('div', 'children');
    const rows = el('table', 'fields');
    const tbody = el('tbody');
    rows.appendChild(tbody);
    const nested = [];
    for (const [k, v] of Object.entries(obj)) {
      if (k === 'is_healthy' || k === 'unhealthy_reason') continue;
      const p = `${path}.${k}`;
      if (isObj(v) && Object.keys(v).length) {
        nested.push(group(k, p, depth, v));
      } else if (Array.isArray(v) && v.some(isNode)) {
        v.forEach((c, i) => {
          if (isNode(c)) nested.push(group(`${k}[${i}]`, `${p}[${i}]`, depth, c));
        });
      } else {
        const tr = el('tr');
        tr.appendChild(el('th', '', k));
        const td = el('td', typeof v === 'number' ? 'num' : '', fmtField(k, v));
        if (typeof v === 'number' && fmtField(k, v) !== String(v)) td.title = String(v);
        tr.appendChild(td);
        tbody.appendChild(tr);
      }
    }
    if (tbody.children.length) wrap.appendChild(rows);
    wrap.append(...nested);
    return wrap;
  }

  function renderTree(tree) {
    const root = group('engine', 'engine', 0, tree);
    $('#tree').replaceChildren(root);
  }

  function setAll(open) {
    document.querySelectorAll('#tree details').forEach((d) => {
      d.open = open;
      state.open.set(d.dataset.path, open);
    });
  }

  // ---- tables -------------------------------------------------------------------------------

  function emptyRow(tbody, cols, text) {
    const tr = el('tr', 'empty');
    const td = el('td', '', text);
    td.colSpan = cols;
    tr.appendChild(td);
    tbody.replaceChildren(tr);
  }

  function renderEngines(tree) {
    const meta = tree.non_cuda_context_meta || {};
    const tbody = $('#engines tbody');
    const ids = Object.keys(meta);
    if (!ids.length) {
      emptyRow(tbody, 7, 'No engine registered.');
      return;
    }
    tbody.replaceChildren(...ids.map((id) => {
      const m = meta[id] || {};
      const tr = el('tr');
      const cells = [
        id, m.model_name, fmtNum(m.world_size), m.dtype,
        Array.isArray(m.slot_shape) ? m.slot_shape.join('×') : '',
        fmtBytes(m.object_bytes), m.pinged ? 'yes' : 'no',
      ];
      for (const c of cells) tr.appendChild(el('td', '', c === undefined ? '' : String(c)));
      return tr;
    }));
  }

  // One row per adapter (storage_manager.l2_adapters, in index order).
  const L2_COLUMNS = [
    ['#', (a, i) => String(a.index ?? i)],
    ['adapter', (a) => a.kind || a.type || ''],
    ['health', null],
    ['objects', (a) => fmtNum(a.stored_object_count)],
    ['size', (a) => a.current_size_bytes === undefined ? '' : fmtBytes(a.current_size_bytes) +
      (a.max_capacity_bytes ? ` / ${fmtBytes(a.max_capacity_bytes)}` : '')],
    ['connected', (a) => a.connected === undefined ? '' : a.connected ? 'yes' : 'no'],
    ['stored', (a) => fmtNum(dig(a, 'ops', 'store', 'objects_total'))],
    ['loaded', (a) => fmtNum(dig(a, 'ops', 'load', 'objects_total'))],
    ['last error', (a) => a.last_error || ''],
  ];

  function renderL2(tree) {
    const adapters = dig(tree, 'storage_manager', 'l2_adapters');
    const list = Array.isArray(adapters) ? adapters.filter(isObj) : [];
    const head = el('tr');
    for (const [h] of L2_COLUMNS) head.appendChild(el('th', '', h));
    $('#l2 thead').replaceChildren(head);
    const tbody = $('#l2 tbody');
    if (!list.length) {
      emptyRow(tbody, L2_COLUMNS.length, 'No L2 adapters configured.');
      return;
    }
    tbody.replaceChildren(...list.map((a, i) => {
      const tr = el('tr');
      for (const [, get] of L2_COLUMNS) {
        if (get) {
          tr.appendChild(el('td', '', get(a, i)));
        } else {
          const bad = a.is_healthy === false;
          tr.appendChild(el('td', bad ? 'bad' : 'ok', bad ? `unhealthy: ${a.unhealthy_reason || ''}` : 'healthy'));
        }
      }
      return tr;
    }));
  }

  // ---- start --------------------------------------------------------------------------------

  function start() {
    initToken();
    $('#auth-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const v = $('#auth-token').value.trim();
      if (!v) return;
      setToken(v);
      $('#auth-token').value = '';
      state.stopped = false;
      showAuth(false);
      $('#conn').textContent = 'connecting…';
      schedule(0);
    });
    $('#token-button').textContent = 'forget token';
    $('#token-button').addEventListener('click', () => {
      setToken(null);
      window.location.reload();
    });
    $('#expand-all').addEventListener('click', () => setAll(true));
    $('#collapse-all').addEventListener('click', () => setAll(false));
    let resizeTimer = null;
    window.addEventListener('resize', () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(() => {
        if (state.tree) renderCharts();
      }, 150);
    });
    refresh();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
