// Creating a token: the templates first (unless the user chose not to be offered them), or the
// full form; for the acting account or one of its subaccounts. The key is shown once.
import {call} from "./api.js";
import {button, checkbox, field, fill, h, uid} from "./dom.js";
import {submitFields, tokenFields} from "./form.js";
import {prefs, session} from "./session.js";
import {accountName, fail, go, isMaster, say, state} from "./ui.js";

// The gateway's templates (gateway/templates.py), described for people.
const TEMPLATES = [
  {name: "toolbox", text: "Read one device and all of its submodules."},
  {name: "setbox", text: "Read one device and its telemetry; read and change its settings."},
  {name: "trackit", text: "Follow one device: read it, its messages and its telemetry."},
  {name: "support", text: "For a manufacturer's support: read the device, its messages, logs and telemetry; "
    + "read and change settings. Expires after 7 days unless you set a lifetime."},
  {name: "mqtt-messages", text: "Subscribe to one device's messages over MQTT, and read them over HTTP."},
];
const DAY = 86400;

export function newTokenView(root) {
  if (prefs.skipTemplates()) customForm(root);
  else offerTemplates(root);
  return null;
}

function offerTemplates(root) {
  const skip = checkbox("Don't auto-offer templates anymore", prefs.skipTemplates(), {id: "skip-templates"});
  skip.input.addEventListener("change", () => {
    prefs.setSkipTemplates(skip.input.checked);
    say(skip.input.checked ? "Templates will not be offered first anymore (kept in this browser)."
      : "Templates will be offered first again.");
  });
  fill(root, h("h1", {}, "New token"),
    h("p", {}, "Start from a template, made for sharing one device, or write the token yourself."),
    h("ul", {class: "templates", "aria-label": "Templates"}, TEMPLATES.map((template) => h("li", {},
      button(template.name, () => templateForm(root, template), {class: "template", "data-template": template.name,
        "aria-describedby": `tpl-${template.name}`}),
      h("p", {id: `tpl-${template.name}`}, template.text)))),
    h("div", {class: "actions"}, button("Custom token", () => customForm(root), {id: "custom-token"}),
      h("a", {href: "#/tokens", class: "button"}, "Cancel")),
    skip.label);
  root.querySelector("button.template").focus();
}

/** "Create for subaccount": the account the new token goes to (any the logged-in token may act as). */
function accountChoice() {
  const acting = session.acting();
  const others = [...(acting === null ? [] : [state.me.cid]), ...state.accounts.map((account) => account.id)]
    .filter((cid) => cid !== acting);
  const select = h("select", {id: uid("account"), class: "create-account"},
    h("option", {value: "", selected: true}, `${accountName(acting)} (acting now)`),
    others.map((cid) => h("option", {value: String(cid)}, accountName(cid))));
  const element = state.accounts.length ? field("Create for subaccount", select,
    "The token belongs to the account chosen here.") : null;
  return {element, cid: () => (select.value === "" ? undefined : Number(select.value))};
}

function templateForm(root, template) {
  const item = h("input", {type: "number", id: uid("item"), class: "template-item", min: "1", step: "1", required: true});
  const info = h("input", {type: "text", id: uid("info"), class: "info", maxlength: "1024", autocomplete: "off"});
  const ttlDays = h("input", {type: "number", id: uid("ttl"), class: "ttl-days", min: "0", step: "1",
    value: template.name === "support" ? "" : "7"});
  const account = accountChoice();
  const form = h("form", {class: "card"},
    h("h1", {}, `New token from template “${template.name}”`), h("p", {}, template.text),
    field("Device id", item, "The item the token is for."),
    field("Info", info),
    field("TTL in days (after last use)", ttlDays,
      template.name === "support" ? "Empty: the template's 7-day expiry." : "A token needs a TTL or an expiry time."),
    account.element,
    h("div", {class: "actions"}, h("button", {type: "submit", class: "primary"}, "Create token"),
      button("Back to templates", () => offerTemplates(root)), h("a", {href: "#/tokens", class: "button"}, "Cancel")));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = {template: {name: template.name, item: Number(item.value)},
      info: info.value || `${template.name} for device ${item.value}`};
    if (ttlDays.value !== "") body.ttl = Number(ttlDays.value) * DAY;
    await create(root, body, account.cid());
  });
  fill(root, form);
  item.focus();
}

function customForm(root) {
  const fields = tokenFields({info: "", enabled: true, access: {type: 0}, ttl: 30 * DAY, origins: "*"});
  const account = accountChoice();
  const form = h("form", {class: "card token-form"}, h("h1", {}, "New token"), fields.element, account.element,
    h("div", {class: "actions"}, h("button", {type: "submit", class: "primary"}, "Create token"),
      button("Start from a template", () => offerTemplates(root), {id: "to-templates"}),
      h("a", {href: "#/tokens", class: "button"}, "Cancel")));
  submitFields(form, fields, fail, (body) => create(root, body, account.cid()));
  fill(root, form);
  fields.focus();
}

async function create(root, body, cid) {
  if (!isMaster()) say("Trying: creating tokens needs a master token.");
  let created;
  try {
    [created] = await call("POST", "/platform/tokens", {body: [body], cid});
  } catch (error) {
    fail(error);
    return;
  }
  showKey(root, created, cid);
}

/** The new key, this once, with a copy button; it is in the page only until the user moves on. */
function showKey(root, created, cid) {
  const key = h("input", {type: "text", id: "new-key", readonly: true, value: created.key, class: "key",
    spellcheck: "false", autocomplete: "off"});
  const copied = h("span", {class: "hint", "aria-live": "polite", id: "copy-state"});
  const copy = button("Copy key", async () => {
    try {
      await navigator.clipboard.writeText(key.value);
    } catch {
      key.select();  // no clipboard API (an insecure origin): the old way
      if (!document.execCommand("copy")) {
        copied.textContent = "Copy failed: select the key and copy it yourself.";
        return;
      }
    }
    copied.textContent = "Copied.";
  }, {id: "copy-key", class: "primary"});
  const here = cid === undefined || cid === session.acting();
  const open = here ? h("a", {href: `#/tokens/${created.id}`, class: "button", id: "open-token"}, `Open token ${created.id}`)
    : button(`Act as ${accountName(cid)} and open token ${created.id}`, () => {
      session.actAs(cid === state.me.cid ? null : cid);
      document.getElementById("acting").value = session.acting() === null ? "" : String(session.acting());
      go(`#/tokens/${created.id}`, `Acting as ${accountName(session.acting())}.`);
    }, {id: "open-token"});
  fill(root, h("section", {class: "card created", "aria-labelledby": "created-title"},
    h("h1", {id: "created-title"}, `Token ${created.id} created`),
    h("p", {}, `In ${accountName(cid === undefined ? session.acting() : cid)}. `,
      h("strong", {}, "Its key is shown only now:"), " copy it before you leave this page."),
    field("Key", key), h("div", {class: "actions"}, copy, copied, open,
      h("a", {href: "#/tokens", class: "button"}, "Back to the list"))));
  say(`Token ${created.id} created.`);
  copy.focus();
}
