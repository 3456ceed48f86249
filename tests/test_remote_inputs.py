"""Inputs given as fsspec URLs (``memory://``, ``file://``; s3://, gs://... read the same way):
the bundle is the local merge's, byte for byte, whatever runs the jobs (in process, ``--jobs 2``'s
forked workers, a Dask cluster whose workers open the URLs themselves); Hugging Face folders by
URL keep their configs; files are read by byte range (a tensor's read fetches that tensor, never
the file); ``unipack add`` takes a URL; globbed URLs expand; and a bad URL (missing object,
unknown protocol, no fsspec, a .bin, a pattern matching nothing) is one clear line, nothing written."""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TensorSpec, assert_one_line_error, make_values, run, standard_specs, write_population
from safetensors.numpy import save_file as save_numpy

import unipack
from unipack.errors import InputError
from unipack.sources import Url, open_source
from unipack.sources import remote as remote_module

fsspec = pytest.importorskip("fsspec")
from fsspec.implementations.memory import MemoryFileSystem  # noqa: E402

SPECS = {
    **standard_specs(),
    "head.weight": TensorSpec((3, 12), kind="head"),  # shapes differ: raw per member
    "blocks.0.weight": TensorSpec((64, 96), kind="right", rank=3, scale=0.05),
}

_roots = itertools.count()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class CountingFS(MemoryFileSystem):
    """``countmem://``: a memory filesystem of its own that counts what is read, and how."""

    protocol = "countmem"
    store: dict[str, Any] = {}
    pseudo_dirs = [""]
    ranges: list[tuple[int, int]] = []  # (start, bytes) of every ranged read
    streams = 0  # files opened for reading (whole-file streams)

    @classmethod
    def _strip_protocol(cls, path: str) -> str:  # the memory filesystem's strips memory:// only
        if path.startswith("countmem://"):
            path = "memory://" + path[len("countmem://") :]
        return super()._strip_protocol(path)  # type: ignore[no-any-return]

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        data = super().cat_file(path, start=start, end=end, **kwargs)
        type(self).ranges.append((start or 0, len(data)))
        return data

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "r" in mode:
            type(self).streams += 1
        return super()._open(path, mode, **kwargs)


fsspec.register_implementation("countmem", CountingFS, clobber=True)


class ForkShyFS(MemoryFileSystem):
    """``forkshy://``: a memory filesystem that, like fsspec's asynchronous ones (s3fs, gcsfs),
    refuses to read in a process other than the one that made it (a forked child)."""

    protocol = "forkshy"
    store: dict[str, Any] = {}
    pseudo_dirs = [""]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.made_in = os.getpid()

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        if path.startswith("forkshy://"):
            path = "memory://" + path[len("forkshy://") :]
        return super()._strip_protocol(path)  # type: ignore[no-any-return]

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        if self.made_in != os.getpid():
            raise RuntimeError("This class is not fork-safe")
        return super().cat_file(path, start=start, end=end, **kwargs)  # type: ignore[no-any-return]


fsspec.register_implementation("forkshy", ForkShyFS, clobber=True)


def upload(paths: list[Path], protocol: str = "memory") -> list[str]:
    """Each local file or folder copied under a fresh root of ``protocol``; their URLs, in order."""
    fs = fsspec.filesystem(protocol)
    root = f"/unipack-test-{next(_roots)}"
    urls = []
    for p in paths:
        files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file())
        for f in files:
            fs.pipe(f"{root}/{f.relative_to(p.parent)}", f.read_bytes())
        urls.append(f"{protocol}://{root.lstrip('/')}/{p.name}")
    return urls


