"""The referring-expression language of the synthetic dataset: grammar, meaning, and uniqueness.

Grammar (every expression starts with "the")::

    expr      := "the" desc                                  # "the small red circle", "the red shape"
               | "the" desc relation "the" desc              # "the square left of the blue triangle"
               | "the" extreme desc                          # "the rightmost shape", "the topmost star"
    desc      := [size] [colour] noun
    noun      := shape | "shape"
    relation  := "left of" | "to the left of" | "right of" | "to the right of" | "above" | "below" | "under"
    extreme   := "leftmost" | "rightmost" | "topmost" | "bottommost"
    size      := "small" | "big";  colour := red | green | blue | yellow | purple
    shape     := circle | square | triangle | diamond | star

Meaning, with a margin ``m`` (the mean radius of the two objects involved, or of the target and its
nearest rival for ``extreme``) so that no borderline case is ever generated:

* ``desc`` selects the objects whose attributes match.
* ``A left of B``: B is the only object matching B's desc; the target matches A's desc and its centre is at
  least ``m`` left of B's centre; every *other* object matching A's desc is to the right of B's centre.
* ``the leftmost D``: the target matches D and is at least ``m`` further left than any other match.

:func:`resolve` returns every object that an expression *could* mean under a lenient reading (borderline
counts); :func:`denotes_uniquely` additionally asks the target to satisfy the strict reading. The generator
keeps an expression only if it denotes its target uniquely, so every expression in the dataset is
unambiguous by construction. :func:`parse` turns text back into a :class:`Query`, which
the tests use to check this independently of the generator.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from pipelines.data.synthetic.scene import COLOURS, SHAPES, SIZES, SceneObject

__all__ = ["Description", "Query", "denotes_uniquely", "expressions_for", "parse", "render_text", "resolve"]

_RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("left of", "to the left of"),
    "right": ("right of", "to the right of"),
    "above": ("above",),
    "below": ("below", "under"),
}
_EXTREMES: tuple[str, ...] = ("leftmost", "rightmost", "topmost", "bottommost")


@dataclass(frozen=True)
class Description:
    """A noun phrase: any subset of size, colour and shape (None = unconstrained)."""

    size: str | None = None
    colour: str | None = None
    shape: str | None = None

    def matches(self, obj: SceneObject) -> bool:
        """Whether ``obj`` has every attribute this description names."""
        return all(
            want is None or want == have
            for want, have in ((self.size, obj.size), (self.colour, obj.colour), (self.shape, obj.shape))
        )

    def text(self) -> str:
        """``[size] [colour] noun``."""
        return " ".join(w for w in (self.size, self.colour, self.shape or "shape") if w)


@dataclass(frozen=True)
class Query:
    """A parsed expression: a description, optionally with a relation to an anchor or a superlative."""

    target: Description
    relation: str | None = None  # left / right / above / below
    anchor: Description | None = None
    extreme: str | None = None  # leftmost / rightmost / topmost / bottommost


def _offset(obj: SceneObject, anchor: SceneObject, relation: str) -> float:
    """How far ``obj`` lies in the direction ``relation`` of ``anchor`` (positive = it does)."""
    return {
        "left": anchor.cx - obj.cx,
        "right": obj.cx - anchor.cx,
        "above": anchor.cy - obj.cy,
        "below": obj.cy - anchor.cy,
    }[relation]


def _extremity(obj: SceneObject, extreme: str) -> float:
    """Larger = more extreme in the given direction."""
    return {"leftmost": -obj.cx, "rightmost": obj.cx, "topmost": -obj.cy, "bottommost": obj.cy}[extreme]


def _margin(a: SceneObject, b: SceneObject) -> float:
    return 0.5 * (a.radius + b.radius)


def resolve(query: Query, objects: list[SceneObject]) -> list[int]:
    """Indices of every object the query could refer to, reading borderline cases leniently.

    For a relation, an object counts unless it lies at least the margin on the wrong side of the anchor's
    centre; for a superlative, every match within the margin of the most extreme one counts. If the anchor
    description does not pick out exactly one object, every target match counts.
    """
    matching = [i for i, o in enumerate(objects) if query.target.matches(o)]
    if query.relation is not None and query.anchor is not None:
        anchors = [i for i, o in enumerate(objects) if query.anchor.matches(o)]
        if len(anchors) != 1:
            return matching
        a = objects[anchors[0]]
        return [
            i for i in matching if i != anchors[0] and _offset(objects[i], a, query.relation) > -_margin(objects[i], a)
        ]
    if query.extreme is not None and matching:
        top = max(matching, key=lambda i: _extremity(objects[i], query.extreme))
        best = _extremity(objects[top], query.extreme)
        return [i for i in matching if best - _extremity(objects[i], query.extreme) < _margin(objects[i], objects[top])]
    return matching


def denotes_uniquely(query: Query, objects: list[SceneObject], target: int) -> bool:
    """Whether ``query`` means ``objects[target]`` and nothing else, with no borderline reading.

    For a relation the target must also clear the margin in the right direction (strict reading), and the
    anchor must be unique.
    """
    if resolve(query, objects) != [target]:
        return False
    if query.relation is not None and query.anchor is not None:
        anchors = [i for i, o in enumerate(objects) if query.anchor.matches(o)]
        if len(anchors) != 1:
            return False
        a = objects[anchors[0]]
        return _offset(objects[target], a, query.relation) >= _margin(objects[target], a)
    return True


def render_text(query: Query, rng: np.random.Generator) -> str:
    """Writes a query as text, picking one of the synonyms of its relation at random."""
    if query.relation is not None and query.anchor is not None:
        words = _RELATION_WORDS[query.relation]
        return f"the {query.target.text()} {words[rng.integers(len(words))]} the {query.anchor.text()}"
    if query.extreme is not None:
        return f"the {query.extreme} {query.target.text()}"
    return f"the {query.target.text()}"


def _descriptions(obj: SceneObject) -> list[Description]:
    """Every description ``obj`` satisfies, from bare "shape" to size + colour + shape."""
    attrs = {"size": obj.size, "colour": obj.colour, "shape": obj.shape}
    out = []
    for k in range(4):
        for names in combinations(("size", "colour", "shape"), k):
            out.append(Description(**{n: attrs[n] for n in names}))
    return out


def _shortest_unique(obj_index: int, objects: list[SceneObject]) -> Description | None:
    """The shortest description that picks out exactly ``objects[obj_index]``, or None."""
    for desc in _descriptions(objects[obj_index]):
        if denotes_uniquely(Query(desc), objects, obj_index):
            return desc
    return None


def expressions_for(target: int, objects: list[SceneObject]) -> dict[str, list[Query]]:
    """All unambiguous queries for ``objects[target]``, grouped by kind (attribute/relation/extreme).

    Relation and superlative queries are only offered with a description that matches at least two
    objects, so that the spatial words carry information.
    """
    obj = objects[target]
    found: dict[str, list[Query]] = {"attribute": [], "relation": [], "extreme": []}
    for desc in _descriptions(obj):
        if desc != Description() and denotes_uniquely(Query(desc), objects, target):
            found["attribute"].append(Query(desc))
    shared = [d for d in _descriptions(obj) if sum(d.matches(o) for o in objects) >= 2 and d.size is None]
    for desc in shared:
        for extreme in _EXTREMES:
            if denotes_uniquely(Query(desc, extreme=extreme), objects, target):
                found["extreme"].append(Query(desc, extreme=extreme))
        for a in range(len(objects)):
            anchor = _shortest_unique(a, objects) if a != target else None
            if anchor is None:
                continue
            for relation in _RELATION_WORDS:
                query = Query(desc, relation=relation, anchor=anchor)
                if denotes_uniquely(query, objects, target):
                    found["relation"].append(query)
    return found


_SIZE_RE = "|".join(SIZES)
_COLOUR_RE = "|".join(COLOURS)
_SHAPE_RE = "|".join((*SHAPES, "shape"))
_DESC_RE = rf"(?:({_SIZE_RE}) )?(?:({_COLOUR_RE}) )?({_SHAPE_RE})"
_REL_RE = "|".join(sorted((w for ws in _RELATION_WORDS.values() for w in ws), key=len, reverse=True))
_EXTREME_RE = "|".join(_EXTREMES)
_EXPR_RE = re.compile(rf"^the (?:({_EXTREME_RE}) )?{_DESC_RE}(?: ({_REL_RE}) the {_DESC_RE})?$")


def _description(size: str | None, colour: str | None, noun: str) -> Description:
    return Description(size=size, colour=colour, shape=None if noun == "shape" else noun)


def parse(text: str) -> Query:
    """Parses an expression of the grammar above.

    Raises:
        ValueError: If ``text`` is not in the language.
    """
    m = _EXPR_RE.match(text)
    if m is None or (m.group(1) and m.group(5)):
        raise ValueError(f"not a synthetic expression: {text!r}")
    extreme, size, colour, noun, rel, a_size, a_colour, a_noun = m.groups()
    target = _description(size, colour, noun)
    if rel is None:
        return Query(target, extreme=extreme)
    relation = next(k for k, words in _RELATION_WORDS.items() if rel in words)
    return Query(target, relation=relation, anchor=_description(a_size, a_colour, a_noun))
