// The logged-in token's own record: what any usable token may see (/auth/info).
import {call} from "./api.js";
import {fill, h} from "./dom.js";
import {lifetime, typeName, when} from "./format.js";
import {deniedBox, isMaster, state} from "./ui.js";

export async function meView(root) {
  fill(root, h("h1", {}, "My token"), h("p", {class: "loading"}, "Loading…"));
  let me;
  try {
    [me] = await call("GET", "/auth/info", {cid: null});
    state.me = me;
  } catch (error) {
    fill(root, h("h1", {}, "My token"), deniedBox(error));
    return;
  }
  const rows = [
    ["ID", me.id], ["Info", me.info || "—"], ["Type", typeName(me.access)], ["Account", me.cid],
    ["Enabled", me.enabled ? "yes" : "no"], ["Lifetime", lifetime(me)], ["Created", when(me.created)],
    ["Accessed", when(me.accessed)], ["IP masks", me.ips || "any address"],
    ["Origins", JSON.stringify(me.origins ?? "*")], ["Metadata", JSON.stringify(me.metadata ?? {})],
  ];
  const acl = me.access?.type === 2 ? h("section", {},
    h("h2", {}, "ACL"), h("pre", {class: "json"}, JSON.stringify(me.access.acl, null, 2))) : null;
  fill(root, h("h1", {}, "My token"),
    h("dl", {class: "record"}, rows.map(([name, value]) => [h("dt", {}, name), h("dd", {}, String(value))])),
    acl,
    isMaster() ? null : h("p", {class: "note"},
      `This is a ${typeName(me.access).toLowerCase()} token: it may read its own record here. `
      + "Listing and changing tokens, the recycle bin and subaccounts need a master token; the gateway "
      + "answers 403 to those, and the panel shows its reason."));
  return null;
}
