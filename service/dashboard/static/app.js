// MergeShield dashboard: live progress (polling the REST API) and uploads with a progress bar.
// Everything works without it except uploads; it only reads the same JSON the API serves.
"use strict";

const FINISHED = new Set(["succeeded", "failed", "cancelled"]);
const POLL_MS = 2000;

function setState(root, scan) {
  const state = root.querySelector('[data-field="state"]');
  if (state) {
    state.textContent = scan.state;
    state.className = "state state-" + scan.state;
  }
  const bar = root.querySelector('[data-field="progress"]');
  if (bar) { bar.value = scan.percent; bar.textContent = scan.percent + "%"; }
  const pct = root.querySelector('[data-field="percent"]');
  if (pct) pct.textContent = Math.round(scan.percent) + "%";
  const stage = root.querySelector('[data-field="stage"]');
  if (stage) stage.textContent = scan.stage || "";
  const verdict = root.querySelector('[data-field="verdict"]');
  if (verdict && scan.verdict) {
    const tag = document.createElement("span");
    tag.className = "verdict-tag v-" + scan.verdict;
    tag.textContent = scan.verdict.replace(/_/g, " ") + (scan.severity ? " · " + scan.severity : "");
    verdict.replaceChildren(tag);
  }
  root.dataset.state = scan.state;
}

async function getJSON(url) {
  const r = await fetch(url, {credentials: "same-origin", headers: {Accept: "application/json"}});
  if (!r.ok) throw new Error(url + ": HTTP " + r.status);
  return r.json();
}

// The scan list: while any shown scan is unfinished, refresh the shown rows.
function pollList(table) {
  const tick = async () => {
    const rows = table.querySelectorAll("tr[data-scan]");
    if (![...rows].some((r) => !FINISHED.has(r.dataset.state))) return;
    try {
      const page = await getJSON(table.dataset.pollList);
      for (const scan of page.items) {
        const row = table.querySelector('tr[data-scan="' + scan.id + '"]');
        if (row) setState(row, scan);
      }
    } catch (e) { /* the next tick tries again */ }
    setTimeout(tick, POLL_MS);
  };
  setTimeout(tick, POLL_MS);
}

// One scan: follow its progress; reload when it finishes, to show the report.
function pollScan(head) {
  const tick = async () => {
    try {
      const scan = await getJSON(head.dataset.pollScan);
      setState(head, scan);
      if (FINISHED.has(scan.state)) { location.reload(); return; }
    } catch (e) { /* the next tick tries again */ }
    setTimeout(tick, POLL_MS);
  };
  if (!FINISHED.has(head.dataset.state)) setTimeout(tick, POLL_MS);
}

// An upload field: the chosen or dropped file goes to /v1/uploads; its id fills the form.
function uploader(box, form) {
  const input = box.querySelector("[data-file]");
  const drop = box.querySelector("[data-drop]");
  const bar = box.querySelector("[data-upload-progress]");
  const status = box.querySelector("[data-upload-status]");
  const hidden = box.querySelector("[data-upload-id]");
  const send = (file) => {
    const body = new FormData();
    body.append("file", file, file.name);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/v1/uploads");
    xhr.responseType = "json";
    bar.hidden = false;
    bar.value = 0;
    hidden.value = "";
    form.dataset.uploading = String(Number(form.dataset.uploading || 0) + 1);
    status.textContent = "Uploading " + file.name + "…";
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) bar.value = Math.round((100 * e.loaded) / e.total);
    };
    const done = () => {
      form.dataset.uploading = String(Number(form.dataset.uploading) - 1);
    };
    xhr.onload = () => {
      done();
      const r = xhr.response || {};
      if (xhr.status === 201) {
        bar.value = 100;
        hidden.value = r.id;
        status.textContent = "Uploaded " + r.filename + " (" + r.size.toLocaleString() +
          " bytes, sha256 " + r.sha256.slice(0, 12) + "…).";
        box.dataset.uploaded = r.id;
      } else {
        status.textContent = "Upload failed: " + ((r.error && r.error.message) || "HTTP " + xhr.status);
      }
    };
    xhr.onerror = () => { done(); status.textContent = "Upload failed: the connection broke."; };
    xhr.send(body);
  };
  input.addEventListener("change", () => { if (input.files.length) send(input.files[0]); });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) send(e.dataTransfer.files[0]);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-poll-list]").forEach(pollList);
  document.querySelectorAll("[data-poll-scan]").forEach(pollScan);
  const form = document.querySelector("[data-scan-form]");
  if (form) {
    form.querySelectorAll("[data-upload]").forEach((box) => uploader(box, form));
    form.addEventListener("submit", (e) => {
      if (Number(form.dataset.uploading || 0) > 0) {
        e.preventDefault();
        alert("Wait until the upload has finished.");
      }
    });
  }
});
