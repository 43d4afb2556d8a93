// The Cumulus dashboard: live jobs, workers and one job's history and output.
// Every text from a job (its id, its output, error messages) is set with textContent or as a
// text node, never as HTML: a job's output is user data.
"use strict";

// Set once per page load: a reload would make a new one (the tests check it stays the same).
window.cumulusPageId = String(Date.now()) + "-" + String(Math.random()).slice(2);

const MAX_LOG_LINES = 5000;
const state = { jobs: [], selected: null, jobStream: null };

function el(tag, className, ...children) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function clock(ts) {
  return ts ? new Date(ts * 1000).toLocaleTimeString() : "";
}

function showJobs(jobs) {
  state.jobs = jobs;
  const body = document.querySelector("#jobs tbody");
  const rows = jobs.map((job) => {
    const queue = job.queue_position == null ? "" : "#" + job.queue_position + " ";
    const error = job.error_code ? job.error_code + ": " + job.error_message : "";
    const row = el(
      "tr", job.job_id === state.selected ? "selected" : "",
      el("td", "", el("code", "", job.job_id)),
      el("td", "state state-" + job.status, job.status),
      el("td", "", job.gpu),
      el("td", "", job.worker_id),
      el("td", "", (job.devices || []).join(", ")),
      el("td", "reason", queue + (job.waiting_reason || "") + error),
      el("td", "", clock(job.submitted_at)),
      el("td", "", clock(job.started_at)),
      el("td", "", clock(job.finished_at)),
    );
    row.dataset.jobId = job.job_id;
    row.dataset.state = job.status;
    row.addEventListener("click", () => select(job.job_id));
    return row;
  });
  body.replaceChildren(...rows);
  document.getElementById("no-jobs").hidden = jobs.length > 0;
}

function deviceLine(device) {
  const used = Math.round(parseFloat(device.allocated || "0") * 10);
  const bar = el("div", "bar");
  for (let i = 0; i < 10; i++) bar.append(el("span", i < used ? "tenth used" : "tenth"));
  const jobs = Object.keys(device.jobs || {}).length;
  const line = el(
    "div", "device",
    el("span", "", "GPU " + device.index),
    bar,
    el("span", "", used + "/10 · " + jobs + (jobs === 1 ? " job" : " jobs")),
  );
  line.title = device.name + " (" + device.kind + ")";
  line.dataset.tenths = String(used);
  return line;
}

function showWorkers(listing) {
  const boxes = (listing.workers || []).map((worker) => {
    const status = worker.status === "ready" ? "" : " " + worker.status;
    const box = el(
      "div", "worker",
      el("strong", "", worker.worker_id),
      el("span", "muted", " " + worker.backend),
      el("span", "down", status + (worker.down_reason ? ": " + worker.down_reason : "")),
      ...(worker.devices || []).map(deviceLine),
    );
    box.dataset.workerId = worker.worker_id;
    return box;
  });
  document.getElementById("workers").replaceChildren(...boxes);
  document.getElementById("queued").textContent =
    listing.queued ? listing.queued + " job(s) queued" : "";
}

function showStatus(status) {
  const live = document.getElementById("live");
  live.className = status.ok ? "on" : "off";
  live.textContent = status.ok ? "live" : status.message;
  if (status.user) document.getElementById("who").textContent = "user " + status.user;
}

function details(values) {
  return Object.entries(values)
    .filter(([, v]) => v !== "" && v !== 0 && !(Array.isArray(v) && v.length === 0))
    .map(([k, v]) => k + "=" + (Array.isArray(v) ? v.join(",") : v))
    .join("  ");
}

function addEvent(event) {
  const item = el(
    "li", "",
    el("span", "muted", clock(event.ts) + " "),
    el("span", "name", event.name),
    " " + (event.worker_id ? "on " + event.worker_id + "  " : "") + details(event.details),
  );
  item.dataset.name = event.name;
  document.getElementById("history").append(item);
}

function addLines(log) {
  const pane = document.getElementById("logs");
  const atEnd = pane.scrollTop + pane.clientHeight >= pane.scrollHeight - 4;
  for (const [stream, text] of log.lines) {
    pane.append(el("div", stream === "stderr" ? "stderr" : "", text));
  }
  while (pane.childElementCount > MAX_LOG_LINES) pane.firstElementChild.remove();
  if (atEnd) pane.scrollTop = pane.scrollHeight;
}

function select(jobId) {
  if (state.jobStream) state.jobStream.close();
  state.selected = jobId;
  for (const row of document.querySelectorAll("#jobs tbody tr")) {
    row.classList.toggle("selected", row.dataset.jobId === jobId);
  }
  document.getElementById("selected").textContent = jobId;
  document.getElementById("history").replaceChildren();
  document.getElementById("logs").replaceChildren();
  document.getElementById("problem").textContent = "";
  const section = document.getElementById("job-section");
  section.dataset.ended = "";
  const stream = new EventSource("/api/jobs/" + encodeURIComponent(jobId) + "/events");
  state.jobStream = stream;
  const parse = (handler) => (message) => {
    if (state.jobStream === stream) handler(JSON.parse(message.data));
  };
  stream.addEventListener("event", parse(addEvent));
  stream.addEventListener("log", parse(addLines));
  stream.addEventListener("problem", parse((p) => {
    document.getElementById("problem").textContent = p.code + ": " + p.message;
  }));
  stream.addEventListener("end", () => {
    stream.close();
    section.dataset.ended = "1";
  });
}

function connect() {
  const stream = new EventSource("/api/events");
  const on = (name, handler) =>
    stream.addEventListener(name, (message) => handler(JSON.parse(message.data)));
  on("jobs", showJobs);
  on("workers", showWorkers);
  on("status", showStatus);
  stream.onerror = () => showStatus({ ok: false, message: "reconnecting" });
}

connect();
