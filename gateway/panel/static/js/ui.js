// What every view shares: the logged-in token, the accounts it may act as, and the messages.
import {ApiError, ORIGIN_REFUSED} from "./api.js";
import {h} from "./dom.js";

export const state = {
  me: null,          // the logged-in token's own record (/auth/info)
  accounts: [],      // subaccounts it may act as (master tokens only)
  onSessionLost: null,  // set by main.js: a refused key ends the session
  refreshAccounts: null,  // set by main.js: reload `accounts` after a subaccount changed
  route: null,  // set by main.js: render the current address again
  pending: null,  // a message to show once the next view is drawn
};

const notice = () => document.getElementById("notice");
const problem = () => document.getElementById("problem");

/** A message for screen readers and eyes alike (role=status). */
export function say(text) {
  problem().textContent = "";
  notice().textContent = text;
}

export function clearMessages() {
  problem().textContent = "";
  notice().textContent = "";
}

/** Move to another view and say `message` once it is drawn (moving clears the messages). */
export function go(hash, message) {
  state.pending = message || null;
  if (location.hash === hash) state.route();
  else location.hash = hash;
}

/** Why a call failed, in words a user can act on. */
export function explain(error) {
  if (!(error instanceof ApiError)) return [String(error?.message || error)];
  const reasons = error.lines();
  if (error.status === 401 && error.errors.some((e) => e.reason === ORIGIN_REFUSED)) {
    return [`${ORIGIN_REFUSED}: the token you logged in with does not allow this panel's origin `
      + `(${location.origin}), which the browser sends with every change. Add ${location.origin} `
      + `(or an origin preset listing it) to that token's origins, or allow any origin ("*").`];
  }
  if (error.status === 403) {
    const lines = reasons.map((reason) => `Not allowed for this token: ${reason}.`);
    if (state.me && !isMaster()) lines.push("The tokens API, the recycle bin and subaccounts need a master token.");
    return lines;
  }
  if (error.status === 400) return ["The gateway refused the input:", ...reasons];
  return reasons;
}

/** The key itself was refused (unknown, expired, disabled, wrong address): the session is over. */
function sessionLost(error) {
  if (error instanceof ApiError && error.status === 401 && !error.errors.some((e) => e.reason === ORIGIN_REFUSED)
      && state.onSessionLost) {
    state.onSessionLost(error);
    return true;
  }
  return false;
}

/** Show a failed call (role=alert); a token that stopped working ends the session. */
export function fail(error) {
  if (sessionLost(error)) return;
  notice().textContent = "";
  problem().textContent = explain(error).join(" ");
}

/** A denied or failed load, shown in place of the view's content. */
export function deniedBox(error) {
  if (sessionLost(error)) return null;
  return h("div", {class: "denied"}, explain(error).map((line) => h("p", {}, line)));
}

export function isMaster() {
  return state.me?.access?.type === 1;
}

export function accountName(cid) {
  if (cid === null || cid === undefined || cid === state.me?.cid) return `own account (${state.me?.cid ?? 0})`;
  const found = state.accounts.find((account) => account.id === cid);
  return found ? `subaccount ${cid} (${found.name})` : `subaccount ${cid}`;
}
