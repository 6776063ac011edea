"""tf.data pipeline: batch contents, preprocessing parity, determinism, sharding and resume."""

import io
import os

import numpy as np
import pytest
from PIL import Image
from tiny_tokenizer import save_tiny_tokenizer

from pairuni_jax import files
from pairuni_jax.data import pairug, pipeline
from pairuni_jax.processing import JanusProcessor, preprocess_image

N_PAIRS = 21
SIZE, N_IMG = 32, 4


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    save_tiny_tokenizer(path)
    return JanusProcessor.from_pretrained(path, image_size=SIZE, num_image_tokens=N_IMG)


def write_dataset(root, n=N_PAIRS, seed=0):
    """n pairs with images of mixed sizes and formats, questions of varied length."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        h, w = rng.integers(20, 90, size=2)
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        ext = "jpg" if i % 2 else "png"
        Image.fromarray(pixels).save(root / f"img/{i}.{ext}")
        options = ["red", "blue", "green", "yellow"][: 2 + i % 3]
        question = pairug.format_mc_question("What colour is the circle " * (1 + i % 4), options)
        records.append(pairug.PairRecord(
            similarity=1.0 if i % 3 == 0 else round(0.6 + i / 100, 3),
            pair_type="aligned" if i % 3 == 0 else "retrieved",
            generate_ann=pairug.GenerationAnn(f"img/{i}.{ext}", "a red circle " * (1 + i % 5),
                                              f"g{i % 2}"),
            understand_ann=pairug.UnderstandingAnn(f"img/{i}.{ext}", question,
                                                   "ABCD"[i % len(options)], f"u{i % 3}"),
        ))
    path = root / "pairs.jsonl"
    pairug.write_pairug(str(path), records)
    return str(path)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return pipeline.JsonlPairSource(write_dataset(tmp_path_factory.mktemp("data")))


def make(source, processor, **kw):
    cfg = dict(pairs_per_batch=4, seed=0, bucket_multiple=16)
    cfg.update(kw)
    return pipeline.PairPipeline(source, processor, pipeline.PipelineConfig(**cfg))


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_batch_contents(source, processor):
    p = make(source, processor)
    assert p.batches_per_epoch == 5 and p.dropped_per_epoch == 1
    batch = next(iter(p))
    P = 4
    assert batch["pixel_values"].shape == (P, SIZE, SIZE, 3)
    assert batch["pixel_values"].dtype == np.float32
    lu, lg = batch["und_ids"].shape[1], batch["gen_ids"].shape[1]
    assert lu % 16 == 0 and lg % 16 == 0
    for key, shape, dtype in [
        ("index", (P,), np.int64), ("und_mask", (P, lu), bool), ("und_image_mask", (P, lu), bool),
        ("und_answer_index", (P,), np.int32), ("gen_mask", (P, lg), bool),
        ("gen_uncond_ids", (P, lg), np.int32), ("pair_type", (P,), np.int32),
        ("similarity", (P,), np.float32), ("und_ids", (P, lu), np.int32),
    ]:
        assert batch[key].shape == shape and batch[key].dtype == dtype, key
    arrays, texts = pipeline.split_text(batch)
    assert set(texts) == set(pipeline.TEXT_KEYS) and all(v.dtype == object for v in texts.values())
    assert all(v.dtype != object for v in arrays.values())
    for row, index in enumerate(batch["index"]):
        rec = source.record(int(index))
        # pixels equal the processor's own preprocessing of the decoded file
        with Image.open(f"{source.root}/{rec.understand_ann.image_path}") as im:
            assert np.array_equal(batch["pixel_values"][row], processor.preprocess_image(im))
        und = processor.understanding_ids(rec.understand_ann.question)
        assert batch["und_ids"][row, lu - len(und):].tolist() == und  # left padded
        assert batch["und_mask"][row].sum() == len(und) and batch["und_mask"][row, -1]
        assert (batch["und_ids"][row][~batch["und_mask"][row]] == processor.pad_id).all()
        assert batch["und_image_mask"][row].sum() == N_IMG
        gen = processor.generation_ids(rec.generate_ann.prompt)
        assert batch["gen_ids"][row, lg - len(gen):].tolist() == gen
        assert batch["gen_uncond_ids"][row, lg - len(gen):].tolist() == (
            processor.unconditional_ids(gen))
        assert batch["gen_prompt"][row] == rec.generate_ann.prompt
        assert batch["und_answer"][row] == rec.understand_ann.answer
        assert batch["und_answer_index"][row] == "ABCD".index(rec.understand_ann.answer)
        assert batch["und_num_options"][row] == len(pairug.mc_options(rec.understand_ann.question))
        assert pairug.PAIR_TYPES[batch["pair_type"][row]] == rec.pair_type
        assert batch["similarity"][row] == np.float32(rec.similarity)
        assert batch["und_tag"][row] == rec.understand_ann.tag
        assert batch["gen_tag"][row] == rec.generate_ann.tag


def test_deterministic_by_seed_and_epoch(source, processor):
    a = take(make(source, processor).iterator(), 10)  # two epochs
    b = take(make(source, processor).iterator(), 10)
    for x, y in zip(a, b, strict=True):
        assert_same(x, y)
    epoch0 = np.concatenate([x["index"] for x in a[:5]])
    epoch1 = np.concatenate([x["index"] for x in a[5:]])
    assert len(set(epoch0.tolist())) == 20 and not np.array_equal(epoch0, epoch1)
    other = take(make(source, processor, seed=1).iterator(), 5)
    other = np.concatenate([x["index"] for x in other])
    assert not np.array_equal(epoch0, other)


def test_batches_do_not_depend_on_the_number_of_decode_threads(source, processor):
    one, autotuned, fast = (take(make(source, processor, **kw).iterator(), 3) for kw in (
        {"num_parallel_calls": 1}, {}, {"num_parallel_calls": 3, "fast_resize": True}))
    for x, y, z in zip(one, autotuned, fast, strict=True):
        assert_same(x, y)
        assert np.array_equal(x["index"], z["index"])


def test_resume_yields_exactly_the_uninterrupted_batches(source, processor):
    full = take(make(source, processor).iterator(), 12)
    for stop in (3, 5, 7):  # mid-epoch, at the epoch boundary, in the second epoch
        it = make(source, processor).iterator()
        take(it, stop)
        state = it.state()
        resumed = make(source, processor).iterator(state)
        for x, y in zip(full[stop:], take(resumed, 12 - stop), strict=True):
            assert_same(x, y)


def test_state_from_another_configuration_is_refused(source, processor):
    it = make(source, processor).iterator()
    next(it)
    with pytest.raises(ValueError, match="seed=0"):
        make(source, processor, seed=1).iterator(it.state())


def test_hosts_read_disjoint_equal_shards(source, processor):
    shards = []
    for index in range(2):
        p = make(source, processor, pairs_per_batch=2, process_index=index, process_count=2)
        assert p.batches_per_epoch == 5
        shards.append(np.concatenate([b["index"] for b in take(p.iterator(), 5)]))
    assert len(shards[0]) == len(shards[1]) == 10
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    with pytest.raises(ValueError, match="process_index"):
        make(source, processor, process_index=2, process_count=2)


def test_buckets_and_epochs(source, processor):
    p = make(source, processor, und_buckets=(8, 2000), gen_buckets=(64,), num_epochs=1)
    batches = list(p.iterator())
    assert len(batches) == 5
    assert {b["und_ids"].shape[1] for b in batches} == {2000}
    assert {b["gen_ids"].shape[1] for b in batches} == {64}
    with pytest.raises(ValueError, match="exceeds the largest bucket 8"):
        next(make(source, processor, gen_buckets=(8,)).iterator())
    assert pipeline.bucket_length(65, None, 64, "x") == 128


def test_too_few_pairs_for_one_batch(source, processor):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        make(source, processor, pairs_per_batch=8, process_count=4)


def test_tfds_source_gives_the_same_batches(source, processor, tmp_path):
    from pairuni_jax.data import tfds_pairug

    builder = tfds_pairug.PairUG(data_dir=str(tmp_path / "tfds"), jsonl_path=source.name)
    builder.download_and_prepare()
    tfds_source = pipeline.open_source(str(tmp_path / "tfds"))
    assert isinstance(tfds_source, tfds_pairug.TfdsPairSource) and len(tfds_source) == N_PAIRS
    assert [tfds_source.record(i) for i in range(N_PAIRS)] == source.records
    for x, y in zip(take(make(source, processor).iterator(), 6),
                    take(make(tfds_source, processor).iterator(), 6), strict=True):
        assert_same(x, y)


def test_a_dataset_in_a_bucket_gives_the_same_batches(source, processor):
    """The same files under a URL (tf.io.gfile's in-memory ram://, served like gs://)."""
    import shutil
    import uuid

    bucket = f"ram://pairug-{uuid.uuid4().hex[:8]}"
    with files.local_directory(bucket) as staging:  # uploaded when the block ends
        shutil.copytree(os.path.dirname(source.name), staging, dirs_exist_ok=True)
    remote = pipeline.open_source(f"{bucket}/pairs.jsonl")
    assert remote.root == bucket and remote.records == source.records
    for x, y in zip(take(make(source, processor).iterator(), 6),
                    take(make(remote, processor).iterator(), 6), strict=True):
        assert_same(x, y)
    checked = pairug.read_pairug(f"{bucket}/pairs.jsonl", check_images=True)  # `validate`
    assert checked.records == source.records and not checked.errors
    with pytest.raises(ValueError, match="outside the dataset root"):
        pairug.resolve_image_path("img/../../x.png", bucket)


def test_tfds_builder_validates_its_input(tmp_path):
    from pairuni_jax.data import tfds_pairug

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"similarity": 2}\n')
    builder = tfds_pairug.PairUG(data_dir=str(tmp_path / "tfds"), jsonl_path=str(bad))
    with pytest.raises(pairug.RecordError, match="bad.jsonl:1"):
        builder.download_and_prepare()


