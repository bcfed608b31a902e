// The edgefed dashboard: an MQTT client over WebSockets that reads the JSON copies the
// aggregator keeps retained (metrics/json, status/<device>/json) and draws them live.
"use strict";

const devices = new Map();
const evaluations = [[], [], []]; // seconds, loss, accuracy
let chart = null;

function text(id, value) {
  document.getElementById(id).textContent = value;
}

function fixed(value, digits) {
  return value === null || value === undefined ? "-" : Number(value).toFixed(digits);
}

function bytes(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function makeChart() {
  const element = document.getElementById("eval-chart");
  return new uPlot({
    width: Math.max(320, element.clientWidth), height: 240,
    series: [
      {},
      { label: "eval loss", stroke: "#c05621", scale: "loss" },
      { label: "accuracy", stroke: "#2f855a", scale: "accuracy" },
    ],
    axes: [{}, { scale: "loss" }, { scale: "accuracy", side: 1 }],
    scales: { x: { time: true } },
  }, evaluations, element);
}

function onMetrics(metrics) {
  text("version", metrics.version);
  if (metrics.eval_loss !== null) {
    text("loss", fixed(metrics.eval_loss, 4));
    text("accuracy", fixed(metrics.eval_accuracy, 3));
    evaluations[0].push(Date.now() / 1000);
    evaluations[1].push(metrics.eval_loss);
    evaluations[2].push(metrics.eval_accuracy);
    chart.setData(evaluations);
  }
  text("bytes", `${bytes(metrics.bytes_received || 0)} / ${bytes(metrics.bytes_sent || 0)}`);
  drawStaleness(metrics.staleness || {});
  const reasons = Object.entries(metrics.rejected_by_reason || {});
  const list = document.getElementById("rejections");
  list.replaceChildren(...(reasons.length ? reasons : [["none so far", ""]]).map(([reason, n]) => {
    const item = document.createElement("li");
    item.textContent = n === "" ? reason : `${reason}: ${n}`;
    return item;
  }));
}

function drawStaleness(counts) {
  const box = document.getElementById("staleness");
  const most = Math.max(1, ...Object.values(counts));
  box.replaceChildren(...Object.entries(counts).map(([staleness, n]) => {
    const row = document.createElement("div");
    row.innerHTML = `${staleness.padStart(3)} <span class="bar" style="width:${(200 * n) / most}px"></span> ${n}`;
    return row;
  }));
}

function onStatus(status) {
  devices.set(status.client_id, status);
  const rows = [...devices.values()].sort((a, b) => a.client_id.localeCompare(b.client_id));
  const body = document.querySelector("#devices tbody");
  body.replaceChildren(...rows.map((device) => {
    const row = document.createElement("tr");
    row.dataset.state = device.state;
    row.dataset.device = device.client_id;
    const plan = device.plan
      ? `${device.plan.batch_size ?? "?"}x${device.plan.seq_len ?? "?"}, ${fixed(device.plan.estimate_mb, 0)} of ${fixed(device.plan.budget_mb, 0)} MiB`
      : "-";
    const cells = [
      device.client_id, device.state, device.method || (device.plan && device.plan.method) || "-",
      plan, device.base_version ?? "-", device.updates_sent, device.accepted ?? 0,
      device.rejected ?? 0, new Date(device.heartbeat_at * 1000).toLocaleTimeString(),
    ];
    for (const value of cells) {
      const cell = document.createElement("td");
      cell.textContent = value;
      row.append(cell);
    }
    return row;
  }));
  text("online", rows.filter((device) => device.state !== "offline").length);
}

async function start() {
  const config = await (await fetch("config.json")).json();
  text("federation", config.federation);
  chart = makeChart();
  const client = mqtt.connect(config.ws_url, {
    protocolVersion: 4,
    clean: true,
    clientId: `edgefed-dashboard-${Math.random().toString(16).slice(2, 10)}`,
    reconnectPeriod: 2000,
  });
  const base = `edgefed/${config.federation}`;
  const connection = document.getElementById("connection");
  client.on("connect", () => {
    connection.dataset.state = "connected";
    connection.textContent = `connected to ${config.ws_url}`;
    client.subscribe([`${base}/metrics/json`, `${base}/status/+/json`], { qos: 1 });
  });
  client.on("offline", () => {
    connection.dataset.state = "offline";
    connection.textContent = `${config.ws_url} unreachable, retrying`;
  });
  client.on("message", (topic, payload) => {
    if (payload.length === 0) return; // a deleted retained message
    const message = JSON.parse(new TextDecoder().decode(payload));
    if (topic === `${base}/metrics/json`) onMetrics(message);
    else onStatus(message);
  });
}

start();
