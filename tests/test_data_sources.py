"""Shards from anywhere, in any standard layout, and bad input that must not stop a run.

Samples are test_data_loader's flat-colour JPEGs (the colour encodes the sample's id), so a test
reads back from the batches which samples it got. Servers are real, on 127.0.0.1.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import fsspec
import fsspec.implementations.memory
import psutil
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from distalex.config import DataConfig
from distalex.data import index
from distalex.data.info import DataError, read_info
from distalex.data.loader import TrainLoader, ValLoader
from distalex.data.read import ReadPolicy, Segment, read_segment
from tests.runs import REPO, launch, tiny_overrides, tiny_shards  # noqa: F401 - fixture
from tests.servers import ShardServer
from tests.test_data_loader import CLASSES, RESIZE, SIZE, dims, epoch_ids, id_jpeg, ids_of, write_shards

SPEC = "imagenet-{split}-{{000000..000003}}.tar"
SIZES = [9, 14, 5, 12]  # 40 samples, uneven


def cfg(spec: str, info: str | None = None, **kw) -> DataConfig:
    kw.setdefault("shuffle_buffer", 8)
    kw.setdefault("workers", 2)
    kw.setdefault("retry_wait_s", 0.01)
    return DataConfig(train_shards=spec, val_shards=spec, info=info, resize=RESIZE, **kw)


@pytest.fixture
def served(tmp_path):
    folder = tmp_path / "shards"
    write_shards(folder, SIZES)
    write_shards(folder, SIZES, split="val")
    server = ShardServer(folder)
    yield folder, server
    server.close()


def trained(loader: TrainLoader, epoch: int = 0):
    """(the epoch's batches, a tiny model's weights after one SGD step per batch)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
        torch.nn.Linear(16, CLASSES),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    batches = []
    for b in loader.epoch(epoch):
        loss = F.cross_entropy(model(b.images.float() / 255), b.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        batches.append((b.images.clone(), b.labels.clone(), int(b.skipped)))
    return batches, model.state_dict()


def assert_same_training(a, b, what: str):
    (batches_a, weights_a), (batches_b, weights_b) = a, b
    assert len(batches_a) == len(batches_b) > 0
    for i, (x, y) in enumerate(zip(batches_a, batches_b)):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]), f"{what}: batch {i} differs"
        assert x[2] == y[2] == 0
    for name, w in weights_a.items():
        assert torch.equal(w, weights_b[name]), f"{what}: {name} differs after training"


# ------------------------------------------------------------------ any URL


def test_http_and_pipe_shards_train_like_the_local_files(served, tmp_path):
    folder, server = served
    spec = SPEC.format(split="train")
    # the _info.json of the remote shards, written by indexing them over HTTP
    info = tmp_path / "remote-info.json"
    index.main([f"{server.url}/{spec}", "--out", str(info), "--no-progress"])
    assert json.loads(info.read_text())["splits"]["train"]["shards"][0]["url"].startswith(server.url)
    sources = {
        "http": cfg(f"{server.url}/{spec}", str(info)),
        "http, info by URL": cfg(f"{server.url}/{spec}", f"{server.url}/_info.json"),
        "pipe": cfg(f"pipe:cat {folder}/{spec}", str(folder / "_info.json")),
    }
    for dp_rank in (0, 1):  # dp=2: the exact per-rank windows hold for streams too
        local = trained(TrainLoader(cfg(str(folder / spec)), dims(2, dp_rank), 8, SIZE, seed=5))
        for what, c in sources.items():
            assert_same_training(local, trained(TrainLoader(c, dims(2, dp_rank), 8, SIZE, seed=5)), what)
    assert server.requests["imagenet-train-000001.tar"] >= 3


