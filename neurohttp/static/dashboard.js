// NeuroHTTP dashboard: polls /stats every second and draws the last minute on
// canvases. No libraries: the server serves this file itself.
"use strict";

(function () {
  const POLL_MS = 1000;
  const COLORS = {
    blue: "#2563eb", green: "#16a34a", amber: "#d97706", red: "#dc2626",
    purple: "#9333ea", orange: "#ea580c", grid: "#e5e7eb", axis: "#6b7280",
  };
  // State the page keeps between polls; exposed for tests and curious people.
  const state = { updates: 0, failures: 0, last: null, cpuPrev: {}, cpuPct: {} };
  window.nhDashboard = state;

  const $ = (id) => document.getElementById(id);

  function fmt(n, digits) {
    if (n === null || n === undefined || Number.isNaN(n)) return "–";
    if (Math.abs(n) >= 1e6) return (n / 1e6).toFixed(1) + "M";
    if (Math.abs(n) >= 1e4) return (n / 1e3).toFixed(1) + "k";
    return n.toFixed(digits === undefined ? 0 : digits);
  }

  function uptime(s) {
    const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
    if (d) return d + "d " + h + "h";
    if (h) return h + "h " + m + "m";
    return m + "m " + (s % 60) + "s";
  }

  // A "nice" number at or above v: 1, 2, 2.5 or 5 times a power of ten.
  function nice(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p * 1.000001) return m * p;
    return 10 * p;
  }
  const niceMax = nice;
  const tickLabel = (v) => String(Number(v.toPrecision(3)));

  // Size the canvas to its box at the device's pixel ratio; returns a 2D context
  // in CSS pixels plus the box size.
  function prepare(canvas) {
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(50, canvas.clientWidth), h = Math.max(50, canvas.clientHeight);
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    ctx.font = "11px system-ui, sans-serif";
    return { ctx, w, h };
  }

  // A line chart of the last minute: `lines` is [{label, color, values}], one
  // value per second, oldest first.
  function lineChart(canvas, lines, unitDigits) {
    const { ctx, w, h } = prepare(canvas);
    const left = 44, right = 8, top = 18, bottom = 18;
    const pw = w - left - right, ph = h - top - bottom;
    let max = 0, n = 0;
    for (const l of lines) {
      n = Math.max(n, l.values.length);
      for (const v of l.values) if (v > max) max = v;
    }
    const step = max > 0 ? nice(max / 4) : 0.25, ymax = step * 4;  // an empty chart: 0..1
    ctx.strokeStyle = COLORS.grid;
    ctx.fillStyle = COLORS.axis;
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const y = top + ph - (ph * i) / 4;
      ctx.beginPath();
      ctx.moveTo(left, Math.round(y) + 0.5);
      ctx.lineTo(left + pw, Math.round(y) + 0.5);
      ctx.stroke();
      ctx.fillText(step * i >= 1e4 ? fmt(step * i) : tickLabel(step * i), left - 4, y);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    ctx.fillText("-60 s", left + 12, top + ph + 4);
    ctx.fillText("-30 s", left + pw / 2, top + ph + 4);
    ctx.fillText("now", left + pw - 10, top + ph + 4);
    const x = (i) => left + (n > 1 ? (pw * i) / (n - 1) : pw);
    const y = (v) => top + ph - (ph * Math.min(v, ymax)) / ymax;
    lines.forEach((l, k) => {
      if (!l.values.length) return;
      if (k === 0) {  // shade under the first line
        ctx.beginPath();
        ctx.moveTo(x(0), top + ph);
        l.values.forEach((v, i) => ctx.lineTo(x(i), y(v)));
        ctx.lineTo(x(l.values.length - 1), top + ph);
        ctx.closePath();
        ctx.globalAlpha = 0.12;
        ctx.fillStyle = l.color;
        ctx.fill();
        ctx.globalAlpha = 1;
      }
      ctx.beginPath();
      l.values.forEach((v, i) => (i ? ctx.lineTo(x(i), y(v)) : ctx.moveTo(x(i), y(v))));
      ctx.strokeStyle = l.color;
      ctx.lineWidth = 2;
      ctx.stroke();
    });
    // legend, top right
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    let lx = left + pw;
    for (let k = lines.length - 1; k >= 0; k--) {
      const l = lines[k];
      const last = l.values.length ? l.values[l.values.length - 1] : 0;
      const text = l.label + " " + fmt(last, unitDigits);
      ctx.fillStyle = COLORS.axis;
      ctx.fillText(text, lx, 8);
      lx -= ctx.measureText(text).width + 6;
      ctx.fillStyle = l.color;
      ctx.fillRect(lx - 8, 4, 8, 8);
      lx -= 16;
    }
  }

  // One row per worker: bars for req/s (against the busiest worker), CPU % (of
  // one core) and connections (against the most loaded worker).
  function workerChart(canvas, workers) {
    const want = 8 + 40 * Math.max(1, workers.length) + "px";  // grow with the workers
    if (canvas.style.height !== want) canvas.style.height = want;
    const { ctx, w, h } = prepare(canvas);
    if (!workers.length) return;
    const label = 70, gap = 6;
    const rowH = Math.min(40, (h - 4) / workers.length);
    const barH = Math.max(3, (rowH - gap) / 3);
    const maxRps = niceMax(Math.max(...workers.map((x) => x.window.rps_last)));
    const maxConn = niceMax(Math.max(...workers.map((x) => x.active_connections)));
    const bw = w - label - 90;
    ctx.textBaseline = "middle";
    workers.forEach((wk, i) => {
      const y0 = 2 + i * rowH;
      const cpu = state.cpuPct[wk.pid];  // undefined: not known (yet), not 0%
      ctx.fillStyle = COLORS.axis;
      ctx.textAlign = "left";
      ctx.fillText("worker " + wk.id, 0, y0 + rowH / 2 - gap / 2);
      const bars = [
        [wk.window.rps_last / maxRps, COLORS.blue, fmt(wk.window.rps_last) + " req/s"],
        [(cpu || 0) / 100, COLORS.orange, fmt(cpu, 0) + "% CPU"],
        [wk.active_connections / maxConn, COLORS.purple, fmt(wk.active_connections) + " conns"],
      ];
      bars.forEach(([frac, color, text], k) => {
        const y = y0 + k * barH;
        ctx.fillStyle = COLORS.grid;
        ctx.fillRect(label, y, bw, barH - 1);
        ctx.fillStyle = color;
        ctx.fillRect(label, y, Math.max(1, Math.min(1, frac) * bw), barH - 1);
        if (barH >= 9) {
          ctx.fillStyle = COLORS.axis;
          ctx.textAlign = "left";
          ctx.fillText(text, label + bw + 6, y + barH / 2);
        }
      });
    });
  }

  function table(el, head, rows) {
    const frag = document.createDocumentFragment();
    const tr = document.createElement("tr");
    for (const hcell of head) {
      const th = document.createElement("th");
      th.textContent = hcell;
      tr.appendChild(th);
    }
    frag.appendChild(tr);
    for (const row of rows) {
      const r = document.createElement("tr");
      for (const cell of row) {
        const td = document.createElement("td");
        td.textContent = cell;
        r.appendChild(td);
      }
      frag.appendChild(r);
    }
    el.replaceChildren(frag);
  }

  // CPU % per pid from the change in CPU seconds between two polls.
  function updateCpu(s) {
    const now = performance.now() / 1000;
    const procs = s.workers.map((w) => [w.pid, w.process]);
    procs.push([s.master.pid, s.master.process]);
    const next = {};
    for (const [pid, p] of procs) {
      if (!p) {
        delete state.cpuPct[pid];  // the server could not read it: unknown, not idle
        continue;
      }
      const prev = state.cpuPrev[pid];
      if (prev && now > prev.t) {
        state.cpuPct[pid] = (100 * (p.cpu_seconds - prev.cpu)) / (now - prev.t);
      }
      next[pid] = { cpu: p.cpu_seconds, t: now };
    }
    state.cpuPrev = next;
  }

  function render() {
    const s = state.last;
    if (!s) return;
    const win = s.window, se = win.series;
    const lastRps = se.rps.length ? se.rps[se.rps.length - 1] : 0;
    $("meta").textContent = "v" + s.version + " · up " + uptime(s.uptime) + " · master pid " +
      s.master.pid + " · generation " + s.master.generation;
    $("t-rps").textContent = fmt(lastRps);
    $("t-rps60").textContent = fmt(win.rps, 1);
    $("t-p99").textContent = fmt(win.latency_ms.p99, 2) + " ms";
    $("t-conns").textContent = fmt(s.active_connections);
    $("t-streams").textContent = fmt(s.streams_active);
    $("t-tok").textContent = fmt(win.tokens_out_per_s, 1);
    $("t-total").textContent = fmt(s.requests);
    $("t-workers").textContent = String(s.workers.length);

    lineChart($("c-rps"), [{ label: "req/s", color: COLORS.blue, values: se.rps }], 0);
    lineChart($("c-lat"), [
      { label: "p50", color: COLORS.green, values: se.p50 },
      { label: "p90", color: COLORS.amber, values: se.p90 },
      { label: "p99", color: COLORS.red, values: se.p99 },
    ], 2);
    lineChart($("c-conn"), [
      { label: "connections", color: COLORS.purple, values: se.active_connections },
      { label: "streams", color: COLORS.blue, values: se.streams_active },
    ], 0);
    lineChart($("c-tok"), [{ label: "tokens/s", color: COLORS.orange, values: se.tokens_out }], 0);
    workerChart($("c-workers"), s.workers);

    table($("routes"), ["route", "req/s", "p50 ms", "p99 ms", "requests", "2xx", "4xx", "5xx"],
      Object.entries(s.routes).map(([name, r]) => [name, fmt(r.window.rps, 2),
        fmt(r.window.latency_ms.p50, 2), fmt(r.window.latency_ms.p99, 2), fmt(r.requests),
        fmt(r.status["2xx"]), fmt(r.status["4xx"]), fmt(r.status["5xx"])]));
    table($("models"), ["model", "req/s", "tokens/s", "tokens in", "tokens out", "p50 ms", "p99 ms", "errors"],
      Object.entries(s.models).map(([name, m]) => [name, fmt(m.window.rps, 2),
        fmt(m.window.tokens_out_per_s, 1), fmt(m.tokens_in), fmt(m.tokens_out),
        fmt(m.window.latency_ms.p50, 2), fmt(m.window.latency_ms.p99, 2), fmt(m.errors)]));
    // each deployment with its router state: /stats "router" lists a model's
    // deployments in the order of their index
    const router = s.router || {};
    const routed = (d) => ((router[d.model] || {}).deployments || [])[d.index] || {};
    table($("deployments"), ["deployment", "origin", "breaker", "in flight", "req/s", "ttfb p50 ms", "p99 ms",
      "requests", "errors", "retries", "hedges", "tokens in", "tokens out"],
      Object.entries(s.deployments || {}).map(([name, d]) => {
        const r = routed(d);
        return [name, d.origin, r.breaker ? r.breaker.replace("_", "-") : "–", fmt(r.outstanding),
          fmt(d.window.rps, 2), fmt(d.window.ttfb_ms.p50, 2), fmt(d.window.latency_ms.p99, 2),
          fmt(d.requests), fmt(d.errors), fmt(r.retries), fmt(r.hedges), fmt(d.tokens_in),
          fmt(d.tokens_out)];
      }));
    table($("router"), ["model", "requests", "failed", "retries", "hedges", "fallbacks", "retries refused"],
      Object.entries(router).map(([name, r]) => [name, fmt(r.requests), fmt(r.failed),
        fmt(r.retries), fmt(r.hedges), fmt(r.fallbacks), fmt(r.retries_refused)]));
    table($("workers"), ["worker", "pid", "state", "req/s", "req/s 60 s", "p99 ms", "conns", "CPU %", "RSS MiB", "fds"],
      s.workers.map((w) => [String(w.id), String(w.pid), w.state, fmt(w.window.rps_last),
        fmt(w.window.rps, 1), fmt(w.window.latency_ms.p99, 2), fmt(w.active_connections),
        fmt(state.cpuPct[w.pid], 0), w.process ? fmt(w.process.rss_bytes / 1048576, 1) : "–",
        w.process ? String(w.process.open_fds) : "–"]));
    // [auth] on: per key since start (a 401 names no key: those are counted by reason)
    const auth = s.auth;
    $("keys-card").hidden = !auth;
    if (auth) {
      table($("keys"), ["key", "requests", "tokens in", "tokens out", "403 model", "429 limit"],
        Object.entries(auth.keys).map(([name, k]) => [name, fmt(k.requests), fmt(k.tokens_in),
          fmt(k.tokens_out), fmt(k.forbidden), fmt(k.rate_limited)]));
      const u = auth.unauthorized;
      $("unauthorized").textContent = "401 without a good key: " + Object.entries(u)
        .map(([reason, n]) => reason + " " + fmt(n)).join(" · ");
    }
  }

  async function poll() {
    try {
      const r = await fetch("/stats", { cache: "no-store" });
      if (!r.ok) throw new Error("HTTP " + r.status);
      state.last = await r.json();
      updateCpu(state.last);
      render();
      state.updates++;
      const st = $("status");
      st.textContent = "live · " + new Date(state.last.timestamp * 1000).toLocaleTimeString();
      st.classList.remove("down");
    } catch (e) {
      // The server may be restarting: say so on the page and keep polling.
      state.failures++;
      const st = $("status");
      st.textContent = "cannot read /stats (" + e.message + "), retrying";
      st.classList.add("down");
    }
    setTimeout(poll, POLL_MS);
  }

  window.addEventListener("resize", render);
  poll();
})();
