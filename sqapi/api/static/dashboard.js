// sqapi's dashboard: keeps the page current without reloading it.
// The overview polls /dashboard/state (with the page's own filters); a message page polls
// GET /messages/<uuid>.  Rows are built with textContent only: nothing from the database is parsed as HTML.
"use strict";

(function () {
  const body = document.body;
  const every = Math.max(1, Number(body.dataset.refresh || 5)) * 1000;

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined) continue;
      if (name === "text") node.textContent = String(value);
      else node.setAttribute(name, String(value));
    }
    for (const child of children || []) node.appendChild(child);
    return node;
  }
  const text = (value) => document.createTextNode(value === null || value === undefined ? "" : String(value));
  const pill = (status, extra) => el("span", {class: "pill " + status + (extra ? " " + extra : ""), text: status});
  const when = (value) => (value ? String(value).slice(0, 19).replace("T", " ") : "");
  const ms = (value) => (value === null || value === undefined ? "" : Number(value).toFixed(1));

  function fill(tbody, rows, columns, empty) {
    if (!tbody) return;
    const fresh = rows.length
      ? rows.map((row) => el("tr", {}, row))
      : [el("tr", {}, [el("td", {colspan: columns, class: "muted", text: empty})])];
    tbody.replaceChildren(...fresh);
  }

  async function poll(url, apply) {
    try {
      const answer = await fetch(url, {headers: {Accept: "application/json"}, credentials: "same-origin",
                                       cache: "no-store"});
      if (answer.status === 401) { window.location.reload(); return; }  // signed out: the login form
      if (answer.ok) {
        apply(await answer.json());
        body.dataset.polled = String(Number(body.dataset.polled || 0) + 1);
      }
    } catch (problem) {
      // the API is restarting or the network is away: try again at the next tick
    }
    window.setTimeout(() => poll(url, apply), every);
  }

  // -- the overview ----------------------------------------------------------------------------
  function applyState(state) {
    const updated = document.getElementById("updated");
    if (updated) updated.textContent = state.now;
    const total = document.getElementById("count-total");
    if (total) total.textContent = state.total;
    for (const [status, n] of Object.entries(state.counts || {})) {
      const count = document.getElementById("count-" + status);
      if (count) count.textContent = n;
    }
    const errors = document.getElementById("errors");
    if (errors) errors.replaceChildren(...(state.errors || []).map((e) => el("div", {class: "banner", text: e})));
    fill(document.getElementById("queue-rows"), (state.queues || []).map((q) => [
      el("td", {}, [el("code", {text: q.name})]), el("td", {text: q.role}),
      el("td", {class: "num", text: q.messages === null ? "not declared" : q.messages}),
      el("td", {class: "num", text: q.consumers === null ? "–" : q.consumers}),
    ]), 4, "This broker has no queues to show.");
    const messages = document.getElementById("message-rows");
    if (messages && !messages.dataset.frozen) {  // a later page stays as it was read: its cursor is fixed
      fill(messages, (state.messages || []).map((m) => [
        el("td", {class: "mono", text: m.updated_at}),
        el("td", {}, [el("a", {class: "uuid", href: m.page}, [el("code", {text: m.uuid})]), el("br"),
                      el("span", {class: "muted", text: m.data_location || ""})]),
        el("td", {}, [pill(m.status)]),
        el("td", {}, m.failed_plugins.flatMap((p) => [pill(p, "failed"), text(" ")])),
        el("td", {class: "reason", text: m.info || ""}),
        el("td", {class: "num", text: m.attempts}),
      ]), 6, "No message matches.");
      const next = document.getElementById("next-page");
      if (next) {
        next.hidden = !state.next;
        next.setAttribute("href", state.next || "#");
      }
    }
    const rate = state.failure_rate || {plugins: []};
    fill(document.getElementById("failure-rate-rows"), rate.plugins.map((p) => [
      el("td", {text: p.plugin}),
      ...p.rates.map((r, i) => {
        const runs = p.runs[i], failed = p.failed[i];
        let kind = "";
        if (r !== null) kind = failed === 0 ? "none" : failed === runs ? "all" : r >= 0.25 ? "many" : "some";
        return el("td", {class: "rate " + kind, title: failed + " of " + runs + " runs failed",
                         text: r === null ? "" : Math.round(r * 100) + "%"});
      }),
    ]), 1, rate.source ? "No plugin ran in these hours." : "Not known: the status database is unavailable.");
  }

  // -- one message -----------------------------------------------------------------------------
  function applyMessage(message) {
    const status = document.getElementById("message-status");
    if (status) { status.textContent = message.status; status.className = "pill " + message.status; }
    const set = (id, value) => { const node = document.getElementById(id); if (node) node.textContent = value; };
    set("message-attempts", message.attempts);
    set("message-info", message.info || "");
    set("message-updated", when(message.updated_at));
    fill(document.getElementById("plugin-rows"), (message.plugins || []).map((p) => [
      el("td", {text: p.plugin}), el("td", {}, [pill(p.status)]), el("td", {class: "num", text: p.attempts}),
      el("td", {class: "num", text: ms(p.duration_ms)}), el("td", {class: "reason", text: p.info || ""}),
      el("td", {}, p.result === null || p.result === undefined ? []
                   : [el("pre", {class: "result mono", text: JSON.stringify(p.result)})]),
      el("td", {class: "mono", text: when(p.updated_at)}),
    ]), 7, "No plugin has run on this message.");
    if (Array.isArray(message.history)) {
      fill(document.getElementById("history-rows"), message.history.map((e) => [
        el("td", {class: "mono", text: when(e.at)}), el("td", {class: "num", text: e.attempt}),
        e.plugin ? el("td", {text: e.plugin}) : el("td", {}, [el("span", {class: "muted", text: "the message"})]),
        el("td", {}, [pill(e.status)]),
        el("td", {class: "num", text: ms(e.duration_ms)}), el("td", {class: "reason", text: e.info || ""}),
        el("td", {class: "muted", text: e.loader || ""}),
      ]), 7, "No events recorded.");
    }
  }

  if (body.dataset.page === "overview" && body.dataset.stateUrl) {
    window.setTimeout(() => poll(body.dataset.stateUrl + window.location.search, applyState), every);
  } else if (body.dataset.page === "message" && body.dataset.messageUrl) {
    window.setTimeout(() => poll(body.dataset.messageUrl, applyMessage), every);
  }
})();
