"""The built-in synthetic referring dataset: coloured shapes with unambiguous expressions, in the REFER layout.

Modules:
    scene: sampling and drawing scenes of non-overlapping objects.
    language: the expression grammar, its meaning, and the uniqueness check.
    dataset: writing images, ``instances.json`` and ``refs(synthetic).p`` for every split.
    variants: named sets of options that change the task (shapes, colours, sizes, kinds of expression).
"""

from pipelines.runtime import lazy_exports

__all__ = ["VARIANTS", "SyntheticConfig", "generate_synthetic", "variant_config"]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "SyntheticConfig": "pipelines.data.synthetic.dataset",
        "generate_synthetic": "pipelines.data.synthetic.dataset",
        "VARIANTS": "pipelines.data.synthetic.variants",
        "variant_config": "pipelines.data.synthetic.variants",
    },
)