@pytest.mark.e2e
def test_torchrun_training_over_http_ends_with_the_local_runs_weights(tiny_shards, tmp_path):
    """The demo shards once from their folder, once from a local HTTP server (data.info by URL)."""
    server = ShardServer(tiny_shards)
    try:
        names = read_info(tiny_shards).splits["train"].shards
        remote = {"data.train_shards": ",".join(f"{server.url}/{n}" for n in names),
                  "data.info": f"{server.url}/_info.json"}
        common = {"train.max_steps": 4, "checkpoint.every_steps": 0, "run_name": "h"}
        models = {}
        for what, extra in (("local", {}), ("http", remote)):
            proc = launch(tmp_path / what, tiny_overrides(tiny_shards, **common, **extra))
            assert proc.returncode == 0, f"{what}: exit {proc.returncode}\n{proc.stderr[-4000:]}"
            models[what] = torch.load(tmp_path / what / "runs" / "h" / "model.pt", weights_only=True)["state_dict"]
        assert server.requests[next(iter(names))] >= 1
        for name, w in models["local"].items():
            assert torch.equal(w, models["http"][name]), f"{name} differs"
    finally:
        server.close()


def test_object_store_shards_through_fsspec(served):
    folder, _ = served
    fs = fsspec.filesystem("memory")
    for p in folder.iterdir():
        fs.pipe(f"/shards/{p.name}", p.read_bytes())
    spec = SPEC.format(split="train")
    local = trained(TrainLoader(cfg(str(folder / spec), workers=0), dims(), 4, SIZE, seed=2))
    remote = cfg(f"memory://shards/{spec}", "memory://shards/_info.json", workers=0)
    assert_same_training(local, trained(TrainLoader(remote, dims(), 4, SIZE, seed=2)), "memory://")


def test_remote_shards_without_info_or_reader_are_clear_errors(served):
    _, server = served
    with pytest.raises(DataError, match="remote shards need data.info"):
        TrainLoader(cfg(f"{server.url}/{SPEC.format(split='train')}"), dims(), 4, SIZE, 0)
    with pytest.raises(DataError, match="no reader for nosuchscheme://"):
        TrainLoader(cfg("nosuchscheme://bucket/a.tar", f"{server.url}/_info.json"), dims(), 4, SIZE, 0)
    with pytest.raises(DataError, match="nope/_info.json: cannot read _info.json: curl exited with status 22"):
        TrainLoader(cfg(f"{server.url}/{SPEC.format(split='train')}", f"{server.url}/nope/_info.json"), dims(), 4, SIZE, 0)
    with pytest.raises(DataError, match="not listed under split 'train'"):
        TrainLoader(cfg(f"{server.url}/other.tar", f"{server.url}/_info.json"), dims(), 4, SIZE, 0)


def test_dropped_connection_is_retried_and_loses_nothing(served):
    folder, server = served
    spec = SPEC.format(split="val")
    name = "imagenet-val-000001.tar"
    server.drops[name] = 2  # the first two reads of this shard break off halfway
    val = list(ValLoader(cfg(f"{server.url}/{spec}", f"{server.url}/_info.json", workers=1), dims(), 8, SIZE, False))
    assert server.requests[name] == 3
    assert sorted(sum((ids_of(b.images) for b in val), [])) == list(range(40))
    assert int(val[-1].skipped) == 0


def test_connection_that_keeps_dropping_or_a_missing_shard_is_counted_as_skipped(served):
    folder, server = served
    spec = SPEC.format(split="val")
    server.drops["imagenet-val-000001.tar"] = 100  # shard 1: ids 9..22, always cut in half
    (folder / "imagenet-val-000003.tar").unlink()  # shard 3: ids 28..39, HTTP 404
    c = cfg(f"{server.url}/{spec}", f"{server.url}/_info.json", workers=1, retries=2)
    val = list(ValLoader(c, dims(), 8, SIZE, False))
    seen = sorted(sum((ids_of(b.images) for b in val), []))
    assert server.requests["imagenet-val-000001.tar"] == 3 and server.requests["imagenet-val-000003.tar"] == 3
    lost = sorted(set(range(40)) - set(seen))
    cut = [i for i in lost if i < 28]
    assert cut and cut == list(range(cut[0], 23)), "only the tail of the broken shard is lost"
    assert lost[len(cut):] == list(range(28, 40))
    assert int(val[-1].skipped) == len(lost)
    # training keeps its step count: the shortfall is made up from the rank's own samples
    server.drops["imagenet-train-000001.tar"] = 100
    (folder / "imagenet-train-000003.tar").unlink()
    c = cfg(f"{server.url}/{SPEC.format(split='train')}", f"{server.url}/_info.json", workers=1, retries=1)
    ld = TrainLoader(c, dims(), 4, SIZE, seed=0)
    batches = list(ld.epoch(0))
    assert len(batches) == ld.steps_per_epoch == 10 and int(batches[-1].skipped) >= len(lost)


