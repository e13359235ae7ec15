// The portal's few behaviours: parts of a page that refresh themselves, buttons that post
// an action (asking first when it stops instances) and follow its progress, logs that
// follow. Every change is a POST with the token in a header: see rolehost/portal/guard.py.
"use strict";
const TOKEN = document.querySelector('meta[name="rolehost-token"]').content;
const POLL_MS = 1000;

function poll(el) {
  const tick = async () => {
    if (!document.hidden) {
      try {
        const response = await fetch(el.dataset.poll, {credentials: "same-origin"});
        const html = await response.text();
        if (html !== el.dataset.last) { el.innerHTML = html; el.dataset.last = html; }
      } catch (e) { /* the portal is gone: try again */ }
    }
    setTimeout(tick, POLL_MS);
  };
  setTimeout(tick, POLL_MS);
}

function say(lines, failure) {
  const out = document.getElementById("output");
  for (const line of lines) out.append(line + "\n");
  if (failure) {
    const span = document.createElement("span");
    span.className = "failure";
    span.textContent = "rolehost: " + failure + "\n";
    out.append(span);
  }
}

async function follow(how) {
  let since = how.since;
  const base = how.kind === "walk" ? "/follow/walk?" :
    "/follow/instances?names=" + encodeURIComponent(how.names.join(",")) +
    "&slot=" + encodeURIComponent(how.slot || "production") + "&";
  for (;;) {
    const response = await fetch(base + "since=" + since, {credentials: "same-origin"});
    const answer = await response.json();
    say(answer.lines, answer.failure);
    since = answer.since;
    if (answer.done) return;
    await new Promise(resolve => setTimeout(resolve, 300));
  }
}

function formValues(id) {
  const values = {};
  const form = id && document.getElementById(id);
  if (!form) return values;
  for (const input of form.querySelectorAll("input, select")) {
    values[input.name] = input.type === "checkbox" ? input.checked : input.value;
  }
  return values;
}

async function act(button) {
  if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) return;
  const body = formValues(button.dataset.form);
  if (button.dataset.instance) body.instance = button.dataset.instance;
  if (button.dataset.slot) body.slot = button.dataset.slot;
  const response = await fetch(button.dataset.act, {
    method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json", "X-Rolehost-Token": TOKEN},
    body: JSON.stringify(body),
  });
  const answer = await response.json();
  say(answer.lines, answer.failure);
  if (answer.follow) await follow(answer.follow);
}

async function followLog(el) {
  let offset = "";
  for (;;) {
    try {
      const response = await fetch(el.dataset.follow + (el.dataset.follow.includes("?") ? "&" : "?")
        + "offset=" + offset, {credentials: "same-origin"});
      const answer = await response.json();
      for (const line of answer.lines) el.append(line + "\n");
      offset = answer.offset;
      if (answer.lines.length) window.scrollTo(0, document.body.scrollHeight);
    } catch (e) { /* try again */ }
    await new Promise(resolve => setTimeout(resolve, POLL_MS));
  }
}

document.addEventListener("click", event => {
  const button = event.target.closest("button[data-act]");
  if (!button) return;
  event.preventDefault();
  act(button);
});
document.querySelectorAll("[data-poll]").forEach(poll);
document.querySelectorAll("[data-follow]").forEach(followLog);
