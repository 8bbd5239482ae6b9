"""The referring-expression language of the synthetic dataset: grammar, meaning, and uniqueness.

Grammar (every expression starts with "the"), one line per kind of expression (:data:`FAMILIES`)::

    expr      := "the" desc                                  # attribute:   "the small red circle", "the red shape"
               | "the" desc relation "the" desc              # relation:    "the square left of the blue triangle"
               | "the" extreme desc                          # extreme:     "the rightmost shape", "the topmost star"
               | "the" ordinal desc "from the" side          # ordinal:     "the second red shape from the left"
               | "the" comparative desc                      # comparative: "the bigger circle", "the smaller star"
               | "the only" desc                             # only:        "the only triangle"
    desc      := [size] [colour] noun
    noun      := shape | "shape"
    relation  := "left of" | "to the left of" | "right of" | "to the right of" | "above" | "below" | "under"
    extreme   := "leftmost" | "rightmost" | "topmost" | "bottommost"
    ordinal   := "second" | "third";  side := "left" | "right" | "top" | "bottom"
    comparative := "bigger" | "larger" | "smaller"
    size      := "small" | "big";  colour := a name of scene.COLOURS;  shape := a name of scene.SHAPES

Meaning, with a margin ``m`` (the mean radius of the two objects involved, or of the target and its
nearest rival for ``extreme``) so that no borderline case is ever generated:

* ``desc`` selects the objects whose attributes match.
* ``A left of B``: B is the only object matching B's desc; the target matches A's desc and its centre is at
  least ``m`` left of B's centre; every *other* object matching A's desc is to the right of B's centre.
* ``the leftmost D``: the target matches D and is at least ``m`` further left than any other match.
* ``the second D from the left``: D's matches, ordered by centre x, are each at least ``m`` apart from the
  next, and the target is the second of them (``third`` likewise; ``first`` is ``leftmost``).
* ``the bigger D``: D matches exactly two objects, and the target is at least :data:`CLEAR_RATIO` times the
  other in circumradius *and* in the square root of its area (so that shapes of different outline compare
  as they look); ``larger`` is a synonym, ``smaller`` the converse.
* ``the only D``: D matches exactly one object (the same meaning as ``the D``, phrased differently).

The target's desc in spatial, comparative and ``only`` expressions never names a size class (a relation's
anchor may), and spatial and comparative ones only use a desc that is ambiguous on its own, so that their
words carry information.

:func:`resolve` returns every object that an expression *could* mean under a lenient reading (borderline
counts); :func:`denotes_uniquely` additionally asks the target to satisfy the strict reading. The generator
keeps an expression only if it denotes its target uniquely, so every expression in the dataset is
unambiguous by construction. :func:`parse` turns text back into a :class:`Query`, which
the tests use to check this again from the written files (and ``tests/pipelines/data/synthetic_resolver.py``
reads them a second time with a grammar and meaning of its own).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import combinations, pairwise, product

import numpy as np

from pipelines.data.synthetic.scene import COLOURS, SHAPES, SIZES, SceneObject

__all__ = [
    "CLEAR_RATIO",
    "DEFAULT_FAMILIES",
    "FAMILIES",
    "Description",
    "Query",
    "denotes_uniquely",
    "expressions_for",
    "parse",
    "render_text",
    "resolve",
]

# The kinds of expression, in the order the generator offers them (that order feeds its random draws).
FAMILIES: tuple[str, ...] = ("attribute", "relation", "extreme", "ordinal", "comparative", "only")
DEFAULT_FAMILIES: tuple[str, ...] = FAMILIES[:3]
# "the bigger D" needs the target this many times the other in circumradius and in sqrt(area).
CLEAR_RATIO = 1.3

_RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("left of", "to the left of"),
    "right": ("right of", "to the right of"),
    "above": ("above",),
    "below": ("below", "under"),
}
_EXTREMES: tuple[str, ...] = ("leftmost", "rightmost", "topmost", "bottommost")
_ORDINALS: dict[int, str] = {2: "second", 3: "third"}
_SIDES: tuple[str, ...] = ("left", "right", "top", "bottom")
_COMPARATIVES: dict[str, tuple[str, ...]] = {"bigger": ("bigger", "larger"), "smaller": ("smaller",)}


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
    """A parsed expression: a description, with at most one of a relation to an anchor, a superlative, an
    ordinal counted from a side, a comparative, or "only"."""

    target: Description
    relation: str | None = None  # left / right / above / below
    anchor: Description | None = None
    extreme: str | None = None  # leftmost / rightmost / topmost / bottommost
    ordinal: int | None = None  # 2 / 3: the k-th match counted from ``side``
    side: str | None = None  # left / right / top / bottom
    comparative: str | None = None  # bigger / smaller, of exactly two matches
    only: bool = False

    @property
    def kind(self) -> str:
        """Which of :data:`FAMILIES` the query belongs to."""
        if self.relation is not None:
            return "relation"
        if self.extreme is not None:
            return "extreme"
        if self.ordinal is not None:
            return "ordinal"
        if self.comparative is not None:
            return "comparative"
        return "only" if self.only else "attribute"


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


def _position(obj: SceneObject, side: str) -> float:
    """Smaller = nearer to ``side``, so ascending order counts from that side."""
    return {"left": obj.cx, "right": -obj.cx, "top": obj.cy, "bottom": -obj.cy}[side]


def _margin(a: SceneObject, b: SceneObject) -> float:
    return 0.5 * (a.radius + b.radius)


def _clearly_bigger(a: SceneObject, b: SceneObject) -> bool:
    """Whether ``a`` is bigger than ``b`` by :data:`CLEAR_RATIO` in circumradius and in sqrt(area)."""
    return a.radius >= CLEAR_RATIO * b.radius and a.area() >= CLEAR_RATIO**2 * b.area()


def resolve(query: Query, objects: list[SceneObject]) -> list[int]:
    """Indices of every object the query could refer to, reading borderline cases leniently.

    For a relation, an object counts unless it lies at least the margin on the wrong side of the anchor's
    centre; for a superlative, every match within the margin of the most extreme one counts. If the anchor
    description does not pick out exactly one object, every target match counts. For an ordinal, a match
    counts if its rank could be k when every other match within the margin along the axis could lie on
    either side of it. A comparative of other than two matches, or of two not clearly different in size,
    means every match.
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
    if query.ordinal is not None and query.side is not None:
        return [i for i in matching if _could_rank(i, query.ordinal, query.side, matching, objects)]
    if query.comparative is not None and len(matching) == 2:
        a, b = matching
        bigger, smaller = (a, b) if _clearly_bigger(objects[a], objects[b]) else (b, a)
        if _clearly_bigger(objects[bigger], objects[smaller]):
            return [bigger if query.comparative == "bigger" else smaller]
    return matching