@pytest.fixture(scope="module")
def pop(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return write_population(tmp_path_factory.mktemp("remote") / "in", SPECS, n=4, seed=11)


@pytest.fixture(autouse=True)
def _clean_memory() -> Iterator[None]:
    yield
    for cls in (MemoryFileSystem, CountingFS, ForkShyFS):
        for key in [k for k in cls.store if k.startswith("/unipack-test-")]:
            cls.store.pop(key, None)


# ------------------------------------------------------------------------------------------
# the local merge's bundle, byte for byte
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("jobs", "options"),
    [
        (1, {}),  # default rule, lossless baseline streamed from the URLs
        (2, {}),  # forked workers: each reopens the filesystem
        (1, {"lossless": "sample", "max_error": 0.1}),
        (2, {"exact_tier": True, "lossless": "full"}),
    ],
)
def test_urls_give_the_local_bundle_byte_for_byte(pop, tmp_path: Path, jobs: int, options: dict) -> None:
    urls = upload(pop.paths)
    local, remote = tmp_path / "local.upk", tmp_path / "remote.upk"
    unipack.merge(pop.paths, local, jobs=1, **options)
    result = unipack.merge(urls, remote, jobs=jobs, **options)
    assert digest(local) == digest(remote)
    assert [m.name for m in result.manifest.members] == pop.names
    assert [m.source for m in result.manifest.members] == [p.name for p in pop.paths]  # names, not URLs
    assert "memory:" not in remote.read_bytes().decode("latin-1")  # no URL leaks into the bundle


def test_a_size_target_over_urls_gives_the_local_bundle(pop, tmp_path: Path) -> None:
    """``--size`` (and its per-tensor allocation) over URLs: the same search, the same file."""
    from unipack.pack.size_target import bits_target, merge_to_size

    urls = upload(pop.paths)
    plain = unipack.merge(pop.paths, tmp_path / "plain.upk", jobs=1)
    target = int(plain.file_bytes * 1.3)
    local = merge_to_size(pop.paths, tmp_path / "local.upk", target, jobs=1)
    remote = merge_to_size(urls, tmp_path / "remote.upk", target, jobs=1)
    assert remote.file_bytes <= target
    assert digest(tmp_path / "local.upk") == digest(tmp_path / "remote.upk")
    assert local.file_bytes == remote.file_bytes
    assert bits_target(urls, 2.0) == bits_target(pop.paths, 2.0)


def test_forked_workers_open_the_filesystem_again(pop, tmp_path: Path) -> None:
    """A filesystem made before the fork may not serve the child (fsspec's asynchronous ones do
    not): each --jobs worker opens its own."""
    urls = upload(pop.paths, "forkshy")
    unipack.merge(pop.paths, tmp_path / "local.upk", jobs=1)
    unipack.merge(urls, tmp_path / "forked.upk", jobs=2)
    assert digest(tmp_path / "local.upk") == digest(tmp_path / "forked.upk")


def test_hugging_face_folders_by_url(tmp_path: Path) -> None:
    from test_hf_inputs import write_member

    from unipack.sources.checkpoint import Checkpoint

    values = make_values(SPECS, 3, seed=4)
    kinds = ["single", "hf-single", "hf-sharded"]
    for i in range(3):
        (tmp_path / f"m{i}").mkdir()
    paths = [write_member(kind, v, tmp_path / f"m{i}") for i, (kind, v) in enumerate(zip(kinds, values))]
    urls = upload(paths)
    unipack.merge(paths, tmp_path / "local.upk")
    result = unipack.merge(urls, tmp_path / "remote.upk")
    assert digest(tmp_path / "local.upk") == digest(tmp_path / "remote.upk")
    assert [m.name for m in result.manifest.members] == ["single", "hf-single", "hf-sharded"]
    # the configs, kept as their exact text; the shards, each read from its own URL
    folder = Checkpoint("x", open_source(Url(urls[2])))
    assert folder.configs is not None and set(folder.configs) == {"config.json", "preprocessor_config.json"}
    assert folder.configs["config.json"] == (paths[2] / "config.json").read_text(encoding="utf-8")
    assert len(folder.files) == 3 and all(str(f).startswith(urls[2] + "/model-") for f, _ in folder.files)
    for name in folder.tensors:
        assert np.array_equal(folder.read(name), Checkpoint("y", open_source(paths[2])).read(name))


