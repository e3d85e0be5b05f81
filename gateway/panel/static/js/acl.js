// The ACL editor: entries for HTTP uris (methods, ids, submodules) and MQTT topics (actions).
import {button, checkbox, field, fill, h, uid} from "./dom.js";

const METHODS = ["GET", "POST", "PUT", "DELETE"];
const ACTIONS = ["publish", "subscribe"];

/** Checkboxes for a set of names inside a fieldset; `.chosen()` reads them back. */
function choices(legend, names, chosen, kind) {
  const boxes = names.map((name) => checkbox(name, chosen.includes(name), {"data-choice": name}));
  const element = h("fieldset", {class: `choices ${kind}`}, h("legend", {}, legend), boxes.map((box) => box.label));
  return {element, chosen: () => boxes.filter((box) => box.input.checked).map((box) => box.input.dataset.choice)};
}

/** Radio buttons; `.value()` is the chosen one's value. */
function radios(legend, options, current, kind) {
  const name = uid("r");
  const inputs = options.map(([value, text]) => {
    const input = h("input", {type: "radio", name, id: uid("o"), value, checked: value === current,
      "data-choice": value});
    return {input, label: h("label", {for: input.id, class: "check"}, input, " ", text)};
  });
  const element = h("fieldset", {class: `choices ${kind}`}, h("legend", {}, legend), inputs.map((one) => one.label));
  const value = () => inputs.find((one) => one.input.checked)?.input.value;
  return {element, value, inputs: inputs.map((one) => one.input)};
}

function parseIds(text, at) {
  const parts = text.split(/[\s,]+/).filter(Boolean);
  const ids = parts.map(Number);
  if (!parts.length || ids.some((id) => !Number.isInteger(id) || id < 1)) {
    throw new Error(`${at}: list item ids as positive whole numbers, e.g. 7, 12`);
  }
  return ids;
}

function submoduleEditor(submodule, onRemove) {
  const name = h("input", {type: "text", class: "sub-name", value: submodule.name || "", placeholder: "messages",
    autocomplete: "off"});
  const methods = choices("Methods", METHODS, submodule.methods || ["GET"], "sub-methods");
  const legend = h("legend", {});
  const element = h("fieldset", {class: "submodule"}, legend, field("Name", name), methods.element,
    button("Remove submodule", () => onRemove(editor), {class: "link remove-submodule"}));
  const editor = {
    element,
    number(index) { legend.textContent = `Submodule ${index + 1}`; },
    collect: () => ({name: name.value.trim(), methods: methods.chosen()}),
  };
  return editor;
}