def _could_rank(i: int, rank: int, side: str, matching: list[int], objects: list[SceneObject]) -> bool:
    """Whether ``objects[i]`` could be the ``rank``-th of ``matching`` from ``side`` (near neighbours tie)."""
    here = _position(objects[i], side)
    nearer = sum(_position(objects[j], side) <= here - _margin(objects[i], objects[j]) for j in matching)
    farther = sum(_position(objects[j], side) >= here + _margin(objects[i], objects[j]) for j in matching)
    return nearer + 1 <= rank <= len(matching) - farther


def denotes_uniquely(query: Query, objects: list[SceneObject], target: int) -> bool:
    """Whether ``query`` means ``objects[target]`` and nothing else, with no borderline reading.

    For a relation the target must also clear the margin in the right direction (strict reading), and the
    anchor must be unique. For an ordinal every two neighbours along the axis must be the margin apart; a
    comparative needs exactly two matches.
    """
    if resolve(query, objects) != [target]:
        return False
    if query.relation is not None and query.anchor is not None:
        anchors = [i for i, o in enumerate(objects) if query.anchor.matches(o)]
        if len(anchors) != 1:
            return False
        a = objects[anchors[0]]
        return _offset(objects[target], a, query.relation) >= _margin(objects[target], a)
    if query.ordinal is not None and query.side is not None:
        side = query.side
        order = sorted(
            (i for i, o in enumerate(objects) if query.target.matches(o)), key=lambda i: _position(objects[i], side)
        )
        apart = all(
            _position(objects[j], side) - _position(objects[i], side) >= _margin(objects[i], objects[j])
            for i, j in pairwise(order)
        )
        return apart and order[query.ordinal - 1] == target
    if query.comparative is not None:
        return sum(query.target.matches(o) for o in objects) == 2
    return True


def render_text(query: Query, rng: np.random.Generator) -> str:
    """Writes a query as text, picking one of the synonyms of its relation or comparative at random."""
    if query.relation is not None and query.anchor is not None:
        words = _RELATION_WORDS[query.relation]
        return f"the {query.target.text()} {words[rng.integers(len(words))]} the {query.anchor.text()}"
    if query.extreme is not None:
        return f"the {query.extreme} {query.target.text()}"
    if query.ordinal is not None and query.side is not None:
        return f"the {_ORDINALS[query.ordinal]} {query.target.text()} from the {query.side}"
    if query.comparative is not None:
        words = _COMPARATIVES[query.comparative]
        return f"the {words[rng.integers(len(words))]} {query.target.text()}"
    if query.only:
        return f"the only {query.target.text()}"
    return f"the {query.target.text()}"


