"""A TFDS builder for PairUG built from a local JSONL file and its images, and a pipeline source
reading it with random access (array_record), so shuffling, sharding and resume work as for JSONL.

    builder = PairUG(data_dir=DIR, jsonl_path="pairs.jsonl", root=None)  # root: JSONL's directory
    builder.download_and_prepare()
    source = TfdsPairSource(DIR)          # -> pipeline.PairPipeline(source, processor, config)

Each example keeps the understanding image's original file bytes (no re-encoding, so pixels equal
the JSONL path's) and every text field; the generation image is referenced by path only (the
training loop generates that side). Optional text fields are stored as "" when absent.
The JSONL is validated on the way in (`pairug.read_pairug`, images checked, errors raise).
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from pairuni_jax.data import pairug


class PairUG(tfds.core.GeneratorBasedBuilder):
    """PairUG pairs: understanding image bytes + both annotations + similarity and pair type."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "PairUG JSONL with explicit pair_type."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's default looks the module up through the `importlib_resources` backport, which
        # is not a dependency here; the answer is simply this file.
        return epath.Path(__file__)

    def __init__(self, *, jsonl_path: str | None = None, root: str | None = None, **kwargs):
        self.jsonl_path, self.root = jsonl_path, root
        kwargs.setdefault("file_format", "array_record")  # random access for the pipeline
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "index": np.int64,
                "similarity": text,  # repr of the float: tf.train.Example floats are float32
                "pair_type": tfds.features.ClassLabel(names=list(pairug.PAIR_TYPES)),
                "understand": {
                    "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # file bytes
                    "image_path": text, "question": text, "answer": text, "tag": text,
                    "prompt": text,
                },
                "generate": {
                    "image_path": text, "prompt": text, "tag": text, "question": text,
                    "answer": text,
                },
            }),
            description="PairUG: paired understanding / generation items (PairUni).",
            disable_shuffling=True,  # keep the JSONL order: example i is line i's record
        )

    def _split_generators(self, dl_manager):
        if not self.jsonl_path:
            raise ValueError("PairUG needs jsonl_path=... to be prepared")
        return {"train": self._generate_examples(self.jsonl_path)}

    def _generate_examples(self, path):
        read = pairug.read_pairug(path, root=self.root, check_images=True)
        for i, r in enumerate(read.records):
            u, g = r.understand_ann, r.generate_ann
            with open(os.path.join(read.root, u.image_path), "rb") as f:
                image = f.read()
            yield i, {
                "index": i,
                "similarity": repr(r.similarity),
                "pair_type": r.pair_type,
                "understand": {
                    "image": image, "image_path": u.image_path, "question": u.question,
                    "answer": u.answer, "tag": u.tag, "prompt": u.prompt or "",
                },
                "generate": {
                    "image_path": g.image_path, "prompt": g.prompt, "tag": g.tag,
                    "question": g.question or "", "answer": g.answer or "",
                },
            }


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


class TfdsPairSource:
    """pipeline.PairSource over a prepared PairUG TFDS directory (random access)."""

    def __init__(self, data_dir: str, split: str = "train"):
        self.builder = PairUG(data_dir=data_dir)
        self.data = self.builder.as_data_source(split)
        self.name = f"tfds:{data_dir}[{split}]"

    def __len__(self) -> int:
        return len(self.data)

    def record(self, index: int) -> pairug.PairRecord:
        ex = self.data[index]
        u, g = ex["understand"], ex["generate"]
        return pairug.PairRecord(
            similarity=float(_text(ex["similarity"])),
            pair_type=pairug.PAIR_TYPES[int(ex["pair_type"])],
            generate_ann=pairug.GenerationAnn(
                _text(g["image_path"]), _text(g["prompt"]), _text(g["tag"]),
                _text(g["question"]) or None, _text(g["answer"]) or None,
            ),
            understand_ann=pairug.UnderstandingAnn(
                _text(u["image_path"]), _text(u["question"]), _text(u["answer"]),
                _text(u["tag"]), _text(u["prompt"]) or None,
            ),
        )

    def understanding_image(self, index: int) -> bytes:
        return bytes(self.data[index]["understand"]["image"])

    def describe(self, index: int) -> str:
        return f"{self.name} example {index}"
