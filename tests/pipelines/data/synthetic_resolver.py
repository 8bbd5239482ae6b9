"""A second reading of the synthetic expressions, written apart from the generator's language module.

It reads only the text of an expression and the ``attributes`` of each annotation in ``instances.json``
(shape, colour, size, cx, cy, radius) and returns every object the expression could denote. It shares no code
with ``pipelines.data.synthetic.language``: the words are split and consumed left to right (no regular
expression), and the meaning is its own:

* positions tie when they lie closer than :data:`TIE` times the two objects' mean radius;
* an object could be "the leftmost D" if no other D lies clearly further left; it could be "the second D from
  the left" if the D clearly left of it are at most one and the D not clearly right of it at least one more;
* sizes compare by area (from each outline's own formula), and tie when within :data:`AREA_TIE` of each other;
  "the bigger D" needs D to match exactly two objects;
* "the D" and "the only D" need D to match exactly one object; a relation's anchor likewise.

Where an expression fails to pick anything out (an anchor that is not unique, a comparative of three), every
object matching its description counts, so a test that expects one object fails. Text outside the grammar
raises :class:`UnreadableExpression`, so that nothing passes by not being read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AREA_TIE", "TIE", "Reading", "UnreadableExpression", "denotations", "read"]

TIE = 0.5
AREA_TIE = 1.3

SHAPE_WORDS = ("circle", "square", "triangle", "diamond", "star", "pentagon", "hexagon", "cross")
COLOUR_WORDS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "pink", "brown")
SIZE_WORDS = ("small", "big")
SUPERLATIVES = {"leftmost": "left", "rightmost": "right", "topmost": "top", "bottommost": "bottom"}
ORDINALS = {"second": 2, "third": 3}
COMPARATIVES = {"bigger": "bigger", "larger": "bigger", "smaller": "smaller"}
# Relation phrases as word sequences, each with the side of the anchor the target lies on.
RELATIONS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("to", "the", "left", "of"), "left"),
    (("to", "the", "right", "of"), "right"),
    (("left", "of"), "left"),
    (("right", "of"), "right"),
    (("above",), "top"),
    (("below",), "bottom"),
    (("under",), "bottom"),
)

# Area of each outline for a circumradius of 1, from plane geometry: regular n-gons (n/2) sin(2 pi / n); the
# star alternates radii 1 and 0.45 over ten corners; the cross has arms 0.6 wide for a length of 1, scaled so
# its outer corners lie on the unit circle.
UNIT_AREA = {
    "circle": math.pi,
    "square": 2.0,
    "diamond": 2.0,
    "triangle": 1.5 * math.sin(2 * math.pi / 3),
    "pentagon": 2.5 * math.sin(2 * math.pi / 5),
    "hexagon": 3.0 * math.sin(2 * math.pi / 6),
    "star": 5 * 0.45 * math.sin(math.pi / 5),
    "cross": (8 * 0.3 - 4 * 0.3**2) / (1 + 0.3**2),
}


class UnreadableExpression(ValueError):
    """The text is not an expression this reader knows."""


@dataclass
class Phrase:
    """A noun phrase: the attributes it names (absent = any)."""

    attributes: dict[str, str] = field(default_factory=dict)

    def fits(self, obj: dict[str, Any]) -> bool:
        return all(obj.get(name) == value for name, value in self.attributes.items())


@dataclass
class Reading:
    """What the words say: a kind, the described phrase, and the kind's own parts."""

    kind: str  # attribute / only / superlative / ordinal / comparative / relation
    phrase: Phrase
    side: str | None = None  # left / right / top / bottom
    rank: int | None = None
    comparative: str | None = None
    anchor: Phrase | None = None


def _phrase(words: list[str], at: int, text: str) -> tuple[Phrase, int]:
    """Reads ``[size] [colour] noun`` starting at ``words[at]``; returns it and the index after it."""
    attributes: dict[str, str] = {}
    if at < len(words) and words[at] in SIZE_WORDS:
        attributes["size"] = words[at]
        at += 1
    if at < len(words) and words[at] in COLOUR_WORDS:
        attributes["colour"] = words[at]
        at += 1
    if at >= len(words) or (words[at] not in SHAPE_WORDS and words[at] != "shape"):
        raise UnreadableExpression(f"expected a shape word at word {at + 1} of {text!r}")
    if words[at] != "shape":
        attributes["shape"] = words[at]
    return Phrase(attributes), at + 1


