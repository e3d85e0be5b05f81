// The recycle bin: deleted tokens of the acting account; restore (same id and key) or purge.
import {call} from "./api.js";
import {button, fill, h} from "./dom.js";
import {typeName, when} from "./format.js";
import {deniedBox, fail, say} from "./ui.js";

export async function binView(root) {
  const title = h("h1", {}, "Recycle bin");
  fill(root, title, h("p", {class: "loading"}, "Loading…"));
  let tokens;
  try {
    tokens = await call("GET", "/platform/recycle-bin/tokens?fields=id,info,access,deleted");
  } catch (error) {
    fill(root, title, deniedBox(error));
    return null;
  }
  tokens.sort((a, b) => b.deleted - a.deleted);
  const body = h("tbody");
  fill(body, tokens.length ? tokens.map((token) => row(root, token))
    : h("tr", {}, h("td", {colspan: 5, class: "empty"}, "The recycle bin is empty.")));
  fill(root, title, h("p", {class: "hint"}, "Deleted tokens are kept here for a while; a restored token keeps its id and key."),
    h("table", {class: "list", id: "bin-list"}, h("caption", {class: "visually-hidden"}, "Deleted tokens"),
      h("thead", {}, h("tr", {}, ["ID", "Info", "Type", "Deleted", ""].map((name) => h("th", {scope: "col"}, name)))),
      body));
  return null;
}

function row(root, token) {
  const act = async (method, path, done) => {
    try {
      await call(method, path);
    } catch (error) {
      fail(error);
      return;
    }
    await binView(root);
    say(done);
  };
  const purge = h("span", {class: "confirm-inline", hidden: true},
    button("Yes, purge for good", () => act("DELETE", `/platform/recycle-bin/tokens/${token.id}`,
      `Token ${token.id} purged.`), {class: "danger", "aria-label": `Yes, purge token ${token.id} for good`}));
  return h("tr", {"data-id": String(token.id)},
    h("td", {class: "num"}, String(token.id)), h("td", {class: "info"}, token.info || ""),
    h("td", {}, typeName(token.access)), h("td", {}, when(token.deleted)),
    h("td", {}, button("Restore", () => act("POST", `/platform/recycle-bin/tokens/${token.id}/restore`,
      `Token ${token.id} restored.`), {class: "restore", "aria-label": `Restore token ${token.id}`}),
    " ", button("Purge", () => { purge.hidden = false; purge.querySelector("button").focus(); },
      {class: "link", "aria-label": `Purge token ${token.id}`}), purge));
}