function entryEditor(entry, onRemove) {
  const kind = h("select", {class: "acl-kind"},
    h("option", {value: "http", selected: entry.uri !== "mqtt"}, "HTTP API: a uri and its items"),
    h("option", {value: "mqtt", selected: entry.uri === "mqtt"}, "MQTT: a topic"));
  const legend = h("legend", {});

  // HTTP: uri, methods, ids, submodules.
  const uri = h("input", {type: "text", class: "acl-uri", value: entry.uri === "mqtt" ? "" : entry.uri || "",
    placeholder: "gw/devices", autocomplete: "off", spellcheck: "false"});
  const methods = choices("Methods", METHODS, entry.methods || ["GET"], "acl-methods");
  const ids = entry.ids ?? "all";
  const idsMode = radios("Items", [["all", "all items"], ["in-groups", "items in the token's groups"],
    ["list", "only these ids"]], Array.isArray(ids) ? "list" : ids, "acl-ids-mode");
  const idList = h("input", {type: "text", class: "acl-ids", value: Array.isArray(ids) ? ids.join(", ") : "",
    placeholder: "7, 12", autocomplete: "off", inputmode: "numeric"});
  const idField = field("Item ids", idList, "Comma-separated.");
  const showIds = () => { idField.hidden = idsMode.value() !== "list"; };
  idsMode.inputs.forEach((input) => input.addEventListener("change", showIds));
  showIds();

  const subMode = radios("Submodules", [["all", "all submodules"], ["none", "none"], ["list", "only these"]],
    entry.submodules === undefined ? "all" : entry.submodules.length ? "list" : "none", "acl-sub-mode");
  const subs = [];
  const subList = h("div", {class: "submodules"});
  const renumberSubs = () => subs.forEach((sub, index) => sub.number(index));
  const removeSub = (sub) => {
    subs.splice(subs.indexOf(sub), 1);
    sub.element.remove();
    renumberSubs();
  };
  const addSub = (submodule) => {
    const sub = submoduleEditor(submodule, removeSub);
    subs.push(sub);
    subList.append(sub.element);
    renumberSubs();
    return sub;
  };
  (entry.submodules || []).forEach(addSub);
  const addSubButton = button("Add submodule", () => {
    addSub({}).element.querySelector("input").focus();
  }, {class: "add-submodule"});
  const subBox = h("div", {class: "sub-box"}, subList, addSubButton);
  const showSubs = () => { subBox.hidden = subMode.value() !== "list"; };
  subMode.inputs.forEach((input) => input.addEventListener("change", () => {
    showSubs();
    if (subMode.value() === "list" && !subs.length) addSub({});
  }));
  showSubs();
  const http = h("div", {class: "acl-http"}, field("URI", uri, "A collection, e.g. gw/devices; no leading slash."),
    methods.element, idsMode.element, idField, subMode.element, subBox);

  // MQTT: topic and actions.
  const topic = h("input", {type: "text", class: "acl-topic", value: entry.topic || "", autocomplete: "off",
    spellcheck: "false", placeholder: "message/gw/devices/7"});
  const actions = choices("Actions", ACTIONS, entry.actions || ["subscribe"], "acl-actions");
  const mqtt = h("div", {class: "acl-mqtt"}, field("Topic", topic, "+ and # wildcards; not under flespi/."),
    actions.element);

  const showKind = () => {
    http.hidden = kind.value !== "http";
    mqtt.hidden = kind.value !== "mqtt";
  };
  kind.addEventListener("change", showKind);
  showKind();

  const element = h("fieldset", {class: "acl-entry"}, legend, field("Kind", kind), http, mqtt,
    button("Remove entry", () => onRemove(editor), {class: "link remove-entry"}));
  const editor = {
    element,
    number(index) { legend.textContent = `ACL entry ${index + 1}`; },
    collect(index) {
      const at = `ACL entry ${index + 1}`;
      if (kind.value === "mqtt") return {uri: "mqtt", topic: topic.value.trim(), actions: actions.chosen()};
      const result = {uri: uri.value.trim(), methods: methods.chosen()};
      const mode = idsMode.value();
      result.ids = mode === "list" ? parseIds(idList.value, at) : mode;
      if (subMode.value() === "none") result.submodules = [];
      else if (subMode.value() === "list") result.submodules = subs.map((sub) => sub.collect());
      return result;
    },
  };
  return editor;
}

/** The editor for `access.acl`: `.element`, `.collect()` (throws an Error naming the entry). */
export function aclEditor(acl) {
  const editors = [];
  const list = h("div", {class: "acl-list"});
  const empty = h("p", {class: "hint"}, "No entry yet: an ACL token with an empty ACL may do nothing.");
  const renumber = () => {
    editors.forEach((editor, index) => editor.number(index));
    empty.hidden = editors.length > 0;
  };
  const remove = (editor) => {
    editors.splice(editors.indexOf(editor), 1);
    editor.element.remove();
    renumber();
  };
  const add = (entry) => {
    const editor = entryEditor(entry, remove);
    editors.push(editor);
    list.append(editor.element);
    renumber();
    return editor;
  };
  (acl || []).forEach(add);
  renumber();
  const element = h("fieldset", {class: "acl", id: "acl-editor"}, h("legend", {}, "ACL"), empty, list,
    button("Add ACL entry", () => add({uri: "", methods: ["GET"]}).element.querySelector("select").focus(),
      {class: "add-entry"}));
  return {element, collect: () => editors.map((editor, index) => editor.collect(index)), reset: (next) => {
    editors.splice(0).forEach((editor) => editor.element.remove());
    fill(list);
    (next || []).forEach(add);
    renumber();
  }};
}
