"""MQTT topic rules (gateway.policy.mqtt_topics) and the ACL validation of mqtt entries."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.policy.acl import acl_problems, compile_acl
from gateway.policy.mqtt_topics import (
    covers,
    filter_problem,
    may_match_reserved,
    may_publish,
    may_subscribe,
    name_problem,
    rest_path,
    strip_share,
)


def levels(text: str) -> tuple[str, ...]:
    return tuple(text.split("/"))


@pytest.mark.parametrize(("granting", "asked", "covered"), [
    ("a/b", "a/b", True), ("a/+", "a/b", True), ("a/+", "a/+", True), ("a/#", "a", True), ("a/#", "a/b/c", True),
    ("a/#", "a/+/#", True), ("#", "a/#", True), ("+/+", "a/b", True),
    ("a/b", "a/+", False), ("a/+", "a/#", False), ("a/+", "a/b/c", False), ("a/b", "a/b/c", False),
    ("a/b/c", "a/b", False), ("+", "$SYS", False), ("#", "$SYS/x", False), ("+/x", "$a/x", False),
    ("$SYS/#", "$SYS/broker", True), ("a/+/c", "a/#", False),
])
def test_covers(granting: str, asked: str, covered: bool) -> None:
    assert covers(levels(granting), levels(asked)) is covered


def matches(topic_filter: tuple[str, ...], topic: tuple[str, ...]) -> bool:
    """MQTT matching written out plainly, as the oracle for `covers`."""
    if topic and topic[0].startswith("$") and topic_filter[0] in ("+", "#"):
        return False
    for index, level in enumerate(topic_filter):
        if level == "#":
            return True
        if index >= len(topic) or (level != "+" and level != topic[index]):
            return False
    return len(topic) == len(topic_filter)


LEVEL = st.sampled_from(["a", "b", "$s", ""])
FILTER_LEVEL = st.sampled_from(["a", "b", "+", "$s", ""])


@st.composite
def filters(draw: st.DrawFn) -> tuple[str, ...]:
    body = draw(st.lists(FILTER_LEVEL, min_size=1, max_size=4))
    return (*body, "#") if draw(st.booleans()) else tuple(body)


@settings(deadline=None)  # a loaded machine must not fail it
@given(filters(), filters(), st.lists(LEVEL, min_size=1, max_size=6))
def test_a_covered_filter_matches_nothing_the_cover_does_not(granting: tuple[str, ...], asked: tuple[str, ...],
                                                            topic: list[str]) -> None:
    if covers(granting, asked) and matches(asked, tuple(topic)):
        assert matches(granting, tuple(topic))


@pytest.mark.parametrize(("topic_filter", "inner"), [
    ("a/b", "a/b"), ("$share/g/a/#", "a/#"), ("$share/g", None), ("$share//a", None), ("$share/g+/a", None),
    ("$share/g/", None), ("$shared/g/a", "$shared/g/a"),
])
def test_strip_share(topic_filter: str, inner: str | None) -> None:
    assert strip_share(topic_filter) == inner


@pytest.mark.parametrize("topic_filter", ["#", "+/#", "+/x", "+/x/#", "flespi/x", "flespi/#", "$share/g/flespi/x",
                                          "$share/g/#", "$share/g/+/message"])
def test_filters_that_may_match_reserved_topics(topic_filter: str) -> None:
    assert may_match_reserved(topic_filter)


@pytest.mark.parametrize("topic_filter", ["flespi", "+", "a/#", "notflespi/x", "$share/g/a/+", "$SYS/#"])
def test_filters_that_cannot(topic_filter: str) -> None:
    assert not may_match_reserved(topic_filter)


@pytest.mark.parametrize(("topic_filter", "problem"), [
    ("", "a topic filter must not be empty"), ("a/#/b", "# may only be the whole last level of a topic filter"),
    ("a/b#", "# may only be the whole last level of a topic filter"),
    ("a/b+", "+ may only be a whole level of a topic filter"), ("a\x00", "a topic filter must not contain NUL"),
    ("$share/g", "a shared subscription is $share/<group>/<filter>, the group without wildcards"),
    ("a//b", None), ("/", None), ("+/+/#", None),
])
def test_filter_problem(topic_filter: str, problem: str | None) -> None:
    assert filter_problem(topic_filter) == problem


def test_name_problem() -> None:
    assert name_problem("a/b") is None and name_problem("") and name_problem("a/+") and name_problem("a/#")


@pytest.mark.parametrize(("topic_filter", "path"), [
    ("flespi/message/gw/devices/7", "/gw/devices/7/messages"),
    ("flespi/message/gw/devices/+", "/gw/devices/all/messages"),
    ("flespi/state/gw/devices/7", "/gw/devices/7"),
    ("flespi/state/gw/devices/7/telemetry/#", "/gw/devices/7"),
    ("flespi/message/gw/devices/7/x", None), ("flespi/message/+/devices/7", None), ("flespi/message/gw/devices", None),
    ("flespi/log/gw/devices/7", None), ("flespi/message/gw/devices/#", None), ("flespi/message/gw/devices/07", None),
])
def test_rest_path(topic_filter: str, path: str | None) -> None:
    assert rest_path(levels(topic_filter)) == path


ACL = [
    {"uri": "mqtt", "topic": "my/+/topic", "actions": ["subscribe"]},
    {"uri": "mqtt", "topic": "my/out/#", "actions": ["publish"]},
    {"uri": "gw/devices", "methods": ["GET"], "ids": [7], "submodules": [{"name": "messages", "methods": ["GET"]}]},
]


def rest_for(acl: list[dict[str, object]]) -> object:
    compiled = compile_acl(acl)

    def allows(path: str) -> bool:
        try:
            return compiled.authorize("GET", path) == path
        except Exception:
            return False
    return compiled, allows


@pytest.mark.parametrize(("topic_filter", "granted"), [
    ("my/a/topic", True), ("my/+/topic", True), ("$share/grp/my/+/topic", True), ("my/#", False),
    ("my/a/other", False), ("flespi/message/gw/devices/7", True), ("flespi/message/gw/devices/8", False),
    ("flespi/message/gw/devices/+", False), ("flespi/state/gw/devices/7", True), ("flespi/state/gw/devices/8", False),
    ("#", False), ("$SYS/#", False),
    ("+/a/topic", False),
])
def test_acl_subscriptions(topic_filter: str, granted: bool) -> None:
    compiled, allows = rest_for(ACL)
    assert may_subscribe("acl", compiled.mqtt, allows, topic_filter) is granted  # type: ignore[attr-defined]


@pytest.mark.parametrize(("kind", "topic_filter", "granted"), [
    ("master", "#", True), ("master", "$SYS/#", True), ("master", "flespi/#", True),
    ("standard", "#", False), ("standard", "a/#", True), ("standard", "$SYS/#", False),
    ("standard", "flespi/message/gw/devices/+", True), ("standard", "flespi/log/#", False),
    ("standard", "+/x", False), ("standard", "+", True),
])
def test_master_and_standard_subscriptions(kind: str, topic_filter: str, granted: bool) -> None:
    assert may_subscribe(kind, None, lambda path: not path.startswith("/platform/"), topic_filter) is granted


@pytest.mark.parametrize(("kind", "topic", "granted"), [
    ("master", "a/b", True), ("master", "flespi/x", False), ("master", "$SYS/x", False), ("standard", "a", True),
    ("standard", "flespi/message/gw/devices/1", False), ("acl", "my/out/x", True), ("acl", "my/out", True),
    ("acl", "my/a/topic", False), ("acl", "other", False),
])
def test_publish(kind: str, topic: str, granted: bool) -> None:
    compiled, _ = rest_for(ACL)
    assert may_publish(kind, compiled.mqtt, topic) is granted  # type: ignore[attr-defined]


@pytest.mark.parametrize(("topic", "reason"), [
    ("#", "topic could match reserved flespi/ topics"),
    ("+/x/#", "topic could match reserved flespi/ topics"),
    ("+/#", "topic could match reserved flespi/ topics"),
    ("$share/group/flespi/message/#", "topic may not start with flespi/"),
    ("$share/group/#", "topic could match reserved flespi/ topics"),
    ("$share/group", "a shared subscription is $share/<group>/<filter>, the group without wildcards"),
    ("flespi/x", "topic may not start with flespi/"),
    ("$SYS/#", "$SYS topics are for master tokens only"),
])
def test_validation_refuses_filters_reaching_reserved_topics(topic: str, reason: str) -> None:
    problems = acl_problems([{"uri": "mqtt", "topic": topic, "actions": ["subscribe"]}])
    assert [(p.field, p.reason) for p in problems] == [("access.acl[0].topic", reason)]


@pytest.mark.parametrize("topic", ["a/#", "+", "a/+/b", "$share/g/a/#", "notflespi/#", "flespi"])
def test_validation_accepts(topic: str) -> None:
    assert acl_problems([{"uri": "mqtt", "topic": topic, "actions": ["publish", "subscribe"]}]) == []


def test_a_stored_entry_that_no_longer_validates_grants_nothing() -> None:
    compiled = compile_acl([{"uri": "mqtt", "topic": "#", "actions": ["publish", "subscribe"]}])
    assert compiled.mqtt.subscribe == () and compiled.mqtt.publish == ()
    assert not may_publish("acl", compiled.mqtt, "a")
