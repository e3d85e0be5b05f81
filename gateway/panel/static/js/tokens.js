// The token list of the acting account, with search and an enabled switch per token.
import {call} from "./api.js";
import {fill, h} from "./dom.js";
import {lifetime, typeName, when} from "./format.js";
import {accountName, deniedBox, fail, say} from "./ui.js";
import {session} from "./session.js";

const FIELDS = "id,info,enabled,access,expire,ttl,accessed,cid";

function matches(token, words) {
  const text = `${token.id} ${token.info} ${typeName(token.access)}`.toLowerCase();
  return words.every((word) => text.includes(word));
}

export async function tokensView(root) {
  const title = h("h1", {}, "Tokens");
  fill(root, title, h("p", {class: "loading"}, "Loading…"));
  let tokens;
  try {
    tokens = await call("GET", `/platform/tokens?fields=${FIELDS}`);
  } catch (error) {
    fill(root, title, deniedBox(error));
    return null;
  }
  tokens.sort((a, b) => a.id - b.id);
  const search = h("input", {type: "search", id: "token-search", autocomplete: "off",
    placeholder: "id, info or type"});
  const count = h("p", {id: "token-count", class: "hint", "aria-live": "polite"});
  const body = h("tbody");
  const show = () => {
    const words = search.value.toLowerCase().split(/\s+/).filter(Boolean);
    const shown = tokens.filter((token) => matches(token, words));
    fill(body, shown.map(row));
    if (!shown.length) body.append(h("tr", {}, h("td", {colspan: 7, class: "empty"}, "No token matches.")));
    count.textContent = `${shown.length} of ${tokens.length} tokens`;
  };
  search.addEventListener("input", show);
  fill(root,
    h("div", {class: "heading"}, title,
      h("a", {href: "#/tokens/new", class: "button primary", id: "new-token"}, "New token")),
    h("p", {class: "hint"}, `In ${accountName(session.acting())}.`),
    h("div", {class: "toolbar"}, h("label", {for: "token-search"}, "Search"), search, count),
    h("table", {class: "list", id: "token-list"},
      h("caption", {class: "visually-hidden"}, "Tokens"),
      h("thead", {}, h("tr", {}, ["ID", "Info", "Type", "Expire / TTL", "Accessed", "Enabled", ""].map(
        (name) => h("th", {scope: "col"}, name)))),
      body));
  show();
  return null;
}

function row(token) {
  const enabled = h("input", {type: "checkbox", checked: token.enabled,
    "aria-label": `Enabled: token ${token.id}`, class: "enabled"});
  enabled.addEventListener("change", async () => {
    enabled.disabled = true;
    try {
      await call("PUT", `/platform/tokens/${token.id}`, {body: {enabled: enabled.checked}});
      token.enabled = enabled.checked;
      say(`Token ${token.id} ${token.enabled ? "enabled" : "disabled"}.`);
    } catch (error) {
      enabled.checked = token.enabled;
      fail(error);
    } finally {
      enabled.disabled = false;
    }
  });
  return h("tr", {"data-id": String(token.id)},
    h("td", {class: "num"}, String(token.id)),
    h("td", {class: "info"}, token.info || ""),
    h("td", {}, typeName(token.access)),
    h("td", {}, lifetime(token)),
    h("td", {}, when(token.accessed)),
    h("td", {}, enabled),
    h("td", {}, h("a", {href: `#/tokens/${token.id}`, "aria-label": `Edit token ${token.id}`}, "Edit")));
}
