// The writable fields of a token, for creating and editing: info, enabled, access (with the ACL
// editor), expire, ttl, ips, origins, metadata. `collect()` returns the body to send.
import {aclEditor} from "./acl.js";
import {button, checkbox, field, h, uid} from "./dom.js";
import {TYPES, UNITS, fromLocalInput, splitDuration, toLocalInput} from "./format.js";

function isAnyOrigin(origins) {
  return origins === undefined || origins === null || origins === "*" || (Array.isArray(origins) && !origins.length);
}

function originsEditor(origins) {
  const name = uid("origins");
  const any = h("input", {type: "radio", name, id: uid("o"), value: "any", checked: isAnyOrigin(origins),
    class: "origins-any"});
  const listed = h("input", {type: "radio", name, id: uid("o"), value: "list", checked: !isAnyOrigin(origins),
    class: "origins-list"});
  const rows = [];
  const list = h("div", {class: "origin-items"});
  const renumber = () => rows.forEach((row, index) => { row.label.textContent = `${row.kind} ${index + 1}`; });
  const add = (item) => {
    const isPreset = typeof item === "object" && item !== null;
    const input = h("input", {type: "text", id: uid("origin"), autocomplete: "off", spellcheck: "false",
      class: isPreset ? "origin-preset" : "origin-pattern",
      value: isPreset ? String(item.preset ?? "") : String(item), placeholder: isPreset ? "flespi" : "https://app.example.com"});
    const label = h("label", {for: input.id});
    const row = {kind: isPreset ? "Preset" : "Origin", label, input, isPreset};
    row.element = h("div", {class: "origin-item"}, label, input,
      button("Remove", () => {
        rows.splice(rows.indexOf(row), 1);
        row.element.remove();
        renumber();
      }, {class: "link", "aria-label": "Remove this origin item"}));
    rows.push(row);
    list.append(row.element);
    renumber();
    listed.checked = true;
    showList();
    return input;
  };
  const box = h("div", {class: "origin-box"}, list, h("div", {class: "actions"},
    button("Add origin", () => add("").focus(), {class: "add-origin"}),
    button("Add preset", () => add({preset: "flespi"}).focus(), {class: "add-preset"}),
    button(`Add this panel's origin (${location.origin})`, () => add(location.origin), {class: "add-panel-origin"})));
  const showList = () => { box.hidden = !listed.checked; };
  any.addEventListener("change", showList);
  listed.addEventListener("change", showList);
  if (Array.isArray(origins)) origins.forEach(add);
  showList();
  const element = h("fieldset", {class: "origins"}, h("legend", {}, "Origins (web pages that may use the token)"),
    h("label", {for: any.id, class: "check"}, any, " Any origin (\"*\")"),
    h("label", {for: listed.id, class: "check"}, listed, " Only these origins"), box);
  const collect = () => {
    if (any.checked) return "*";
    const items = rows.map((row) => (row.isPreset ? {preset: row.input.value.trim()} : row.input.value.trim()));
    if (!items.length) throw new Error("Origins: list at least one origin or preset, or choose Any origin.");
    return items;
  };
  return {element, collect};
}

function lifetimeFields(token) {
  const expire = h("input", {type: "datetime-local", id: uid("expire"), step: "1", class: "expire",
    value: toLocalInput(token.expire)});
  const split = splitDuration(token.ttl || 0);
  const ttl = h("input", {type: "number", id: uid("ttl"), min: "0", step: "1", class: "ttl",
    value: token.ttl ? String(split.amount) : ""});
  const unit = h("select", {id: uid("unit"), class: "ttl-unit"},
    UNITS.map((one) => h("option", {value: String(one.seconds), selected: token.ttl ? one.name === split.unit : one.name === "days"},
      one.name)));
  const element = h("fieldset", {class: "lifetime"}, h("legend", {}, "Lifetime"),
    h("p", {class: "hint"}, "A token needs an expiry time, a TTL, or both: it works while either holds."),
    field("Expires at (local time; empty: no fixed end)", expire),
    h("div", {class: "inline"}, field("TTL (after last use; empty: none)", ttl), field("TTL unit", unit)));
  const collect = () => {
    const at = fromLocalInput(expire.value);
    if (Number.isNaN(at)) throw new Error("Expires at: not a valid date and time.");
    const amount = ttl.value === "" ? 0 : Number(ttl.value);
    if (!Number.isInteger(amount) || amount < 0) throw new Error("TTL: a whole number, 0 or more.");
    return {expire: at, ttl: amount * Number(unit.value)};
  };
  return {element, collect};
}

/**
 * The form's fields for `token` (a record, or defaults for a new token).
 * Returns {element, collect}: collect() -> the writable fields, or throws an Error to show.
 */
export function tokenFields(token) {
  const info = h("input", {type: "text", id: uid("info"), class: "info", maxlength: "1024", value: token.info || "",
    autocomplete: "off"});
  const enabled = checkbox("Enabled", token.enabled !== false, {class: "enabled"});
  const type = h("select", {id: uid("type"), class: "access-type"},
    TYPES.map((one) => h("option", {value: String(one.value), selected: one.value === (token.access?.type ?? 0)},
      `${one.name} (${one.value}): ${one.hint}`)));
  const acl = aclEditor(token.access?.acl || []);
  const showAcl = () => { acl.element.hidden = type.value !== "2"; };
  type.addEventListener("change", showAcl);
  showAcl();
  const lifetime = lifetimeFields(token);
  const ips = h("input", {type: "text", id: uid("ips"), class: "ips", value: token.ips || "", autocomplete: "off",
    spellcheck: "false", placeholder: "10.0.0.*, 2001:db8::/32"});
  const origins = originsEditor(token.origins);
  const metadata = h("textarea", {id: uid("metadata"), class: "metadata", rows: "3", spellcheck: "false"});
  metadata.value = JSON.stringify(token.metadata || {}, null, 1);
  const element = h("div", {class: "token-fields"},
    h("fieldset", {}, h("legend", {}, "General"), field("Info", info, "A description for people, up to 1024 characters."),
      enabled.label, field("Access type", type)),
    acl.element, lifetime.element,
    h("fieldset", {}, h("legend", {}, "Where from"),
      field("IP masks", ips, "Comma-separated addresses, masks (10.0.0.*) or networks; empty: any address."),
      origins.element),
    h("fieldset", {}, h("legend", {}, "Metadata"),
      field("Metadata (JSON object of strings)", metadata)));
  const collect = () => {
    let meta;
    try {
      meta = JSON.parse(metadata.value.trim() || "{}");
    } catch {
      throw new Error("Metadata: not valid JSON.");
    }
    if (typeof meta !== "object" || meta === null || Array.isArray(meta)) {
      throw new Error("Metadata: must be a JSON object, e.g. {\"owner\": \"ops\"}.");
    }
    const kind = Number(type.value);
    return {
      info: info.value, enabled: enabled.input.checked,
      access: kind === 2 ? {type: kind, acl: acl.collect()} : {type: kind},
      ...lifetime.collect(), ips: ips.value.trim(), origins: origins.collect(), metadata: meta,
    };
  };
  return {element, collect, focus: () => info.focus()};
}

/**
 * On `form`'s submit: the fields' values go to `send(body)`; a value the form refuses is shown
 * instead (`fail`) and nothing is sent.
 */
export function submitFields(form, fields, fail, send) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    let body;
    try {
      body = fields.collect();
    } catch (error) {
      fail(error);
      return;
    }
    await send(body);
  });
}
