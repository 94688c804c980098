"use strict";
const POLL_MS = 1000;
const KINDS = ["device_linear", "device_attention", "staging", "cpu_attention"];
let apiKey = new URLSearchParams(location.hash.slice(1)).get("key") || sessionStorage.getItem("apex-key") || "";

const esc = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const pct = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)}%`);
const num = (x, digits = 0) => Number(x).toLocaleString("en", { maximumFractionDigits: digits,
                                                                minimumFractionDigits: digits });

function status(text, bad = false) {
  const el = document.getElementById("status");
  el.textContent = text;
  el.classList.toggle("bad", bad);
}

function card(metric, label, value, sub = "", bar = null) {
  const meter = bar === null ? "" :
    `<div class="bar ${bar.cls}"><i data-fill="${bar.frac}"></i></div>`;
  return `<div class="card"><div class="k">${label}</div><div class="v" data-metric="${metric}">${value}</div>` +
         `<div class="s">${sub}</div>${meter}</div>`;
}

function kvCard(pool, label, kv, cls) {
  if (!kv.total) return card(`kv_${pool}`, label, "–", "no pool");
  const frac = kv.used / kv.total;
  return card(`kv_${pool}`, label, pct(frac), `${num(kv.used)} / ${num(kv.total)} blocks`, { frac, cls });
}

function modeTable(s) {
  const total = s.modes.reduce((a, m) => a + m.total, 0);
  const rows = s.modes.map((m) => {
    const share = total ? m.total / total : 0;
    return `<tr data-mode="${m.mode}"><td>${m.mode}</td><td data-metric="mode_${m.mode}">${num(m.total)}</td>` +
           `<td data-metric="recent_${m.mode}">${num(m.recent)}</td>` +
           `<td class="share"><div class="bar"><i data-fill="${share}"></i></div></td></tr>`;
  }).join("");
  return `<h3>Mode mix</h3><table><tr><th>mode</th><th>iterations</th>` +
         `<th>last ${num(s.recent_iterations)}</th><th>share</th></tr>${rows}</table>`;
}

function tickStep(span) {
  const raw = span / 8, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  return [1, 2, 5, 10].map((m) => m * mag).find((step) => step >= raw);
}

function gapCallouts(gaps, x, left, right, rows) {
  // Above the accelerator lane, the cause of the longest visible idle stretch of each cause, left to right, on the
  // first of the label rows where it fits (every stretch keeps its tooltip).
  const longest = {};
  for (const g of gaps) {
    const best = longest[g.cause];
    if (!best || g.end_ms - g.start_ms > best.end_ms - best.start_ms + 1e-6) longest[g.cause] = g;
  }
  const used = rows.map(() => -Infinity);
  return Object.values(longest).filter((g) => x(g.end_ms) - x(g.start_ms) >= 4)
    .sort((a, b) => a.start_ms - b.start_ms).map((g) => {
      const mid = x((g.start_ms + g.end_ms) / 2), half = 3 * g.label.length;
      const cx = Math.min(Math.max(mid, left + half), right - half), row = used.findIndex((end) => end <= cx - half);
      if (row < 0) return "";
      used[row] = cx + half + 8;
      return `<line class="grid" x1="${mid.toFixed(2)}" x2="${mid.toFixed(2)}" y1="${rows[row] + 2}" ` +
             `y2="${rows[rows.length - 1] + 6}"/><text class="gap-label" data-cause="${g.cause}" ` +
             `x="${cx.toFixed(2)}" y="${rows[row]}" text-anchor="middle">${esc(g.label)}</text>`;
    }).join("");
}

function timeline(t) {
  if (!t) return `<h3>Latest sampled iteration</h3><p class="empty" data-metric="timeline">no sampled iteration yet</p>`;
  const W = 900, LEFT = 92, RIGHT = 28, LANE = 30, GAP = 8, TOP = 32, H = TOP + 2 * LANE + GAP + 24;
  const span = Math.max(t.duration_ms, ...t.subtasks.map((s) => s.end_ms), 1e-3);
  const x = (ms) => LEFT + (ms / span) * (W - LEFT - RIGHT);
  const gaps = t.gaps.map((g) => {  // drawn under the accelerator lane's bars
    const x0 = x(g.start_ms), width = Math.max(x(g.end_ms) - x0, 0.6);
    return `<rect class="gap ${g.cause}" data-cause="${g.cause}" x="${x0.toFixed(2)}" y="${TOP}" ` +
           `width="${width.toFixed(2)}" height="${LANE}"><title>accelerator idle: ${esc(g.label)} · ` +
           `${g.start_ms.toFixed(3)}–${g.end_ms.toFixed(3)} ms</title></rect>`;
  }).join("");
  const gapLabels = gapCallouts(t.gaps, x, LEFT, W - RIGHT, [TOP - 20, TOP - 6]);
  const lanes = ["accelerator", "cpu"].map((lane, i) => {
    const y = TOP + i * (LANE + GAP);
    const rects = t.subtasks.filter((s) => s.lane === lane).map((s) => {
      const half = s.kind === "staging";  // staging overlaps device work on the same side: a thinner bar
      const top = half ? y + LANE / 2 : y + 2, height = half ? LANE / 2 - 2 : LANE - 4;
      const width = Math.max(x(s.end_ms) - x(s.start_ms), 0.6);
      return `<rect class="st ${s.kind}${s.sub_batch ? " sb1" : ""}" x="${x(s.start_ms).toFixed(2)}" ` +
             `y="${top}" width="${width.toFixed(2)}" height="${height}"><title>${s.kind} · layer ${s.layer} · ` +
             `sub-batch ${s.sub_batch} · ${s.start_ms.toFixed(3)}–${s.end_ms.toFixed(3)} ms</title></rect>`;
    }).join("");
    return `<g class="lane" data-lane="${lane}"><rect class="lane-bg" x="${LEFT}" y="${y}" ` +
           `width="${W - LEFT - RIGHT}" height="${LANE}"/><text x="0" y="${y + LANE / 2 + 4}">${lane}</text>` +
           `${lane === "accelerator" ? gaps : ""}${rects}</g>`;
  }).join("");
  const step = tickStep(span), axisY = TOP + 2 * LANE + GAP;
  let ticks = "";
  for (let ms = 0; ms <= span + 1e-9; ms += step) {
    ticks += `<line class="grid" x1="${x(ms)}" x2="${x(ms)}" y1="${TOP}" y2="${axisY + 4}"/>` +
             `<text x="${x(ms)}" y="${axisY + 16}" text-anchor="middle">${+ms.toPrecision(3)} ms</text>`;
  }
  const legend = KINDS.map((k) => `<span><i class="${k}"></i>${k}</span>`).join("");
  const idle = t.idle_by_cause.map((c) => `<i class="gap ${c.cause}"></i>${esc(c.label)} ${c.ms.toFixed(2)} ms`)
    .join(" · ") || "none";
  return `<h3>Latest sampled iteration: step ${t.step_id} · ${t.mode} · ${t.duration_ms.toFixed(2)} ms · ` +
         `hidden <span data-metric="timeline_hidden">${pct(t.hidden_ratio)}</span> of ` +
         `${t.cpu_attention_ms.toFixed(2)} ms CPU attention · accelerator idle in the forward ` +
         `${t.device_idle_ms.toFixed(2)} ms</h3>` +
         `<svg class="timeline" data-metric="timeline" viewBox="0 0 ${W} ${H}" width="100%" role="img" ` +
         `aria-label="per-layer subtasks of step ${t.step_id}">${ticks}${lanes}${gapLabels}</svg>` +
         `<div class="legend">${legend}</div>` +
         `<div class="gaps">accelerator idle over the whole step, by cause (shaded): ` +
         `<span data-metric="timeline_gaps">${idle}</span></div>`;
}

function replica(r, i) {
  const head = `<h2>${esc(r.address)} <span class="badge${r.serving ? "" : " down"}" data-metric="serving">` +
               `${r.serving ? "SERVING" : "NOT SERVING"}</span><span class="muted">${r.stats ? esc(r.stats.policy) : ""}` +
               `</span></h2>`;
  const routed = card("in_flight", "gateway in flight", num(r.in_flight),
                      `${num(r.submitted)} sent · ${num(r.completed)} ended`);
  if (!r.stats) {
    return `<section class="replica" data-replica="${i}">${head}<div class="cards">${routed}</div>` +
           `<p class="empty">no stats: ${esc(r.error)}</p></section>`;
  }
  const st = r.stats, o = st.overlap;
  const cards = [
    card("tokens_per_s", "tokens / s", num(st.tokens_per_s, 1), `${num(st.num_steps)} iterations`),
    card("running", "running · waiting", `${num(st.num_running)} · ${num(st.num_waiting)}`,
         `<span data-metric="running_cpu">${num(st.num_running_cpu)}</span> running on the CPU`),
    card("overlap_recent", "CPU attention hidden", pct(o.recent_hidden_ratio),
         o.recent_hybrid_iterations ? `mean of ${num(o.recent_hybrid_iterations)} hybrid iterations`
                                    : "no hybrid iteration yet"),
    card("overlap_latest", "hidden, latest timeline", pct(o.latest_hidden_ratio),
         st.timeline ? `step ${st.timeline.step_id}` : "no sampled iteration yet"),
    kvCard("accelerator", "KV accelerator", st.kv.accelerator, ""),
    kvCard("cpu", "KV CPU", st.kv.cpu, "cpu"),
    routed,
    card("finished", "finished", num(st.num_finished), `${num(st.num_preemptions)} preempted · ` +
         `${num(st.num_swaps)} swaps`),
  ].join("");
  return `<section class="replica" data-replica="${i}">${head}<div class="cards">${cards}</div>` +
         `<div class="row"><div>${modeTable(st)}</div><div>${timeline(st.timeline)}</div></div></section>`;
}

function render(data) {
  document.getElementById("model").textContent = data.model;
  const root = document.getElementById("replicas");
  root.innerHTML = data.replicas.map(replica).join("");
  // Bar widths through the CSSOM: the page's CSP forbids inline style attributes.
  for (const el of root.querySelectorAll("[data-fill]")) el.style.width = `${(100 * el.dataset.fill).toFixed(1)}%`;
}

async function poll() {
  try {
    const reply = await fetch("dashboard/data", {
      cache: "no-store", headers: apiKey ? { authorization: `Bearer ${apiKey}` } : {},
    });
    if (reply.status === 401) {
      document.getElementById("auth").hidden = false;
      status("API key needed", true);
      return;  // polling resumes once a key is given
    }
    if (!reply.ok) throw new Error(`HTTP ${reply.status}`);
    render(await reply.json());
    status(`updated ${new Date().toLocaleTimeString()}`);
  } catch (err) {
    status(`no data: ${err.message}`, true);
  }
  setTimeout(poll, POLL_MS);
}

document.getElementById("auth").addEventListener("submit", (event) => {
  event.preventDefault();
  apiKey = document.getElementById("key").value.trim();
  sessionStorage.setItem("apex-key", apiKey);
  document.getElementById("auth").hidden = true;
  poll();
});
if (apiKey) sessionStorage.setItem("apex-key", apiKey);
poll();
