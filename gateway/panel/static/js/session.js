// What the panel remembers. The key lives in sessionStorage only (gone with the tab); the
// only thing kept across sessions is a display preference, in localStorage.

const KEY = "gw-panel.key";
const ACTING = "gw-panel.cid";
const SKIP_TEMPLATES = "gw-panel.skip-templates";

export const session = {
  key: () => sessionStorage.getItem(KEY),
  start(key) {
    sessionStorage.setItem(KEY, key);
    sessionStorage.removeItem(ACTING);
  },
  end() {
    sessionStorage.removeItem(KEY);
    sessionStorage.removeItem(ACTING);
  },
  /** The subaccount the panel acts as (x-flespi-cid), or null for the token's own account. */
  acting() {
    const value = sessionStorage.getItem(ACTING);
    return value === null ? null : Number(value);
  },
  actAs(cid) {
    if (cid === null) sessionStorage.removeItem(ACTING);
    else sessionStorage.setItem(ACTING, String(cid));
  },
};

export const prefs = {
  skipTemplates: () => localStorage.getItem(SKIP_TEMPLATES) === "1",
  setSkipTemplates(skip) {
    if (skip) localStorage.setItem(SKIP_TEMPLATES, "1");
    else localStorage.removeItem(SKIP_TEMPLATES);
  },
};
