// The Hawker dashboard: polls GET /v1/stats once a second and draws its chart points with uPlot.
// The server computes every value (hawker/server/stats.py) from the /metrics registry; this
// script only keeps the points of the chosen window, plots them and fills the table.
"use strict";

(function () {
  const POLL_MS = 1000;
  const KEEP_S = 600; // the longest window offered
  const HEIGHT = 170;
  const COLORS = ["#2f6fde", "#e8710a", "#1a7f37", "#c62828", "#8e44ad", "#00838f", "#6d4c41", "#c2185b"];

  const state = {
    panels: [],
    charts: {}, // panel id -> {plot, keys}
    points: [],
    lastT: null,
    now: Date.now() / 1000,
    windowS: 300,
    updates: 0,
  };
  window.hawkerDashboard = state; // for a look from the browser console

  // ------------------------------------------------------------ formatting
  function fmtNumber(v) {
    if (v == null || Number.isNaN(v)) return "–";
    const a = Math.abs(v);
    if (Number.isInteger(v) && a < 10000) return String(v);
    if (a >= 1000) return (v / 1000).toFixed(a >= 10000 ? 0 : 1) + "k";
    if (a >= 100) return v.toFixed(0);
    if (a >= 10) return v.toFixed(1);
    return v.toFixed(2).replace(/\.?0+$/, "") || "0";
  }

  function fmtSeconds(v) {
    if (v == null || Number.isNaN(v)) return "–";
    if (v === 0) return "0";
    if (v < 0.01) return (v * 1000).toFixed(2) + " ms";
    if (v < 1) return (v * 1000).toFixed(0) + " ms";
    return v.toFixed(v < 10 ? 2 : 1) + " s";
  }

  function fmtValue(panel, v) {
    if (v == null) return "–";
    if (panel.unit === "s") return fmtSeconds(v);
    if (panel.unit === "%") return v.toFixed(v < 10 ? 1 : 0) + "%";
    return fmtNumber(v) + (panel.unit ? " " + panel.unit : "");
  }

  // Short tick labels, "21:40" on the minute and ":10" between (uPlot's default adds
  // a date line whose labels overlap when the minute turns).
  function timeLabels(u, ticks) {
    const pad = (n) => String(n).padStart(2, "0");
    return ticks.map((t) => {
      const d = new Date(t * 1000);
      return d.getSeconds() === 0 ? pad(d.getHours()) + ":" + pad(d.getMinutes()) : ":" + pad(d.getSeconds());
    });
  }

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text != null) node.textContent = text;
    return node;
  }

  // ---------------------------------------------------------------- charts
  function seriesKeys(panel) {
    if (panel.series) return panel.series;
    // "series_from": one series per key seen in that field of any kept point (errors by type).
    const seen = new Set();
    for (const p of state.points) for (const k of Object.keys(p[panel.series_from] || {})) seen.add(k);
    return [...seen].sort().map((k) => ({ key: k, label: k, from: panel.series_from }));
  }

  function chartWidth(container) {
    return Math.max(200, container.clientWidth - 20);
  }

  function makePlot(panel, container, keys) {
    const right = keys.some((s) => s.axis === "right");
    const range = (u, min, max) =>
      panel.unit === "%" ? [0, 100] : [0, max != null && max > 0 ? max * 1.15 : 1];
    const axis = (scale, side) => ({
      scale: scale,
      side: side,
      stroke: "#6b7280",
      grid: { stroke: "#eef0f3", show: side === 3 },
      size: 64,
      values: (u, vals) => vals.map((v) => (panel.unit === "s" ? fmtSeconds(v) : fmtNumber(v))),
    });
    const series = [{}].concat(
      keys.map((s, i) => ({
        label: s.label + (right && s.axis === "right" ? " (right)" : ""),
        scale: s.axis === "right" ? "y2" : "y",
        stroke: COLORS[i % COLORS.length],
        width: 1.5,
        spanGaps: false,
        points: { show: false },
        value: (u, v) => fmtValue(panel, v),
      }))
    );
    const opts = {
      width: chartWidth(container),
      height: HEIGHT,
      series: series,
      legend: { live: true },
      cursor: { drag: { x: false, y: false } },
      scales: {
        x: { time: true, range: () => [state.now - state.windowS, state.now] },
        y: { range: range },
        y2: { range: range },
      },
      axes: [{ stroke: "#6b7280", grid: { stroke: "#eef0f3" }, space: 40, values: timeLabels }, axis("y", 3)].concat(right ? [axis("y2", 1)] : []),
    };
    const holder = container.querySelector(".plot");
    holder.innerHTML = "";
    return new uPlot(opts, plotData(panel, keys), holder);
  }

  function plotData(panel, keys) {
    const scale = panel.scale || 1;
    const xs = state.points.map((p) => p.t);
    const ys = keys.map((s) =>
      state.points.map((p) => {
        const v = s.from ? (p[s.from] || {})[s.key] : p[s.key];
        return v == null ? null : v * scale;
      })
    );
    return [xs].concat(ys);
  }

  // Away from the cursor, the legend shows the newest values instead of dashes.
  function showLatest(plot) {
    const n = plot.data[0].length;
    if (n && !(plot.cursor.left >= 0)) plot.setLegend({ idx: n - 1 });
  }

  function buildCharts() {
    const root = document.getElementById("charts");
    for (const panel of state.panels) {
      const box = el("div", { class: "chart", id: "chart-" + panel.id, "data-points": "0" });
      box.appendChild(el("h3", {}, panel.title));
      box.appendChild(el("div", { class: "plot" }));
      root.appendChild(box);
      const keys = seriesKeys(panel);
      state.charts[panel.id] = { box: box, keys: keys, plot: makePlot(panel, box, keys) };
    }
  }

  function updateCharts() {
    for (const panel of state.panels) {
      const chart = state.charts[panel.id];
      const keys = seriesKeys(panel);
      if (JSON.stringify(keys) !== JSON.stringify(chart.keys)) {
        chart.plot.destroy(); // a new error type appeared: rebuild with one more series
        chart.keys = keys;
        chart.plot = makePlot(panel, chart.box, keys);
      } else {
        chart.plot.setData(plotData(panel, keys));
      }
      showLatest(chart.plot);
      chart.box.setAttribute("data-points", String(state.points.length));
    }
  }

  // ----------------------------------------------------- tiles and table
  function sumTotals(totals, prefix) {
    let sum = 0;
    for (const [k, v] of Object.entries(totals)) if (k === prefix || k.startsWith(prefix + "{")) sum += v;
    return sum;
  }

  function updateTiles(data) {
    const last = state.points[state.points.length - 1] || {};
    const t = data.totals;
    const set = (id, text) => (document.getElementById(id).textContent = text);
    set("tile-generation", fmtNumber(last.generation_tps) + " tok/s");
    set("tile-prompt", fmtNumber(last.prompt_tps) + " tok/s");
    set("tile-requests", fmtNumber(t["hawker:num_requests_running"]) + " / " + fmtNumber(t["hawker:num_requests_waiting"]));
    set("tile-kv", ((t["hawker:kv_cache_usage_perc"] || 0) * 100).toFixed(1) + "%");
    set("tile-prefix", last.prefix_hit_rate == null ? "–" : (last.prefix_hit_rate * 100).toFixed(1) + "%");
    set("tile-ttft", fmtSeconds(last.ttft_p50));
    set("tile-ttft-p99", "p99 " + fmtSeconds(last.ttft_p99));
    set("tile-finished", fmtNumber(sumTotals(t, "hawker:request_finished_total")));
    const aborted = t['hawker:request_finished_total{finished_reason="abort"}'] || 0;
    const failed = t['hawker:request_finished_total{finished_reason="error"}'] || 0;
    set("tile-errors", fmtNumber(sumTotals(t, "hawker:http_errors_total") + failed));
    set("tile-aborted", fmtNumber(aborted) + " aborted");
  }

  function updateTable(data) {
    const body = document.querySelector("#inflight tbody");
    const rows = data.requests.map((r) => {
      const tr = el("tr", { "data-state": r.state });
      tr.appendChild(el("td", { class: "id", title: r.request_id }, r.request_id));
      tr.appendChild(el("td", {}, String(r.replica)));
      tr.appendChild(el("td", {}, r.age_s.toFixed(1) + " s"));
      tr.appendChild(el("td", {}, String(r.prompt_tokens)));
      tr.appendChild(el("td", {}, r.max_tokens ? r.output_tokens + " / " + r.max_tokens : String(r.output_tokens)));
      const cell = el("td");
      cell.appendChild(el("span", { class: "state " + r.state }, r.state));
      tr.appendChild(cell);
      tr.appendChild(el("td", {}, fmtSeconds(r.ttft_s)));
      return tr;
    });
    body.replaceChildren(...rows);
    const more = data.requests_in_flight - data.requests.length;
    document.getElementById("inflight-count").textContent =
      String(data.requests_in_flight) + (more > 0 ? " (oldest " + data.requests.length + " shown)" : "");
  }

  function setStatus(text, kind) {
    const pill = document.getElementById("status");
    pill.textContent = text;
    pill.className = "pill " + kind;
  }

  // ------------------------------------------------------------------ poll
  async function poll() {
    try {
      const url = "v1/stats" + (state.lastT == null ? "" : "?since=" + state.lastT);
      const response = await fetch(url, { cache: "no-store" });
      if (!response.ok) throw new Error("HTTP " + response.status);
      const data = await response.json();
      if (state.lastT != null && data.series.length && data.series[0].t < state.lastT) state.points = []; // restarted
      state.points.push(...data.series);
      if (state.points.length) state.lastT = state.points[state.points.length - 1].t;
      state.now = data.time;
      state.points = state.points.filter((p) => p.t >= data.time - KEEP_S);
      document.getElementById("model").textContent =
        data.model + (data.replicas > 1 ? " · " + data.replicas + " replicas" : "");
      document.getElementById("quantile-window").textContent = String(data.window_s);
      updateCharts();
      updateTiles(data);
      updateTable(data);
      state.updates += 1;
      document.body.setAttribute("data-updates", String(state.updates));
      setStatus(data.healthy ? "live" : "unhealthy", data.healthy ? "live" : "down");
    } catch (error) {
      setStatus("no answer: " + error.message, "stale");
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  async function start() {
    const select = document.getElementById("window");
    state.windowS = Number(select.value);
    select.addEventListener("change", () => {
      state.windowS = Number(select.value);
      updateCharts();
    });
    window.addEventListener("resize", () => {
      for (const chart of Object.values(state.charts)) {
        chart.plot.setSize({ width: chartWidth(chart.box), height: HEIGHT });
      }
    });
    state.panels = (await (await fetch("dashboard/static/panels.json")).json()).panels;
    buildCharts();
    poll();
  }

  start();
})();
