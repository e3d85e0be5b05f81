// The panel: session, header and the hash routes (#/tokens, #/tokens/5, #/tokens/5/logs, ...).
import {call} from "./api.js";
import {fill, h} from "./dom.js";
import {typeName} from "./format.js";
import {session} from "./session.js";
import {accountName, clearMessages, fail, go, isMaster, say, state} from "./ui.js";
import {loginView} from "./login.js";
import {tokensView} from "./tokens.js";
import {newTokenView} from "./create.js";
import {tokenView} from "./token.js";
import {binView} from "./bin.js";
import {accountsView} from "./accounts.js";
import {meView} from "./me.js";

// flespi's "Login with token" link: #/token/<key>. The key is taken, and the address replaced at
// once, before anything else runs, so it stays neither in the address bar nor in the history.
const LINK_LOGIN = /^#\/token\/([^/]*)$/;

const ROUTES = [
  [/^#\/tokens\/new$/, (root) => newTokenView(root)],
  [/^#\/tokens\/(\d+)\/logs$/, (root, id) => tokenView(root, Number(id), "logs")],
  [/^#\/tokens\/(\d+)$/, (root, id) => tokenView(root, Number(id), "settings")],
  [/^#\/tokens$/, (root) => tokensView(root)],
  [/^#\/recycle-bin$/, (root) => binView(root)],
  [/^#\/subaccounts$/, (root) => accountsView(root)],
  [/^#\/me$/, (root) => meView(root)],
];

let cleanup = null;

function landing() {
  return isMaster() ? "#/tokens" : "#/me";
}

function takeLinkKey() {
  const found = LINK_LOGIN.exec(location.hash);
  if (!found) return null;
  history.replaceState(null, "", `${location.pathname}${location.search}`);
  try {
    return decodeURIComponent(found[1]);
  } catch {
    return found[1];  // a stray % sign: the key as written (the gateway will refuse it)
  }
}

async function route() {
  const linkKey = takeLinkKey();
  if (linkKey !== null) {
    await logIn(linkKey, "the link's token");
    return;
  }
  if (cleanup) cleanup();
  cleanup = null;
  const view = document.getElementById("view");
  const root = h("div", {class: "view"});
  fill(view, root);
  if (!session.key() || !state.me) {
    showSession(false);
    loginView(root, logIn);
    return;
  }
  showSession(true);
  const hash = location.hash || landing();
  markSection(hash);
  for (const [pattern, render] of ROUTES) {
    const found = pattern.exec(hash);
    if (found) {
      cleanup = (await render(root, ...found.slice(1))) || null;
      if (state.pending) say(state.pending);
      state.pending = null;
      return;
    }
  }
  location.replace(landing());
}

/** Check a key with /auth/info (any usable token may read it), then start the session. */
async function logIn(key, what = "the token") {
  try {
    const [me] = await call("GET", "/auth/info", {key, cid: null});
    session.start(key);
    state.me = me;
    await loadAccounts();
    history.replaceState(null, "", `${location.pathname}${location.search}${landing()}`);
    await route();
    say(`Logged in with token ${me.id}.`);
  } catch (error) {
    session.end();
    state.me = null;
    await route();
    fail(error.status === 401 ? new Error(`Login failed, ${what} was refused: ${error.message}`) : error);
  }
}

async function loadAccounts() {
  state.accounts = [];
  if (isMaster()) {
    try {
      state.accounts = await call("GET", "/platform/subaccounts?fields=id,name,cid", {cid: null});
    } catch {
      state.accounts = [];  // e.g. the token's origin is refused: the panel still works for its own account
    }
  }
  renderActing();
}

function renderActing() {
  const select = document.getElementById("acting");
  const acting = session.acting();
  fill(select, h("option", {value: "", selected: acting === null}, accountName(null)),
    state.accounts.map((account) => h("option", {value: String(account.id), selected: acting === account.id},
      accountName(account.id))));
  // Only a master token with subaccounts has a choice to make.
  document.getElementById("acting-box").hidden = state.accounts.length === 0 && acting === null;
}

state.refreshAccounts = loadAccounts;
state.route = route;

function showSession(on) {
  document.getElementById("session").hidden = !on;
  document.getElementById("sections").hidden = !on;
  if (on && state.me) {
    const info = state.me.info ? ` · ${state.me.info}` : "";
    fill(document.getElementById("who"), `Token ${state.me.id} · ${typeName(state.me.access)}${info}`);
  }
}

function markSection(hash) {
  for (const link of document.querySelectorAll("#sections a")) {
    const current = hash.startsWith(`#/${link.dataset.section}`);
    if (current) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

function logOut(message) {
  session.end();
  state.me = null;
  state.accounts = [];
  if (location.hash) history.replaceState(null, "", location.pathname);
  route().then(() => (message ? fail(new Error(message)) : say("Logged out.")));
}

state.onSessionLost = (error) => logOut(`Logged out: the token was refused (${error.message}).`);

document.getElementById("logout").addEventListener("click", () => logOut());
document.getElementById("acting").addEventListener("change", (event) => {
  const value = event.target.value;
  session.actAs(value === "" ? null : Number(value));
  // A token page of another account would find nothing: go back to the list.
  go(/^#\/tokens\/\d+/.test(location.hash) ? "#/tokens" : location.hash, `Acting as ${accountName(session.acting())}.`);
});

window.addEventListener("hashchange", () => {
  clearMessages();
  route();
});

/** A reload keeps the tab's session: the key is checked again before anything is shown. */
async function boot() {
  if (session.key() && !LINK_LOGIN.test(location.hash)) {
    try {
      [state.me] = await call("GET", "/auth/info", {cid: null});
      await loadAccounts();
    } catch (error) {
      state.me = null;
      if (error.status === 401 || error.status === 403) session.end();  // else (unreachable) a reload retries
      await route();
      fail(new Error(error.status === 401 ? `Logged out: the token was refused (${error.message}).` : error.message));
      return;
    }
  }
  await route();
}

boot();
