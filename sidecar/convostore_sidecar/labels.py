"""Session labels: what a label may be, and which labels a store allows.

Labels tie a session to the people and tenants it belongs to (`user_id`, `tenant`), so
they are found, listed and erased by them. They are indexed in the backend as they are
given, so each is small and plain: a name like a Kubernetes label's, a value of
printable text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace

from .refusals import Invalid
from .sections import Section

NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")
MAX_VALUE_CHARS = 256
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
MOST = 16
"""Labels per session unless the store says otherwise."""
HIGHEST = 64


@dataclass(frozen=True)
class LabelRules:
    allowed: frozenset[str] | None = None
    """The names a session may carry; None: any well-formed name."""
    most: int = MOST
    retention: Retention | None = None

    @classmethod
    def parse(cls, s: Section) -> LabelRules:
        allowed = s.raw("allowed")
        if allowed is not None and (
            not isinstance(allowed, list)
            or not all(isinstance(n, str) and NAME.fullmatch(n) for n in allowed)
        ):
            s.fail("allowed", "must be a list of label names (1-63 letters, digits, _ . -)")
        rules = cls(
            allowed=None if allowed is None else frozenset(allowed),
            most=s.integer("maxPerSession", MOST, low=1, high=HIGHEST),
        )
        if s.has("retention"):
            rules = replace(rules, retention=Retention.parse(s.section("retention"), rules))
        s.done()
        return rules

    def changes(self, raw: object) -> dict[str, str | None]:
        """A label change as a request gives it: names to values, or to null to remove."""
        if not isinstance(raw, dict) or not raw:
            raise Invalid("invalid_labels", "labels must be a non-empty object of names to values")
        if len(raw) > self.most:
            raise Invalid(
                "invalid_labels", f"{len(raw)} labels given; a session holds at most {self.most}"
            )
        return {
            self.name(name): None if value is None else self.value(name, value)
            for name, value in raw.items()
        }

    def selector(self, pairs: Iterable[str]) -> dict[str, str] | None:
        """`name=value` pairs, as a listing's `label` parameters give them; None when two
        ask for different values of one name, which no session carries."""
        found: dict[str, str] = {}
        contradictory = False
        for count, pair in enumerate(pairs, 1):
            name, sep, value = pair.partition("=")
            if not sep:
                raise Invalid("invalid_labels", f"label {pair[:80]!r} is not name=value")
            if count > HIGHEST:
                raise Invalid("invalid_labels", f"at most {HIGHEST} labels select sessions")
            value = self.value(self.name(name), value)
            contradictory |= found.setdefault(name, value) != value
        return None if contradictory else found

    def name(self, name: object) -> str:
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise Invalid(
                "invalid_labels",
                f"label name {str(name)[:80]!r} must be 1-63 letters, digits, '_', '.' or '-',"
                " starting and ending with a letter or digit",
            )
        if self.allowed is not None and name not in self.allowed:
            raise Invalid(
                "label_not_allowed",
                f"this store allows the labels {sorted(self.allowed)}, not {name!r}",
            )
        return name

    def value(self, name: str, value: object) -> str:
        if (
            not isinstance(value, str)
            or not 1 <= len(value) <= MAX_VALUE_CHARS
            or CONTROL.search(value)
            or not _encodable(value)
        ):
            raise Invalid(
                "invalid_labels",
                f"label {name!r}: a value is 1 to {MAX_VALUE_CHARS} characters of text"
                " without control characters",
            )
        return value


def _encodable(value: str) -> bool:
    """False for text with a lone surrogate, which no backend can store as text."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class Retention:
    """How long a session of each class is kept after its last write: the class is the
    value of one label (`plan: free` 7 days, `plan: paid` 90). The sweep erases a session
    once its class's time has passed since its last write."""

    label: str
    classes: dict[str, float]

    @classmethod
    def parse(cls, s: Section, rules: LabelRules) -> Retention:
        raw = s.string("label")
        if raw is None:
            s.fail("label", "name the label whose value is a session's retention class")
        try:
            label = rules.name(raw)
        except Invalid as exc:
            s.fail("label", exc.message)
        classes_s = s.section("classes")
        names = classes_s.keys()
        if not names:
            s.fail("classes", "map each class (a value of the label) to how long it is kept")
        classes = {}
        for name in names:
            try:
                value = rules.value(label, name)
            except Invalid as exc:
                classes_s.fail(None, exc.message)
            classes[value] = classes_s.duration(name, 0.0, low=1, high=10 * 365 * 86400)
        classes_s.done()
        s.done()
        return cls(label, classes)
