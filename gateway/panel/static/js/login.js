// Log in with a token key (typed or pasted), or with a link #/token/<key>.
import {field, h} from "./dom.js";

export function loginView(root, logIn) {
  const key = h("input", {type: "password", id: "login-key", name: "key", autocomplete: "off",
    spellcheck: "false", required: true, autofocus: true});
  const show = h("input", {type: "checkbox", id: "login-show"});
  show.addEventListener("change", () => { key.type = show.checked ? "text" : "password"; });
  const form = h("form", {class: "card login", "aria-labelledby": "login-title"},
    h("h1", {id: "login-title"}, "Log in with a token"),
    field("Token key", key, "The 64-character key. It is kept in this tab only (sessionStorage) and sent "
      + "to the gateway in the Authorization header."),
    h("label", {for: "login-show", class: "check"}, show, " Show the key"),
    h("div", {class: "actions"}, h("button", {type: "submit", class: "primary"}, "Log in")),
    h("p", {class: "hint"}, "A link of the form ", h("code", {}, `${location.origin}${location.pathname}#/token/<key>`),
      " logs in too; the key is removed from the address bar at once."));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const value = key.value.trim();
    key.value = "";
    if (value) logIn(value);
  });
  root.append(form);
  key.focus();
  return null;
}