class StallingFile(io.RawIOBase):
    """A store's file that sends its first ``upto`` bytes, then nothing: the read blocks, as a
    stalled connection does, until the file is closed."""

    def __init__(self, data: bytes, upto: int):
        super().__init__()
        self.data, self.upto, self.pos, self.closed_event = data, upto, 0, threading.Event()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.pos >= self.upto:
            self.closed_event.wait()
            return b""
        chunk = self.data[self.pos : min(self.upto, self.pos + (n if n > 0 else self.upto))]
        self.pos += len(chunk)
        return chunk

    def close(self) -> None:
        self.closed_event.set()
        super().close()


class StallingFS(fsspec.implementations.memory.MemoryFileSystem):
    """memory:// whose files stall half way. No real object store runs here, and a stall is a
    fault a real one shows only at random: the fault is injected in the backend, the reader is ours."""

    protocol = "stalling"
    store, pseudo_dirs = {}, [""]

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("stalling://"))

    def _open(self, path, mode="rb", **kwargs):
        data = super()._open(path, mode, **kwargs).read()
        return StallingFile(data, len(data) // 2)


def read_with_stall(url: str, count: int, stall_s: float) -> tuple[list[str], list[tuple[int, str]], float]:
    lost: list[tuple[int, str]] = []
    t0 = time.monotonic()
    keys = [k for k, _ in read_segment(Segment(url, 0, count), lambda n, why: lost.append((n, why)),
                                       ReadPolicy(retries=1, wait_s=0.01, stall_s=stall_s))]
    return keys, lost, time.monotonic() - t0


def test_a_stalled_pipe_or_fsspec_read_fails_within_the_stall_timeout_and_is_retried(served):
    """data.stall_timeout_s holds for every remote scheme: a stream that stops sending half way is
    given up after stall_s, retried once (it stalls again), and the rest of the shard is counted as
    lost; the command behind a pipe: is ended, nothing is left running."""
    folder, _ = served
    name = "imagenet-val-000001.tar"
    shard = folder / name
    half = shard.stat().st_size // 2
    full = [k for k, _ in read_segment(Segment(str(shard), 0, SIZES[1]), lambda n, why: None)]
    fsspec.register_implementation("stalling", StallingFS, clobber=True)
    StallingFS().pipe(f"/shards/{name}", shard.read_bytes())
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    for url in (f"pipe:head -c {half} {shard}; exec sleep 60", f"stalling://shards/{name}"):
        keys, lost, took = read_with_stall(url, SIZES[1], stall_s=0.5)
        assert 0 < len(keys) < SIZES[1] and keys == full[: len(keys)], url
        assert lost == [(SIZES[1] - len(keys), lost[0][1])] and "no data for 0.5 s (data.stall_timeout_s)" in lost[0][1]
        assert took < 0.5 * 2 + 2.0, f"{url}: {took:.1f} s for two stalls of 0.5 s"
    time.sleep(0.2)
    assert {p.pid for p in psutil.Process().children(recursive=True)} - before == set(), "a stalled command lives on"


def test_sbatch_preflight_reads_remote_shards_with_data_info(served, tmp_path):
    """The preflight of launch/slurm/train.sbatch (distalex.preflight, run as the script runs it) on
    remote shards: without data.info the shards cannot be counted (exit status 2), with it they pass."""
    folder, _ = served
    spec = f"pipe:cat {folder}/{SPEC}"
    args = ["--config", str(REPO / "configs" / "demo.yaml"), "--set", f"data.train_shards={spec.format(split='train')}",
            "--set", f"data.val_shards={spec.format(split='val')}", "--set", "model.num_classes=3"]

    def run(*extra):
        return subprocess.run([sys.executable, "-m", "distalex.preflight", "--world", "2", *args, *extra],
                              capture_output=True, text=True, timeout=120)

    without = run()
    assert without.returncode == 2 and "remote shards need data.info" in without.stderr, without.stderr
    with_info = run("--set", f"data.info={folder / '_info.json'}")
    assert with_info.returncode == 0, with_info.stderr
    assert f"preflight ok: run demo, dp=1 x tp=2, {sum(SIZES)} training images in 4 shards" in with_info.stderr


# ------------------------------------------------------------------ foreign layouts


def test_shardwriter_shards_train_after_index(tmp_path):
    out = tmp_path / "wds"
    out.mkdir()
    with wds.ShardWriter(str(out / "train-%06d.tar"), maxcount=7, verbose=0) as sink:
        for i in range(30):
            sink.write({"__key__": f"sample{i:06d}", "jpg": id_jpeg(i), "cls": i % CLASSES})
    spec = str(out / "train-{000000..000004}.tar")
    with pytest.raises(DataError, match="distalex.data.index"):
        read_info(spec)  # what train.py needs for the classes
    index.main([spec, "--no-progress"])
    info = read_info(spec)
    assert info.classes == [str(c) for c in range(CLASSES)]
    assert list(info.splits["train"].shards.values()) == [7, 7, 7, 7, 2]
    ids, _ = epoch_ids(TrainLoader(cfg(spec), dims(), 5, SIZE, seed=0), 0)
    assert sorted(sum(ids, [])) == list(range(30))


def test_gnu_tar_of_a_folder_trains_after_index(tmp_path):
    src = tmp_path / "folder"
    src.mkdir()
    for i in range(20):
        (src / f"s{i:05d}.jpg").write_bytes(id_jpeg(i))
        (src / f"s{i:05d}.cls").write_text(str(i % CLASSES))
    (src / "README").write_text("a stray file: no extension, so no sample")
    shard = tmp_path / "shard.tar"
    # --sort=name keeps a sample's files adjacent (readdir order would not)
    subprocess.run(["tar", "--sort=name", "-cf", str(shard), "-C", str(src), "."], check=True)
    index.main([str(shard), "--no-progress"])
    info = read_info(str(shard))
    assert info.splits["train"].shards == {"shard.tar": 20}
    assert json.loads((tmp_path / "_info.json").read_text())["splits"]["train"]["stray_members"] == 1
    ids, batches = epoch_ids(TrainLoader(cfg(str(shard), workers=1), dims(), 4, SIZE, seed=0), 0)
    assert sorted(sum(ids, [])) == list(range(20))
    assert int(batches[-1].skipped) == 1, "the README member is skipped and counted"


def test_png_webp_images_and_json_labels(tmp_path):
    shard = tmp_path / "mixed-000000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i in range(12):
            img = Image.open(io.BytesIO(id_jpeg(i))).convert("RGBA" if i % 3 == 2 else "RGB")
            buf = io.BytesIO()
            fmt = ("PNG", "WEBP", "PNG")[i % 3]
            img.save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
            sink.write({"__key__": f"k{i:03d}", fmt.lower(): buf.getvalue(),
                        "json": json.dumps({"y": i % CLASSES, "caption": "x"}).encode()})
    index.main([str(shard), "--label-key", "y", "--no-progress"])
    c = cfg(str(shard), workers=0, label_key="y")
    ids, _ = epoch_ids(TrainLoader(c, dims(), 4, SIZE, seed=0), 0)  # labels checked against the ids
    assert sorted(sum(ids, [])) == list(range(12))


# ------------------------------------------------------------------ bad input


def tar_of(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def good(i: int) -> list[tuple[str, bytes]]:
    return [(f"s{i:05d}.jpg", id_jpeg(i)), (f"s{i:05d}.cls", str(i % CLASSES).encode())]


def test_each_bad_sample_is_skipped_counted_and_named(tmp_path, caplog):
    bad = [
        ("README", b"no extension"),  # a member in no sample
        ("b1.bmp", b"BM..."), ("b1.cls", b"1"),  # an unknown image extension
        ("b2.jpg", id_jpeg(50)),  # no label
        ("b3.cls", b"2"),  # no image
        ("b4.jpg", b"\xff\xd8 not a jpeg"), ("b4.cls", b"3"),  # undecodable
        ("b5.jpg", id_jpeg(51)), ("b5.cls", b"99"),  # label outside the classes
        ("b6.jpg", id_jpeg(52)), ("b6.cls", b"seven"),  # label not an integer
        ("b7.jpg", id_jpeg(53)), ("b7.json", b"{not json"),  # broken json label
    ]
    members = good(0) + good(1) + bad + good(2) + good(3)
    tar_of(tmp_path / "imagenet-val-000000.tar", members)
    classes = [f"c{k}" for k in range(CLASSES)]
    info = {"classes": classes, "splits": {"val": {"count": 11, "shards": [{"name": "imagenet-val-000000.tar", "count": 11}]}}}
    (tmp_path / "_info.json").write_text(json.dumps(info))
    with caplog.at_level(logging.WARNING, logger="distalex.data"):
        val = list(ValLoader(cfg(str(tmp_path), workers=0), dims(), 8, SIZE, False))
    assert sorted(sum((ids_of(b.images) for b in val), [])) == [0, 1, 2, 3]
    assert int(val[-1].skipped) == 8
    log = caplog.text
    for words in ("'README' has no extension", "'b1' has ['bmp', 'cls']", "'b2' has ['jpg']", "'b3' has ['cls']",
                  "b4: UnidentifiedImageError", "label 99 outside 0..4", "cls b'seven' is not an integer",
                  "json member is not valid JSON"):
        assert words in log, words


def test_zero_byte_and_unreadable_shards(tmp_path, capsys):
    write_shards(tmp_path, [6, 6])
    (tmp_path / "imagenet-train-000002.tar").write_bytes(b"")
    spec = str(tmp_path / "imagenet-train-{000000..000002}.tar")
    with pytest.raises(DataError, match="000002.tar: not a readable tar"):  # not listed: cannot be counted
        TrainLoader(cfg(spec), dims(), 4, SIZE, 0)
    index.main([spec, "--no-progress"])  # lists it with 0 samples, and says so
    assert "000002.tar: ReadError" in capsys.readouterr().err
    assert read_info(spec).splits["train"].shards["imagenet-train-000002.tar"] == 0
    assert sorted(sum(epoch_ids(TrainLoader(cfg(spec), dims(), 4, SIZE, 0), 0)[0], [])) == list(range(12))
    # every shard a worker owns is unreadable: one clear line, not a traceback from the worker
    for name in ("imagenet-train-000000.tar", "imagenet-train-000001.tar"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(DataError, match="no readable sample") as e:
        list(TrainLoader(cfg(str(tmp_path / "imagenet-train-{000000..000001}.tar")), dims(), 4, SIZE, 0).epoch(0))
    assert "\n" not in str(e.value)
    with pytest.raises(SystemExit) as exit_:
        index.main([spec, "--no-progress"])
    assert exit_.value.code == 2 and "no readable sample in 3 shards" in capsys.readouterr().err


def test_plain_tar_files_read_as_tarfile_reads_them(tmp_path):
    """read.py's own header reader (plain ustar files) against tarfile, which reads everything else:
    the same samples, stray members and errors for ustar, GNU and pax files (long and non-ASCII
    names, directories, empty members, metadata), truncated at every few hundred bytes, and with a
    byte flipped anywhere in the headers."""
    from distalex.data.read import _samples, _tarfile_members, tar_samples
    from distalex.data.tar import plain_members

    def read(path: Path, plain: bool):
        """(samples, skips, error) of a whole file: ours (seekable), or tarfile alone."""
        got, skips = [], []
        try:
            with open(path, "rb") as f:
                if plain:
                    samples = tar_samples(str(path), f, True, 0, 1 << 30, {"jpg", "cls"}, lambda n, why: skips.append(why))
                else:
                    tf = tarfile.open(fileobj=f, mode="r:*")
                    samples = _samples(str(path), _tarfile_members(tf), 0, 1 << 30, {"jpg", "cls"},
                                       lambda n, why: skips.append(why))
                for index_, key, members in samples:
                    got.append((index_, key, {e: None if d is None else bytes(d) for e, d in members.items()}))
        except (OSError, EOFError, tarfile.TarError) as e:
            return got, skips, type(e).__name__
        return got, skips, None

    members = good(0) + [("dir/", b""), ("README", b"x"), ("__meta__.json", b"{}"), ("s00001.jpg", b""),
                         ("s00001.cls", b"1"), ("s00001.txt", b"t" * 700)] + good(2)
    members += [("p/" * 60 + "s00003.jpg", id_jpeg(3)), ("p/" * 60 + "s00003.cls", b"3"), ("é00004.jpg", id_jpeg(4))]
    compared = 0
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        whole = tmp_path / f"format-{fmt}.tar"
        with tarfile.open(whole, "w", format=fmt) as tf:
            for name, data in members:
                ti = tarfile.TarInfo(name.rstrip("/"))
                ti.type, ti.size = (tarfile.DIRTYPE, 0) if name.endswith("/") else (tarfile.REGTYPE, len(data))
                tf.addfile(ti, io.BytesIO(data))
        raw = whole.read_bytes()
        want = read(whole, plain=False)
        assert read(whole, plain=True) == want and len(want[0]) == 5 and want[2] is None, fmt
        if fmt == tarfile.USTAR_FORMAT:  # read by our reader, not handed to tarfile
            with open(whole, "rb") as f:
                assert [name for name, _, _ in plain_members(f)][-1] == "é00004.jpg"
        variants = [raw[:cut] for cut in range(0, len(raw), 211)]
        variants += [raw[:pos] + bytes([raw[pos] ^ 0x5A]) + raw[pos + 1:] for pos in range(0, 5120, 29)]
        cut = tmp_path / "variant.tar"
        for i, data in enumerate(variants):
            cut.write_bytes(data)
            assert read(cut, plain=True) == read(cut, plain=False), (fmt, i)
            compared += 1
    assert compared > 300


# ------------------------------------------------------------------ index


def test_index_classes_names_stats_and_splits(tmp_path, capsys):
    write_shards(tmp_path / "s", [7, 5])
    write_shards(tmp_path / "s", [4], split="val")
    (tmp_path / "s" / "_info.json").unlink()
    mapping = tmp_path / "LOC_synset_mapping.txt"
    mapping.write_text("".join(f"n{k:08d} class number {k}, the {k}th\n" for k in range(CLASSES)))
    out = tmp_path / "meta" / "info.json"
    index.main([str(tmp_path / "s" / "imagenet-train-*.tar"), "--out", str(out), "--classes", str(mapping),
                "--stats", "6", "--no-progress"])
    index.main([str(tmp_path / "s" / "imagenet-val-*.tar"), "--split", "val", "--out", str(out), "--no-progress"])
    info = read_info("unused", str(out))
    assert info.classes == [f"n{k:08d}" for k in range(CLASSES)]
    assert info.class_names[3] == "class number 3, the 3th"
    assert info.count("train") == 12 and info.count("val") == 4
    assert info.stats["samples"] == 6 and len(info.stats["mean_rgb"]) == 3
    assert (tmp_path / "meta" / info.stats["mean_image"]).is_file()
    short = tmp_path / "two.txt"
    short.write_text("a\nb\n")
    with pytest.raises(SystemExit) as e:
        index.main([str(tmp_path / "s" / "imagenet-train-*.tar"), "--out", str(out), "--classes", str(short), "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "label 4, but the class list has 2 classes" in err and err.count("\n") == 1
