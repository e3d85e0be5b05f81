// Building the page: every piece of data becomes a text node or a property, never markup.
// (Nothing in the panel parses strings as HTML: a token's `info` of "<img onerror=...>" stays text.)

let counter = 0;

/** A fresh id for a control and its <label for>. */
export function uid(stem) {
  counter += 1;
  return `${stem}-${counter}`;
}

/** h("button", {type: "button", onclick: f}, "Save"): an element with attributes and children. */
export function h(tag, props = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      element.addEventListener(name.slice(2), value);
    } else if (name === "value" || name === "checked" || name === "selected") {
      element[name] = value;  // properties: what the user sees and edits
    } else if (name === "class") {
      element.className = value;
    } else {
      element.setAttribute(name, value === true ? "" : String(value));
    }
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(element, child);
    else element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace everything inside `element`. */
export function fill(element, ...children) {
  element.replaceChildren();
  append(element, children);
  return element;
}

/** A labelled control: [<label for=id>, control]. */
export function field(text, control, hint) {
  const id = control.id || uid("f");
  control.id = id;
  const parts = [h("label", {for: id}, text), control];
  if (hint) {
    const hintId = `${id}-hint`;
    control.setAttribute("aria-describedby", hintId);
    parts.push(h("small", {id: hintId, class: "hint"}, hint));
  }
  return h("div", {class: "field"}, parts);
}

/** A checkbox with its label after it. */
export function checkbox(text, checked, props = {}) {
  const input = h("input", {type: "checkbox", id: props.id || uid("c"), checked, ...props});
  const label = h("label", {for: input.id, class: "check"}, input, " ", text);
  return {input, label};
}

export function button(text, onclick, props = {}) {
  return h("button", {type: "button", onclick, ...props}, text);
}