def read(text: str) -> Reading:
    """Reads an expression into its parts.

    Raises:
        UnreadableExpression: If the words do not form an expression of the synthetic grammar.
    """
    words = text.split(" ")
    if len(words) < 2 or words[0] != "the":
        raise UnreadableExpression(f"an expression starts with 'the': {text!r}")
    head = words[1]
    if head in SUPERLATIVES or head in ORDINALS or head in COMPARATIVES or head == "only":
        phrase, at = _phrase(words, 2, text)
        rest = words[at:]
        if head in ORDINALS:
            if len(rest) != 3 or rest[:2] != ["from", "the"] or rest[2] not in ("left", "right", "top", "bottom"):
                raise UnreadableExpression(f"an ordinal ends in 'from the <side>': {text!r}")
            return Reading("ordinal", phrase, side=rest[2], rank=ORDINALS[head])
        if rest:
            raise UnreadableExpression(f"unexpected words after the description: {text!r}")
        if head in SUPERLATIVES:
            return Reading("superlative", phrase, side=SUPERLATIVES[head])
        if head in COMPARATIVES:
            return Reading("comparative", phrase, comparative=COMPARATIVES[head])
        return Reading("only", phrase)
    phrase, at = _phrase(words, 1, text)
    rest = words[at:]
    if not rest:
        return Reading("attribute", phrase)
    for phrase_words, side in RELATIONS:
        n = len(phrase_words)
        if tuple(rest[:n]) == phrase_words and rest[n : n + 1] == ["the"]:
            anchor, end = _phrase(rest, n + 1, text)
            if end == len(rest):
                return Reading("relation", phrase, side=side, anchor=anchor)
    raise UnreadableExpression(f"not a relation to 'the <description>': {text!r}")


def _coordinate(obj: dict[str, Any], side: str) -> float:
    """Distance-like coordinate that grows away from ``side``."""
    return {"left": obj["cx"], "right": -obj["cx"], "top": obj["cy"], "bottom": -obj["cy"]}[side]


def _clearly_nearer(a: dict[str, Any], b: dict[str, Any], side: str) -> bool:
    """Whether ``a`` lies clearly nearer to ``side`` than ``b`` (not a tie)."""
    tie = TIE * 0.5 * (a["radius"] + b["radius"])
    return _coordinate(b, side) - _coordinate(a, side) >= tie


def _area(obj: dict[str, Any]) -> float:
    return UNIT_AREA[obj["shape"]] * obj["radius"] ** 2


def denotations(text: str, objects: list[dict[str, Any]]) -> list[int]:
    """Indices of every object in ``objects`` (annotation ``attributes``) that ``text`` could denote.

    Raises:
        UnreadableExpression: If the text cannot be read.
    """
    reading = read(text)
    fits = [i for i, o in enumerate(objects) if reading.phrase.fits(o)]
    if reading.kind in ("attribute", "only"):
        return fits
    if reading.kind == "superlative":
        assert reading.side is not None
        side = reading.side
        return [i for i in fits if not any(_clearly_nearer(objects[j], objects[i], side) for j in fits)]
    if reading.kind == "ordinal":
        assert reading.side is not None and reading.rank is not None
        side, rank, out = reading.side, reading.rank, []
        for i in fits:
            ahead = sum(_clearly_nearer(objects[j], objects[i], side) for j in fits)
            behind = sum(_clearly_nearer(objects[i], objects[j], side) for j in fits)
            if ahead < rank <= len(fits) - behind:
                out.append(i)
        return out
    if reading.kind == "comparative":
        if len(fits) != 2:
            return fits
        small, big = sorted(fits, key=lambda i: _area(objects[i]))
        if _area(objects[big]) < AREA_TIE * _area(objects[small]):
            return fits
        return [big] if reading.comparative == "bigger" else [small]
    assert reading.anchor is not None and reading.side is not None
    anchors = [i for i, o in enumerate(objects) if reading.anchor.fits(o)]
    if len(anchors) != 1:
        return fits
    anchor, side = objects[anchors[0]], reading.side
    # The target lies towards ``side`` of the anchor, or level with it (a tie): not clearly the other way.
    return [i for i in fits if i != anchors[0] and not _clearly_nearer(anchor, objects[i], side)]
