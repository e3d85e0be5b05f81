// How values read on screen.

export const TYPES = [
  {value: 0, name: "Standard", hint: "any API path but the platform's; /auth/info"},
  {value: 1, name: "Master", hint: "everything, the tokens API included"},
  {value: 2, name: "ACL", hint: "only what its ACL lists"},
  {value: 3, name: "NOAPI", hint: "no API access at all"},
];

export function typeName(access) {
  const found = TYPES.find((type) => type.value === access?.type);
  return found ? found.name : "unknown";
}

const pad = (number) => String(number).padStart(2, "0");

/** UNIX seconds as local "YYYY-MM-DD HH:MM:SS"; 0 or nothing as `none`. */
export function when(seconds, none = "never") {
  if (!seconds) return none;
  const date = new Date(seconds * 1000);
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} `
    + `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

/** UNIX seconds as the value of an <input type="datetime-local"> (local time). */
export function toLocalInput(seconds) {
  return seconds ? when(seconds).replace(" ", "T") : "";
}

export function fromLocalInput(value) {
  if (!value) return 0;
  const millis = new Date(value).getTime();
  return Number.isNaN(millis) ? NaN : Math.floor(millis / 1000);
}

export const UNITS = [
  {name: "days", seconds: 86400}, {name: "hours", seconds: 3600},
  {name: "minutes", seconds: 60}, {name: "seconds", seconds: 1},
];

/** A duration in the largest unit it is a whole number of: {amount, unit}. */
export function splitDuration(seconds) {
  const unit = UNITS.find((candidate) => seconds % candidate.seconds === 0) || UNITS[3];
  return {amount: seconds / unit.seconds, unit: unit.name};
}

export function duration(seconds) {
  const {amount, unit} = splitDuration(seconds);
  return `${amount} ${amount === 1 ? unit.slice(0, -1) : unit}`;
}

export function lifetime(token) {
  const parts = [];
  if (token.expire) parts.push(`expires ${when(token.expire)}`);
  if (token.ttl) parts.push(`TTL ${duration(token.ttl)}`);
  return parts.join(" · ") || "none";
}

export const EVENTS = {
  1: "created", 2: "updated", 3: "deleted", 20: "blocked", 21: "unblocked", 600: "expired", 1000: "request",
};