def _descriptions(obj: SceneObject) -> list[Description]:
    """Every description ``obj`` satisfies, from bare "shape" to size + colour + shape (no size if it has none)."""
    attrs = {"size": obj.size, "colour": obj.colour, "shape": obj.shape}
    kinds = ("size", "colour", "shape") if obj.size is not None else ("colour", "shape")
    out = []
    for k in range(len(kinds) + 1):
        for names in combinations(kinds, k):
            out.append(Description(**{n: attrs[n] for n in names}))
    return out


def _shortest_unique(obj_index: int, objects: list[SceneObject]) -> Description | None:
    """The shortest description that picks out exactly ``objects[obj_index]``, or None."""
    for desc in _descriptions(objects[obj_index]):
        if denotes_uniquely(Query(desc), objects, obj_index):
            return desc
    return None


def expressions_for(
    target: int, objects: list[SceneObject], families: tuple[str, ...] = DEFAULT_FAMILIES
) -> dict[str, list[Query]]:
    """All unambiguous queries for ``objects[target]`` of the given kinds, grouped by kind.

    Relation, superlative and ordinal queries are only offered with a description that matches at least two
    objects, comparatives with one that matches exactly two, so that those words carry information.

    Args:
        target: Index of the referred object.
        objects: The scene.
        families: Kinds to generate (names of :data:`FAMILIES`); the result holds them in that constant's
            order, whatever the order here.
    """
    obj = objects[target]
    plain = [d for d in _descriptions(obj) if d.size is None]
    shared = [d for d in plain if sum(d.matches(o) for o in objects) >= 2]
    anchors = [d for a in range(len(objects)) if a != target and (d := _shortest_unique(a, objects)) is not None]
    candidates = {
        "attribute": [Query(d) for d in _descriptions(obj) if d != Description()],
        "relation": [Query(d, relation=r, anchor=a) for d in shared for a in anchors for r in _RELATION_WORDS],
        "extreme": [Query(d, extreme=e) for d in shared for e in _EXTREMES],
        "ordinal": [Query(d, ordinal=k, side=side) for d in shared for k, side in product(_ORDINALS, _SIDES)],
        "comparative": [Query(d, comparative=c) for d in shared for c in _COMPARATIVES],
        "only": [Query(d, only=True) for d in plain if d != Description()],
    }
    return {
        kind: [q for q in candidates[kind] if denotes_uniquely(q, objects, target)]
        for kind in FAMILIES
        if kind in families
    }


def _desc_re(prefix: str) -> str:
    """``[size] [colour] noun`` as named groups ``<prefix>size``, ``<prefix>colour``, ``<prefix>noun``."""
    return (
        rf"(?:(?P<{prefix}size>{'|'.join(SIZES)}) )?(?:(?P<{prefix}colour>{'|'.join(COLOURS)}) )?"
        rf"(?P<{prefix}noun>{'|'.join((*SHAPES, 'shape'))})"
    )


_REL_RE = "|".join(sorted((w for ws in _RELATION_WORDS.values() for w in ws), key=len, reverse=True))
_PREFIX_RE = (
    rf"(?:(?P<extreme>{'|'.join(_EXTREMES)}) |(?P<ordinal>{'|'.join(_ORDINALS.values())}) "
    rf"|(?P<comparative>{'|'.join(w for ws in _COMPARATIVES.values() for w in ws)}) |(?P<only>only) )?"
)
_SUFFIX_RE = rf"(?: (?P<rel>{_REL_RE}) the {_desc_re('a_')}| from the (?P<side>{'|'.join(_SIDES)}))?"
_EXPR_RE = re.compile(rf"^the {_PREFIX_RE}{_desc_re('')}{_SUFFIX_RE}$")


def _description(size: str | None, colour: str | None, noun: str) -> Description:
    return Description(size=size, colour=colour, shape=None if noun == "shape" else noun)


def parse(text: str) -> Query:
    """Parses an expression of the grammar above.

    Raises:
        ValueError: If ``text`` is not in the language.
    """
    m = _EXPR_RE.match(text)
    prefixed = m is not None and any(m[g] for g in ("extreme", "ordinal", "comparative", "only"))
    if m is None or (m["rel"] and prefixed) or bool(m["ordinal"]) != bool(m["side"]):
        raise ValueError(f"not a synthetic expression: {text!r}")
    target = _description(m["size"], m["colour"], m["noun"])
    if m["rel"]:
        relation = next(k for k, words in _RELATION_WORDS.items() if m["rel"] in words)
        return Query(target, relation=relation, anchor=_description(m["a_size"], m["a_colour"], m["a_noun"]))
    if m["ordinal"]:
        rank = next(k for k, word in _ORDINALS.items() if word == m["ordinal"])
        return Query(target, ordinal=rank, side=m["side"])
    if m["comparative"]:
        comparative = next(k for k, words in _COMPARATIVES.items() if m["comparative"] in words)
        return Query(target, comparative=comparative)
    return Query(target, extreme=m["extreme"], only=bool(m["only"]))
