// Subaccounts of the acting account: list, create, delete, and act as one (x-flespi-cid).
import {call} from "./api.js";
import {button, field, fill, h, uid} from "./dom.js";
import {when} from "./format.js";
import {session} from "./session.js";
import {accountName, deniedBox, fail, go, say, state} from "./ui.js";

function limitsText(limits) {
  const parts = Object.entries(limits || {}).filter(([, value]) => value).map(([name, value]) => `${name} ${value}`);
  return parts.join(", ") || "defaults";
}

export async function accountsView(root) {
  const title = h("h1", {}, "Subaccounts");
  fill(root, title, h("p", {class: "loading"}, "Loading…"));
  let accounts;
  try {
    accounts = await call("GET", "/platform/subaccounts");
  } catch (error) {
    fill(root, title, deniedBox(error));
    return null;
  }
  const body = h("tbody");
  fill(body, accounts.length ? accounts.map((account) => row(root, account))
    : h("tr", {}, h("td", {colspan: 6, class: "empty"}, "No subaccount yet.")));
  const acting = session.acting();
  fill(root, title,
    h("p", {class: "hint"}, `Below ${accountName(acting)}. Acting as a subaccount makes every call of the panel `
      + "for that account (the x-flespi-cid header): its tokens, its recycle bin, its subaccounts."),
    acting === null ? null : button("Act as my own account again", () => switchTo(null), {id: "act-own"}),
    h("table", {class: "list", id: "account-list"}, h("caption", {class: "visually-hidden"}, "Subaccounts"),
      h("thead", {}, h("tr", {}, ["ID", "Name", "Parent", "Limits", "Created", ""].map(
        (name) => h("th", {scope: "col"}, name)))), body),
    createForm(root));
  return null;
}

function switchTo(cid) {
  session.actAs(cid === state.me?.cid ? null : cid);
  document.getElementById("acting").value = session.acting() === null ? "" : String(session.acting());
  go("#/tokens", `Acting as ${accountName(session.acting())}.`);
}

function row(root, account) {
  const confirm = h("span", {class: "confirm-inline", hidden: true},
    button("Yes, delete it, its subaccounts and their tokens", async () => {
      try {
        await call("DELETE", `/platform/subaccounts/${account.id}`);
      } catch (error) {
        fail(error);
        return;
      }
      await state.refreshAccounts();
      await accountsView(root);
      say(`Subaccount ${account.id} deleted.`);
    }, {class: "danger"}));
  return h("tr", {"data-id": String(account.id)},
    h("td", {class: "num"}, String(account.id)), h("td", {class: "info"}, account.name),
    h("td", {class: "num"}, String(account.cid)), h("td", {}, limitsText(account.limits)),
    h("td", {}, when(account.created)),
    h("td", {}, button("Act as", () => switchTo(account.id), {class: "act-as",
      "aria-label": `Act as subaccount ${account.id}`}), " ",
    button("Delete", () => { confirm.hidden = false; confirm.querySelector("button").focus(); },
      {class: "link", "aria-label": `Delete subaccount ${account.id}`}), confirm));
}

function createForm(root) {
  const name = h("input", {type: "text", id: uid("name"), class: "account-name", maxlength: "255", required: true,
    autocomplete: "off"});
  const calls = h("input", {type: "number", id: uid("calls"), min: "0", step: "1", class: "limit-calls"});
  const traffic = h("input", {type: "number", id: uid("traffic"), min: "0", step: "1", class: "limit-traffic"});
  const form = h("form", {class: "card", id: "new-account", "aria-labelledby": "new-account-title"},
    h("h2", {id: "new-account-title"}, "New subaccount"), field("Name", name),
    h("div", {class: "inline"}, field("API calls per window (empty: default)", calls),
      field("Traffic bytes per window (empty: default)", traffic)),
    h("div", {class: "actions"}, h("button", {type: "submit", class: "primary"}, "Create subaccount")));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const limits = {};
    if (calls.value !== "") limits.api_calls = Number(calls.value);
    if (traffic.value !== "") limits.traffic = Number(traffic.value);
    let created;
    try {
      [created] = await call("POST", "/platform/subaccounts", {body: [{name: name.value, limits}]});
    } catch (error) {
      fail(error);
      return;
    }
    await state.refreshAccounts();
    await accountsView(root);
    say(`Subaccount ${created.id} (${created.name}) created.`);
  });
  return form;
}
