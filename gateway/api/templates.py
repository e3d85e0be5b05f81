"""Named token templates: ready-made sharing recipes, as ordinary ACL tokens (docs/api.md, templates).

A token object may carry `"template": {"name": NAME, "item": ID}` instead of `access`; it is
expanded before validation, so a template can never produce what a hand-written ACL could not.

- `toolbox`: read one device, all its submodules (GET).
- `setbox`: read one device and change its settings (GET device, GET/PUT settings, GET telemetry).
- `trackit`: follow one device: GET on it, its messages and telemetry only.
- `support`: device manufacturer support: GET device, messages, logs, telemetry; GET/PUT settings;
  valid for 7 days (`expire`) unless `expire` or `ttl` is given.
- `mqtt-messages`: GET on the device and its messages; over MQTT that grants a subscription to
  flespi's own topic `flespi/message/gw/devices/<id>`, which follows the REST ACL (docs/mqtt.md),
  so no mqtt entry is needed (and none may name a `flespi/` topic).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from gateway.errors import FieldProblem

DEVICES = "gw/devices"
SUPPORT_DAYS = 7
Builder = Callable[[int], list[dict[str, Any]]]


def _get(name: str) -> dict[str, Any]:
    return {"name": name, "methods": ["GET"]}


TEMPLATES: dict[str, Builder] = {
    "toolbox": lambda item: [{"uri": DEVICES, "methods": ["GET"], "ids": [item]}],
    "setbox": lambda item: [{"uri": DEVICES, "methods": ["GET"], "ids": [item], "submodules": [
        {"name": "settings", "methods": ["GET", "PUT"]}, _get("telemetry")]}],
    "trackit": lambda item: [{"uri": DEVICES, "methods": ["GET"], "ids": [item], "submodules": [
        _get("messages"), _get("telemetry")]}],
    "support": lambda item: [{"uri": DEVICES, "methods": ["GET"], "ids": [item], "submodules": [
        _get("messages"), _get("logs"), _get("telemetry"), {"name": "settings", "methods": ["GET", "PUT"]}]}],
    "mqtt-messages": lambda item: [
        {"uri": DEVICES, "methods": ["GET"], "ids": [item], "submodules": [_get("messages")]}],
}


def expand_template(item: Any) -> tuple[Any, list[FieldProblem]]:
    """The token object with its template turned into `access`; problems name `template...`."""
    if not isinstance(item, dict) or "template" not in item:
        return item, []
    spec = item["template"]
    if not isinstance(spec, dict) or set(spec) - {"name", "item"}:
        return item, [FieldProblem("template", "'template' must be an object {name, item}")]
    problems = []
    name, target = spec.get("name"), spec.get("item")
    if not isinstance(name, str) or name not in TEMPLATES:  # a list or object name is no template
        problems.append(FieldProblem("template.name", f"unknown template; one of {', '.join(sorted(TEMPLATES))}"))
    if type(target) is not int or target < 1:  # `type`: true is no item id
        problems.append(FieldProblem("template.item", "'template.item' must be a positive item id"))
    if "access" in item:
        problems.append(FieldProblem("access", "give either 'access' or 'template', not both"))
    if problems:
        return item, problems
    expanded = {key: value for key, value in item.items() if key != "template"}
    expanded["access"] = {"type": 2, "acl": TEMPLATES[str(name)](int(str(target)))}
    if name == "support" and not expanded.get("expire") and not expanded.get("ttl"):
        expanded["expire"] = int(time.time()) + SUPPORT_DAYS * 86400
    return expanded, []
