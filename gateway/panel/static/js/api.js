// The platform API, called with the logged-in token, same origin. The key goes in the
// Authorization header only: never in a URL, never in a message.
import {session} from "./session.js";

export const ORIGIN_REFUSED = "using token from unauthorized origin";

export class ApiError extends Error {
  constructor(status, errors) {
    super(errors.map((error) => error.reason).join("; "));
    this.status = status;
    this.errors = errors;
  }

  /** One line per problem, naming the field when the API named one. */
  lines() {
    return this.errors.map((error) => (error.field ? `${error.field}: ${error.reason}` : error.reason));
  }
}

/**
 * call("PUT", "/platform/tokens/5", {body: {...}}) -> the `result` list.
 * `cid`: the account to act as; undefined means the one chosen in the panel, null the token's own.
 * `key`: another key than the session's (the login check).
 */
export async function call(method, path, {body, cid, key} = {}) {
  const headers = {Authorization: `FlespiToken ${key ?? session.key() ?? ""}`};
  const acting = cid === undefined ? session.acting() : cid;
  if (acting !== null) headers["x-flespi-cid"] = String(acting);
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store", credentials: "omit", redirect: "error",
    });
  } catch {
    throw new ApiError(0, [{code: 0, reason: "the gateway could not be reached"}]);
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) {
    const errors = Array.isArray(data?.errors) && data.errors.length ? data.errors
      : [{code: response.status, reason: `HTTP ${response.status}`}];
    throw new ApiError(response.status, errors);
  }
  return Array.isArray(data?.result) ? data.result : [];
}

/** `data=` query parameter of the logs calls. */
export function withData(path, data) {
  return `${path}?data=${encodeURIComponent(JSON.stringify(data))}`;
}
