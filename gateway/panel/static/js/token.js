// One token: its settings (every writable field), deleting it, and its logs, newest last.
import {call, withData} from "./api.js";
import {button, fill, h} from "./dom.js";
import {EVENTS, lifetime, typeName, when} from "./format.js";
import {submitFields, tokenFields} from "./form.js";
import {deniedBox, fail, go, say} from "./ui.js";

const REFRESH_MS = 3000;
const LOG_COUNT = 200;

function tabs(id, current) {
  const tab = (name, href, text) => h("a", {href, class: "tab", "aria-current": current === name ? "page" : null,
    id: `tab-${name}`}, text);
  return h("nav", {class: "tabs", "aria-label": `Token ${id}`},
    tab("settings", `#/tokens/${id}`, "Settings"), tab("logs", `#/tokens/${id}/logs`, "Logs"));
}

export async function tokenView(root, id, which) {
  const title = h("h1", {}, `Token ${id}`);
  fill(root, title, tabs(id, which), h("p", {class: "loading"}, "Loading…"));
  if (which === "logs") return logsView(root, id, title);
  let token;
  try {
    [token] = await call("GET", `/platform/tokens/${id}`);
  } catch (error) {
    fill(root, title, tabs(id, which), deniedBox(error));
    return null;
  }
  if (!token) {
    fill(root, title, tabs(id, which), h("p", {class: "denied"}, `There is no token ${id} in this account.`));
    return null;
  }
  settingsView(root, token, title);
  return null;
}

function settingsView(root, token, title) {
  const fields = tokenFields(token);
  const facts = h("p", {class: "hint"}, `${typeName(token.access)} token in account ${token.cid}; created `
    + `${when(token.created)}; last used ${when(token.accessed)}; ${lifetime(token)}.`);
  const confirmBox = h("div", {class: "confirm", hidden: true},
    h("p", {}, `Delete token ${token.id}? It goes to the recycle bin, from where it can be restored.`),
    button("Yes, delete", () => remove(token.id), {class: "danger", id: "confirm-delete"}),
    button("Keep it", () => { confirmBox.hidden = true; deleteButton.focus(); }, {id: "cancel-delete"}));
  const deleteButton = button("Delete token", () => {
    confirmBox.hidden = false;
    confirmBox.querySelector("button").focus();
  }, {class: "danger", id: "delete-token"});
  const form = h("form", {class: "card token-form"}, facts, fields.element,
    h("div", {class: "actions"}, h("button", {type: "submit", class: "primary", id: "save-token"}, "Save"),
      h("a", {href: "#/tokens", class: "button"}, "Back to the list"), deleteButton), confirmBox);
  submitFields(form, fields, fail, async (body) => {
    try {
      const [saved] = await call("PUT", `/platform/tokens/${token.id}`, {body});
      Object.assign(token, saved);
      facts.textContent = `${typeName(saved.access)} token in account ${saved.cid}; saved; ${lifetime(saved)}.`;
      say(`Token ${token.id} saved.`);
    } catch (error) {
      fail(error);
    }
  });
  fill(root, title, tabs(token.id, "settings"), form);
}

async function remove(id) {
  try {
    await call("DELETE", `/platform/tokens/${id}`);
  } catch (error) {
    fail(error);
    return;
  }
  go("#/tokens", `Token ${id} deleted: it is in the recycle bin.`);
}

function logRow(record) {
  const request = record.event_code === 1000;
  const what = request ? `${record.method} ${record.uri}` : "";
  return h("tr", {},
    h("td", {}, when(Math.floor(record.timestamp || 0))),
    h("td", {}, `${record.event_code} ${EVENTS[record.event_code] || ""}`.trim()),
    h("td", {class: "uri"}, what),
    h("td", {class: "num"}, request ? String(record.status) : ""),
    h("td", {}, record.host || (record.by_token_id ? `by token ${record.by_token_id}` : "")),
    h("td", {class: "num"}, request ? `${Math.round((record.duration || 0) * 1000)} ms` : ""),
    h("td", {}, record.app || ""));
}

/** The token's logs, oldest first so the newest is last, read again every few seconds. */
function logsView(root, id, title) {
  const body = h("tbody");
  const updated = h("p", {class: "hint", id: "logs-updated"});
  const table = h("table", {class: "list logs", id: "token-logs"},
    h("caption", {class: "visually-hidden"}, `Logs of token ${id}, newest last`),
    h("thead", {}, h("tr", {}, ["Time", "Event", "Request / event", "Status", "From", "Duration", "App"].map(
      (name) => h("th", {scope: "col"}, name)))), body);
  const area = h("div", {class: "scroll"}, table);
  const pause = h("button", {type: "button", id: "logs-pause", "aria-pressed": "false"}, "Pause");
  fill(root, title, tabs(id, "logs"),
    h("div", {class: "toolbar"}, pause, updated), area);
  let timer = null;
  let seen = -1;
  let paused = false;
  let loading = false;
  const load = async () => {
    timer = null;
    loading = true;
    try {
      const records = await call("GET", withData(`/platform/tokens/${id}/logs`, {count: LOG_COUNT}));
      if (!root.isConnected) return;
      if (records.length !== seen || records.length === LOG_COUNT) {
        const atEnd = area.scrollTop + area.clientHeight >= area.scrollHeight - 8;
        fill(body, records.length ? records.map(logRow)
          : h("tr", {}, h("td", {colspan: 7, class: "empty"}, "No log records yet.")));
        if (atEnd) area.scrollTop = area.scrollHeight;
        seen = records.length;
      }
      updated.textContent = `${records.length} records · updated ${when(Math.floor(Date.now() / 1000))}`
        + ` · refreshing every ${REFRESH_MS / 1000} s`;
    } catch (error) {
      if (!root.isConnected) return;
      fill(area, deniedBox(error));
      return;
    } finally {
      loading = false;
    }
    if (!paused && root.isConnected) timer = setTimeout(load, REFRESH_MS);
  };
  pause.addEventListener("click", () => {
    paused = !paused;
    pause.setAttribute("aria-pressed", String(paused));
    pause.textContent = paused ? "Resume" : "Pause";
    if (!paused && timer === null && !loading) load();
    else if (paused && timer !== null) {
      clearTimeout(timer);
      timer = null;
    }
  });
  load();
  return () => {
    if (timer !== null) clearTimeout(timer);
    paused = true;
  };
}