def test_image_broken_after_validation_names_file_line_field(processor, tmp_path):
    path = write_dataset(tmp_path, n=4)
    src = pipeline.JsonlPairSource(path)
    (tmp_path / src.record(2).understand_ann.image_path).write_bytes(b"garbage")
    p = make(src, processor, num_epochs=1)
    with pytest.raises(Exception, match=r"pairs.jsonl:3: field 'understand_ann.image_path'"):
        list(p.iterator())


def encoded(image, fmt):
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("mode, fmt", [
    ("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG"), ("RGBA", "PNG"),
    ("P", "PNG"), ("LA", "PNG"),
])
def test_preprocess_encoded_is_bit_identical_to_preprocess_image(mode, fmt):
    rng = np.random.default_rng(0)
    for h, w in [(20, 90), (90, 20), (45, 45), (7, 13), (64, 48)]:  # up- and downscaled, tiny
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        data = encoded(Image.fromarray(pixels).convert(mode), fmt)
        with Image.open(io.BytesIO(data)) as im:
            reference = preprocess_image(im, SIZE)
        ours = pipeline.preprocess_encoded(data, SIZE)
        assert ours.dtype == np.float32
        assert np.array_equal(ours.view(np.uint32), reference.view(np.uint32)), (h, w)


def test_scale_pixels_is_bit_identical_to_preprocess_image_for_every_byte():
    every_byte = (np.arange(16 * 16 * 3) % 256).astype(np.uint8).reshape(16, 16, 3)
    reference = preprocess_image(every_byte, 16)  # 16 x 16 at size 16: no resize, no padding
    ours = pipeline.scale_pixels(every_byte)
    assert ours.dtype == np.float32
    assert np.array_equal(ours.view(np.uint32), reference.view(np.uint32))


def test_fast_resize_is_close_to_exact():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((1600, 1200), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    exact = pipeline.preprocess_encoded(buf.getvalue(), 384)
    fast = pipeline.preprocess_encoded(buf.getvalue(), 384, fast=True)
    assert exact.shape == fast.shape == (384, 384, 3)
    assert 0 < np.abs(exact - fast).mean() < 2 / 127.5  # under 2 of 255 levels on average
    pad = exact[0, 0]
    assert (fast[:48] == pad).all() and (exact[:48] == pad).all()  # the same geometry: 384 x 288
    assert not (fast[48:336] == pad).all(axis=(1, 2)).any()  # image rows 48..335
    png = io.BytesIO()
    Image.fromarray(small).save(png, "PNG")  # nothing to gain below the target size: identical
    assert np.array_equal(pipeline.preprocess_encoded(png.getvalue(), 384),
                          pipeline.preprocess_encoded(png.getvalue(), 384, fast=True))
