// The operator console: fills the server-rendered page from the grid's snapshots.
// Every value goes in as text (textContent), never as HTML: ids come from the network.
"use strict";

(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const byId = (id) => document.getElementById(id);
  const kw = (value) => (value === null || value === undefined ? "–" : Number(value).toFixed(1));
  let latest = null;
  let lastUpdate = 0;

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  // Sets text only when it changed: with 1,000 rows most cells stay as they are.
  function setText(node, text) {
    const value = text === null || text === undefined ? "–" : String(text);
    if (node.textContent !== value) node.textContent = value;
  }

  function renderGrid(grid) {
    setText(byId("grid-limit"), kw(grid.limit_kw) + " kW");
    setText(byId("grid-allocated"), kw(grid.allocated_kw) + " kW");
    setText(byId("grid-requested"), kw(grid.requested_kw) + " kW");
    setText(byId("grid-headroom"), kw(grid.headroom_kw) + " kW");
    setText(byId("grid-up"), grid.substations_up + " of " + grid.substations);
    setText(byId("grid-queue"), grid.queued_requests);
    const meter = byId("grid-meter");
    meter.value = grid.limit_kw > 0 ? Math.min(1, grid.allocated_kw / grid.limit_kw) : 0;
  }

  const cards = new Map();

  function makeCard(id) {
    const card = el("article", null, "card");
    card.dataset.substation = id;
    card.append(el("h3", id));
    const list = el("dl");
    const fields = {};
    for (const [key, label] of [["limit", "Limit"], ["source", "Limit set by"], ["allocated", "Allocated / requested"],
      ["fair", "Fair-share level"], ["policy", "Policy"], ["states", "Sessions"], ["peers", "Peer flows out / in"],
      ["health", "Health"], ["age", "Last poll"]]) {
      const row = el("div");
      row.append(el("dt", label));
      fields[key] = el("dd");
      row.append(fields[key]);
      list.append(row);
    }
    card.append(list);
    const form = el("div", null, "actions");
    const inputId = "limit-" + id;
    const label = el("label", "New limit (kW) for " + id);
    label.htmlFor = inputId;
    const input = el("input");
    input.id = inputId;
    input.type = "number";
    input.min = "0";
    input.step = "any";
    const set = el("button", "Set limit");
    set.type = "button";
    set.addEventListener("click", () => {
      const value = Number(input.value);
      if (input.value === "" || !(value >= 0)) {
        say("Enter a limit of at least 0 kW for " + id + " first.");
        input.focus();
        return;
      }
      act("Set the limit of " + id + " to " + value + " kW?", "/console/actions/limit",
        { substation: id, limit_kw: value });
    });
    const clear = el("button", "Clear limit");
    clear.type = "button";
    clear.addEventListener("click", () => act("Clear the operator limit of " + id + "?", "/console/actions/limit",
      { substation: id, limit_kw: null }));
    const policyId = "policy-" + id;
    const policyLabel = el("label", "Allocation policy of " + id);
    policyLabel.htmlFor = policyId;
    const policy = el("select");
    policy.id = policyId;
    for (const name of ["deadline", "fair_share", "strict"]) {
      const option = el("option", name);
      option.value = name;
      policy.append(option);
    }
    const switchPolicy = el("button", "Switch policy");
    switchPolicy.type = "button";
    switchPolicy.addEventListener("click", () => act("Switch " + id + " to the " + policy.value + " policy?",
      "/console/actions/policy", { substation: id, policy: policy.value }));
    form.append(label, input, set, clear, policyLabel, policy, switchPolicy);
    card.append(form);
    return { card, fields };
  }

  function renderSubstations(list) {
    const holder = byId("substations");
    const seen = new Set();
    for (const sub of list) {
      seen.add(sub.id);
      let entry = cards.get(sub.id);
      if (!entry) {
        entry = makeCard(sub.id);
        cards.set(sub.id, entry);
        holder.append(entry.card);
        entry.card.querySelector("select").value = sub.policy;
      }
      const f = entry.fields;
      const operator = sub.operator_limit_kw === null || sub.operator_limit_kw === undefined ? ""
        : " (operator limit " + kw(sub.operator_limit_kw) + " kW)";
      setText(f.limit, kw(sub.limit_kw) + " kW" + operator);
      setText(f.source, sub.limit_source);
      setText(f.allocated, kw(sub.allocated_kw) + " / " + kw(sub.requested_kw) + " kW");
      setText(f.fair, sub.fair_share_kw === null ? "none (everyone gets what they ask)" : kw(sub.fair_share_kw) + " kW");
      setText(f.policy, sub.policy);
      const states = Object.entries(sub.sessions_by_state).map(([state, n]) => n + " " + state);
      setText(f.states, states.length ? states.join(", ") : "none");
      setText(f.peers, sub.peering ? kw(sub.peering.out_kw) + " / " + kw(sub.peering.in_kw) + " kW ("
        + sub.peering.state + ")" : "not peering");
      const problems = Object.entries(sub.errors).map(([part, why]) => part + ": " + why);
      setText(f.health, sub.up ? "up" : "down" + (problems.length ? " (" + problems.join("; ") + ")" : ""));
      setText(f.age, sub.poll_age_seconds === null ? "never polled" : sub.poll_age_seconds.toFixed(1) + " s ago");
      entry.card.classList.toggle("stale", sub.stale);
      entry.card.setAttribute("aria-label", sub.id + (sub.stale ? " (stale)" : ""));
    }
    for (const [id, entry] of cards) {
      if (!seen.has(id)) {
        entry.card.remove();
        cards.delete(id);
      }
    }
  }

  const rows = new Map();

  function makeRow(session) {
    const row = el("tr");
    const cells = [];
    for (let i = 0; i < 7; i++) {
      const cell = el(i === 0 ? "th" : "td");
      if (i === 0) cell.scope = "row";
      cells.push(cell);
      row.append(cell);
    }
    const stop = el("button", "Stop");
    stop.type = "button";
    stop.setAttribute("aria-label", "Stop session of " + session.vehicle_id);
    stop.addEventListener("click", () => act("Stop the session of vehicle " + session.vehicle_id + " at "
      + session.substation + "?", "/console/actions/stop",
      { substation: session.substation, session_id: session.session_id }));
    const action = el("td");
    action.append(stop);
    row.append(action);
    row.dataset.session = session.session_id;
    return { row, cells };
  }

  function renderSessions(list) {
    const body = byId("sessions");
    const seen = new Set();
    let previous = null;
    for (const s of list) {
      seen.add(s.session_id);
      let entry = rows.get(s.session_id);
      if (!entry) {
        entry = makeRow(s);
        rows.set(s.session_id, entry);
      }
      const c = entry.cells;
      setText(c[0], s.vehicle_id);
      setText(c[1], s.station_id);
      setText(c[2], s.substation);
      setText(c[3], kw(s.allocated_kw) + " / " + kw(s.amount_kw));
      setText(c[4], s.energy_kwh === null ? null : Number(s.energy_kwh).toFixed(3));
      setText(c[5], s.state);
      setText(c[6], s.limited_reason);
      entry.row.dataset.limitedBy = s.limited_by;
      // Keep the server's order, moving a row only when it is out of place.
      const expected = previous ? previous.nextSibling : body.firstChild;
      if (expected !== entry.row) body.insertBefore(entry.row, expected);
      previous = entry.row;
    }
    for (const [id, entry] of rows) {
      if (!seen.has(id)) {
        entry.row.remove();
        rows.delete(id);
      }
    }
    setText(byId("session-count"), "(" + list.length + ")");
  }

  function replaceRows(body, items, cellsOf) {
    const fresh = items.map((item) => {
      const row = el("tr");
      cellsOf(item).forEach((text, i) => {
        const cell = el(i === 0 ? "th" : "td", text);
        if (i === 0) cell.scope = "row";
        row.append(cell);
      });
      return row;
    });
    body.replaceChildren(...fresh);
  }

  function renderBalancers(list) {
    replaceRows(byId("balancers"), list, (b) => [
      b.url, b.up ? "yes" : "no (" + b.error + ")", b.policy, b.recent_routed + " / " + b.routed,
      Object.entries(b.recent_by_substation).map(([sub, n]) => sub + ": " + n).join(", ") || "–",
      b.recent_hedges + " (" + b.recent_hedges_won + ")", b.recent_forward_failures,
    ]);
  }

  function renderStations(stations) {
    setText(byId("stations-note"), !stations.configured ? "No gateway configured (set GATEWAY_URL)."
      : stations.error ? "The gateway " + stations.error + "." : stations.stations.length + " station(s).");
    replaceRows(byId("stations"), stations.stations, (s) => [
      s.station_id, s.online ? "online" : "offline", s.charging ? "yes" : "no", s.last_seen || "never",
      kw(s.measured_kw) + " / " + kw(s.allocated_kw),
    ]);
  }

  function renderClientKeys(keys) {
    replaceRows(byId("client-keys"), keys || [], (k) => [
      k.key_id, k.name, k.sessions + " / " + k.quotas.sessions, kw(k.kw) + " / " + kw(k.quotas.kw),
      k.queued + " / " + k.quotas.queued,
      Object.entries(k.refusals).map(([reason, count]) => reason + ": " + count).join(", ") || "none",
    ]);
  }

  function renderAlerts(alerts) {
    setText(byId("alerts-note"), !alerts.configured ? "No Prometheus configured (set PROMETHEUS_URL)."
      : alerts.error ? "Prometheus " + alerts.error + "." : alerts.alerts.length ? "" : "No alerts.");
    const items = alerts.alerts.map((a) => el("li", a.state + ": " + a.name + (a.severity ? " [" + a.severity + "]" : "")
      + (a.summary ? ": " + a.summary : "") + " (since " + a.active_at + ")"));
    byId("alerts").replaceChildren(...items);
  }

  function render(snapshot) {
    performance.mark("console-render-start");
    latest = snapshot;
    renderGrid(snapshot.grid);
    renderSubstations(snapshot.substations);
    renderBalancers(snapshot.balancers);
    renderSessions(snapshot.sessions);
    renderStations(snapshot.stations);
    renderAlerts(snapshot.alerts);
    renderClientKeys(snapshot.client_keys);
    lastUpdate = Date.now();
    setText(byId("live"), "Live: updated " + new Date(snapshot.taken_at * 1000).toLocaleTimeString());
    performance.measure("console-render", "console-render-start");
  }

  function say(text) {
    setText(byId("outcome"), text);
  }

  // Every action asks first; the dialog is modal, so the keyboard stays in it until answered.
  function act(question, path, body) {
    const dialog = byId("confirm");
    const opener = document.activeElement;
    setText(byId("confirm-text"), question);
    dialog.returnValue = "";
    dialog.addEventListener("close", async function answered() {
      dialog.removeEventListener("close", answered);
      if (opener && opener.isConnected) opener.focus();
      if (dialog.returnValue !== "ok") {
        say("Cancelled.");
        return;
      }
      try {
        const response = await fetch(path, {
          method: "POST",
          headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
          body: JSON.stringify(body),
          credentials: "same-origin",
        });
        const answer = await response.json();
        say(response.ok ? "Done: " + question.replace(/\?$/, "") + "."
          : "Refused (" + response.status + "): " + (answer.message || answer.error));
      } catch (error) {
        say("The action could not be sent: " + error.message + ". Check the connection and retry.");
      }
    });
    dialog.showModal();
    byId("confirm-cancel").focus();
  }

  async function firstSnapshot() {
    const response = await fetch("/console/snapshot", { credentials: "same-origin" });
    if (response.status === 401) {
      window.location.assign("/console/");
      return;
    }
    if (response.ok) render(await response.json());
  }

  function follow() {
    const source = new EventSource("/console/events");
    source.addEventListener("snapshot", (event) => render(JSON.parse(event.data)));
    source.addEventListener("error", () => {
      setText(byId("live"), "Connection lost; reconnecting…");
    });
  }

  // Stale when nothing came for 10 s: the page says so rather than showing old figures as live.
  setInterval(() => {
    const stale = latest !== null && Date.now() - lastUpdate > 10000;
    document.body.classList.toggle("stale", stale);
    if (stale) setText(byId("live"), "No update for " + Math.round((Date.now() - lastUpdate) / 1000) + " s");
  }, 1000);

  firstSnapshot().then(follow, follow);
})();
