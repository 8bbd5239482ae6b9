"""The data stage: REFER datasets (or the built-in synthetic one) -> letterboxed rows in sharded Parquet.

Entry points: :func:`run_preprocess` (the Ray Data job behind ``python -m jobs.preprocess``) and :func:`read_split`
(a preprocessed split back as a Ray Dataset).

Modules:
    refer: the REFER reader (``instances.json`` + ``refs(<split_by>).p``), with every malformed record reported.
    synthetic: the built-in synthetic dataset, written in the REFER layout (scene, language, dataset).
    preprocess: the Ray Data job: images fanned out to encoders, Parquet per split, ``manifest.json`` last.
    encode: the per-image work: decode, letterbox, one row per expression.
    segmentation: COCO polygons and RLEs, checked, to one compressed RLE.
    schema: the Parquet row schema and the column lists training and evaluation read.
    manifest: what an output holds, where it came from, what was skipped.
    parquet: reading an output back (Ray Dataset, Arrow, or decoded rows).
"""

from pipelines.runtime import lazy_exports

__all__ = ["PreprocessConfig", "ReferDataset", "SyntheticConfig", "generate_synthetic", "read_split", "run_preprocess"]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "PreprocessConfig": "pipelines.data.preprocess",
        "run_preprocess": "pipelines.data.preprocess",
        "read_split": "pipelines.data.parquet",
        "ReferDataset": "pipelines.data.refer",
        "SyntheticConfig": "pipelines.data.synthetic.dataset",
        "generate_synthetic": "pipelines.data.synthetic.dataset",
    },
)