def test_a_tensor_is_read_by_its_byte_range(tmp_path: Path) -> None:
    big = np.zeros((2048, 2048), np.float32)  # 16 MiB the reads of "small" must never fetch
    small = np.arange(12, dtype=np.float32).reshape(3, 4)
    save_numpy({"big": big, "small": small}, str(tmp_path / "a.safetensors"))
    (url,) = upload([tmp_path / "a.safetensors"], "countmem")
    CountingFS.ranges.clear()
    source = open_source(Url(url))
    assert sum(n for _, n in CountingFS.ranges) <= remote_module.PREFIX_BYTES  # the header, no data
    CountingFS.ranges.clear()
    assert np.array_equal(source.read("small"), small)
    assert CountingFS.ranges == [(8 + _header_length(tmp_path / "a.safetensors") + big.nbytes, small.nbytes)]
    assert CountingFS.streams == 0


def _header_length(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


def test_a_merge_reads_tensors_by_range_and_streams_only_the_baseline(pop, tmp_path: Path) -> None:
    urls = upload(pop.paths, "countmem")
    largest = max(t.numel() * t.element_size() for t in pop.tensors[0].values())
    CountingFS.ranges.clear()
    CountingFS.streams = 0
    unipack.merge(urls, tmp_path / "off.upk", lossless="off")
    assert CountingFS.streams == 0
    assert max(n for _, n in CountingFS.ranges) <= max(largest, remote_module.PREFIX_BYTES)
    unipack.merge(pop.paths, tmp_path / "local.upk", lossless="off")
    assert digest(tmp_path / "off.upk") == digest(tmp_path / "local.upk")
    unipack.merge(urls, tmp_path / "baseline.upk")  # the lossless baseline: each file streamed once
    assert CountingFS.streams == len(urls)


# ------------------------------------------------------------------------------------------
# the command line: merge, globs, add
# ------------------------------------------------------------------------------------------


def test_the_cli_merges_urls_and_url_patterns(pop, tmp_path: Path) -> None:
    urls = upload(pop.paths)
    assert run("merge", *pop.paths, "-o", tmp_path / "local.upk", "-q").exit_code == 0
    r = run("merge", *urls, "-o", tmp_path / "urls.upk", "-q", "--jobs", "2")
    assert r.exit_code == 0, r.output
    pattern = urls[0].rsplit("/", 1)[0] + "/ft*.safetensors"
    r = run("merge", pattern, "-o", tmp_path / "glob.upk", "-q")
    assert r.exit_code == 0, r.output
    assert digest(tmp_path / "local.upk") == digest(tmp_path / "urls.upk") == digest(tmp_path / "glob.upk")
    r = run("merge", *urls, "-o", tmp_path / "named.upk", "-q", "--name", f"{urls[1]}=second")
    assert r.exit_code == 0, r.output
    with unipack.open(tmp_path / "named.upk") as b:
        assert b.members[:2] == [pop.names[0], "second"]


def test_add_takes_a_url(pop, tmp_path: Path) -> None:
    urls = upload(pop.paths)
    unipack.merge(pop.paths[:3], tmp_path / "base.upk")
    assert run("add", tmp_path / "base.upk", pop.paths[3], "-o", tmp_path / "local.upk").exit_code == 0
    r = run("add", tmp_path / "base.upk", urls[3], "-o", tmp_path / "url.upk")
    assert r.exit_code == 0, r.output
    assert digest(tmp_path / "local.upk") == digest(tmp_path / "url.upk")


# ------------------------------------------------------------------------------------------
# bad URLs: one line, exit 1, nothing written
# ------------------------------------------------------------------------------------------


def test_bad_urls_are_one_clear_line(pop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    urls = upload(pop.paths)
    out = tmp_path / "out.upk"
    root = urls[0].rsplit("/", 1)[0]
    torch_file = tmp_path / "w.bin"
    import torch

    torch.save({"w": torch.zeros(2)}, torch_file)
    (bin_url,) = upload([torch_file])
    (tmp_path / "bad.safetensors").write_bytes((10).to_bytes(8, "little") + b"{not json}")
    (bad_url,) = upload([tmp_path / "bad.safetensors"])
    (tmp_path / "bin-folder").mkdir()
    torch.save({"w": torch.zeros(2)}, tmp_path / "bin-folder" / "pytorch_model.bin")
    (bin_folder,) = upload([tmp_path / "bin-folder"])
    cases = [
        ([urls[0], f"{root}/missing.safetensors"], ["missing.safetensors", "no such file or folder"]),
        ([urls[0], "nosuchproto://bucket/a.safetensors"], ["unknown protocol 'nosuchproto'"]),
        ([urls[0], f"{root}/zz*.safetensors"], ["the pattern matches nothing"]),
        ([urls[0], bin_url], ["w.bin", "not a safetensors file"]),
        ([urls[0], root], [root, "without model weights"]),
        ([urls[0], bad_url], [bad_url, "invalid JSON header"]),
        ([urls[0], bin_folder], [bin_folder, "holds pytorch_model.bin", "safetensors weights only"]),
    ]
    for args, mentions in cases:
        assert_one_line_error(run("merge", *args, "-o", out, "-q"), *mentions)
        assert not out.exists()
    monkeypatch.setattr(remote_module, "_fsspec", lambda: None)
    line = assert_one_line_error(run("merge", *urls[:2], "-o", out, "-q"), "needs fsspec", "unipack[remote]")
    assert line.startswith(f"Error: {urls[0]}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "bin-folder", "w.bin"]


def test_a_bundle_by_url_is_refused_by_the_api(pop, tmp_path: Path) -> None:
    unipack.merge(pop.paths[:2], tmp_path / "b.upk")
    (url,) = upload([tmp_path / "b.upk"])
    with pytest.raises(InputError, match="is a unipack bundle"):
        unipack.merge([url, upload([pop.paths[0]])[0]], tmp_path / "c.upk")
    assert not (tmp_path / "c.upk").exists()


# ------------------------------------------------------------------------------------------
# a Dask cluster: its worker processes open file:// URLs themselves
# ------------------------------------------------------------------------------------------


def test_a_dask_cluster_opens_the_urls_itself(pop, tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    # memory:// is one process's memory, which a worker process does not see: file:// URLs here
    urls = [f"file://{p}" for p in pop.paths]
    unipack.merge(pop.paths, tmp_path / "local.upk", jobs=1)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as c:
        result = unipack.merge(urls, tmp_path / "dask.upk", executor="dask", scheduler=c.scheduler_address)
        with distributed.Client(c.scheduler_address, set_as_default=False) as client:
            opened = client.run(lambda: [str(p) for p in __import__("unipack.pack.executors").pack.executors._OPENED])
    assert digest(tmp_path / "local.upk") == digest(tmp_path / "dask.upk")
    assert result.manifest.members[0].source == pop.paths[0].name
    assert set(map(len, opened.values())) == {0}  # the merge is over: no worker holds its inputs


def test_a_worker_refuses_an_object_replaced_since_the_merge_began(pop, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a worker opens by URL must be the object the merge planned on: same size, same version."""

    from unipack.pack import executors
    from unipack.sources.checkpoint import close_all, open_inputs

    monkeypatch.setattr(executors, "_WORKER_READY", True)  # this process is no worker: leave its BLAS be
    urls = upload(pop.paths)
    checkpoints = open_inputs([Url(u) for u in urls], None)
    try:
        inputs = executors.Inputs.of(checkpoints)
    finally:
        close_all(checkpoints)
    assert inputs.paths == tuple(urls)  # the URLs travel, not local paths
    opened = executors.opened(inputs)  # as a worker opens them: the same objects
    assert [str(c.path) for c in opened] == urls
    executors.forget(inputs)
    fs = fsspec.filesystem("memory")
    fs.pipe(urls[0].split("://", 1)[1], pop.paths[0].read_bytes())  # saved again: another version
    with pytest.raises(InputError, match=r"ft0.safetensors: .* bytes version .* where the merge started"):
        executors.opened(inputs)
    assert executors._OPENED == {}
