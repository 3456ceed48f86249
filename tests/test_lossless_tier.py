"""The lossless tier (``merge --lossless``, ``extract --exact``; spec §9).

Round trips are checked by sha256 of every tensor's bytes against the input files as the
reference safetensors loader reads them; the per-tensor coding choice against an independent
byte-plane + zstd computation; the codec on every special bit pattern of fp32, fp16 and bf16.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from conftest import TensorSpec, blob_range, flip_byte, run, standard_specs, write_population
from safetensors.torch import load_file, save_file

import unipack
from unipack.core import residual


def tensor_sha(t: torch.Tensor) -> str:
    """sha256 of a tensor's little-endian bytes, read through torch (not unipack)."""
    raw = t.contiguous().view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def special_values(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    """Random values with -0.0, subnormals, inf, -inf and NaNs with several payloads mixed in."""
    rng = np.random.default_rng(seed)
    t = torch.from_numpy(rng.standard_normal(n)).to(dtype)
    width = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[dtype]
    bits = t.view(width)
    exp_all_ones = {torch.float32: 0x7F800000, torch.float16: 0x7C00, torch.bfloat16: 0x7F80}[dtype]
    for k, payload in enumerate((1, 2, 0x15, 0x40)):  # signalling and quiet NaNs, both signs
        bits[k] = exp_all_ones | payload if k % 2 == 0 else -((exp_all_ones | payload) ^ 0) - 1
    t[4], t[5], t[6] = -0.0, float("inf"), float("-inf")
    tiny = torch.finfo(dtype).tiny
    t[7], t[8] = tiny / 8, -tiny / 2  # subnormals
    return t


# -- the codec ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("coding", residual.CODINGS)
def test_every_coding_round_trips_special_bit_patterns(dtype, coding):
    x = special_values(dtype, 4096, seed=1)
    p = special_values(dtype, 4096, seed=2)  # a prediction with NaNs and infs of its own
    p[: 4096 // 2] = x[: 4096 // 2] + 1e-3  # half near, half far
    xb = residual.as_bits(x.view(torch.int32 if dtype == torch.float32 else torch.int16).numpy())
    pb = residual.as_bits(p.view(torch.int32 if dtype == torch.float32 else torch.int16).numpy())
    r = residual.encode(xb, pb, coding)
    assert r.dtype == xb.dtype and r.size == xb.size
    assert residual.decode(r, pb, coding).tobytes() == xb.tobytes()


def test_sub_residual_is_the_zigzagged_ulp_distance():
    """Checked against Python integers: sub of two same-sign floats is their distance in ulps."""
    x = np.array([1.0, 1.0, -2.5, 3.0], np.float32)
    p = np.array([1.0, np.nextafter(np.float32(1.0), np.float32(2.0)), -2.5, 2.0], np.float32)
    r = residual.encode(residual.as_bits(x), residual.as_bits(p), "sub")
    d = [int(a) - int(b) for a, b in zip(x.view(np.uint32), p.view(np.uint32))]
    assert r.tolist() == [2 * v if v >= 0 else -2 * v - 1 for v in d]


# -- bundles -------------------------------------------------------------------------------------


def lossless_population(directory: Path, dtype: str, n: int = 4, seed: int = 0) -> list[Path]:
    """Fine-tunes of one base (with -0.0 and subnormals in a shared tensor, NaN payloads and inf in
    another, which the merge then stores raw), member 2 a near copy of member 0."""
    specs = {**standard_specs(), "head.weight": TensorSpec((6, 5), kind="flat", rank=1)}
    pop = write_population(directory, specs, n=n, seed=seed)
    torch_dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype]
    for i, path in enumerate(pop.paths):
        tensors = load_file(str(path))
        tensors = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        embed = tensors["embed.weight"]
        tiny = torch.finfo(torch_dtype).tiny
        embed.view(-1)[:3] = torch.tensor([-0.0, tiny / 4, -tiny / 2]).to(torch_dtype)
        tensors["head.weight"] = special_values(torch_dtype, 30, seed=i).reshape(6, 5)
        if i == 2:
            near = load_file(str(pop.paths[0]))
            tensors["embed.weight"] = near["embed.weight"].to(torch_dtype)
            tensors["embed.weight"].view(-1)[:3] = embed.view(-1)[:3]
            tensors["embed.weight"][5] += 0.01
        save_file(tensors, str(path), metadata={"i": str(i)})
    return pop.paths


@pytest.fixture(scope="module", params=["F32", "F16", "BF16"])
def lossless(request, tmp_path_factory) -> tuple[Path, list[Path]]:
    d = tmp_path_factory.mktemp(f"lossless-{request.param}")
    paths = lossless_population(d / "in", request.param)
    out = d / "bundle.upk"
    unipack.merge(paths, out, exact_tier=True, lossless="off", baselines=False)
    return out, paths


def test_extract_exact_gives_every_member_bit_for_bit(lossless, tmp_path):
    bundle, paths = lossless
    result = run("extract", bundle, "--all", "--exact", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    for path in paths:
        original, back = load_file(str(path)), load_file(str(tmp_path / "out" / path.name))
        assert list(back) == list(original) or set(back) == set(original)
        for name, t in original.items():
            assert back[name].dtype == t.dtype and back[name].shape == t.shape
            assert tensor_sha(back[name]) == tensor_sha(t), (path.name, name)


def test_manifest_records_the_sha256_of_every_original_tensor(lossless):
    bundle, paths = lossless
    with unipack.open(bundle) as b:
        for member, path in zip(b.manifest.members, paths):
            original = load_file(str(path))
            assert member.exact is not None and set(member.exact) == set(original)
            assert {k: e.sha256 for k, e in member.exact.items()} == {k: tensor_sha(t) for k, t in original.items()}


def test_plain_extract_still_gives_the_lossy_member(lossless, tmp_path):
    bundle, paths = lossless
    with unipack.open(bundle) as b:
        lossy = b.load_numpy(b.members[1])
        exact = b.load_numpy(b.members[1], exact=True)
        assert max(b.manifest.members[1].errors) > 0  # the fixture has lossy tensors
    changed = [k for k in lossy if lossy[k][1].tobytes() != exact[k][1].tobytes()]
    assert changed


def independent_sizes(x: np.ndarray, p: np.ndarray, level: int = 1) -> dict[str, int]:
    """Stored size of each coding, computed apart from unipack: integer arithmetic in Python's
    terms (numpy int64), byte planes by reshaping, zstd with the spec's frame rules, and the
    codec's rule that a blob which does not save 2% is stored plainly. Level 1: residuals of a
    bundle merged at the default level 3 are written at level 1."""
    width = x.dtype.itemsize * 8
    xi, pi = x.astype(np.int64), p.astype(np.int64)
    d = (xi - pi) % (1 << width)
    signed = np.where(d >= 1 << (width - 1), d - (1 << width), d)
    zig = np.where(signed >= 0, 2 * signed, -2 * signed - 1)
    residuals = {"bits": xi, "xor": xi ^ pi, "sub": zig}
    out = {}
    for coding, r in residuals.items():
        raw = r.astype(x.dtype).tobytes()
        planes = np.frombuffer(raw, np.uint8).reshape(-1, x.dtype.itemsize).T.tobytes()
        packed = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(planes)
        out[coding] = len(packed) if len(packed) <= len(raw) * 0.98 and len(raw) >= 64 else len(raw)
    return out


def test_each_residual_is_the_smallest_coding_against_its_base(lossless):
    """Spec §9.4: against the base it names, a residual's coding is the smallest of the three;
    a ``bits`` residual (no base recorded) is no larger than xor and sub against some base the
    merge could have ranked first (the mean, or a member before it)."""
    bundle, paths = lossless
    checked = 0
    with unipack.open(bundle) as b:
        stored = {name: e.nbytes for name, e in b._file.header.tensors.items()}
        members = [(m, load_file(str(p))) for m, p in zip(b.manifest.members, paths)]
        for index, (m, original) in enumerate(members):
            assert m.exact is not None
            for t in b.manifest.tensors:
                e = m.exact[t.name]
                if e.blob is None:
                    continue
                x = _bits(original[t.name])

                def prediction(base: str, t=t, m=m) -> np.ndarray:
                    if base != "mean":
                        return _bits(next(o for mm, o in members if mm.name == base)[t.name])
                    mean, step = b.read_blob(t.mean), getattr(t.params, "mean_step", None)
                    dt = b.manifest.blobs[t.mean].dtype
                    # spec §8.2 step 1: a quantized mean is its integers times the step
                    mean64 = mean.astype(np.float64) * step if step else unipack.format.dtypes.to_float(mean, dt)
                    return residual.as_bits(unipack.format.dtypes.from_float(mean64, m.dtype_of(t)))

                if e.base is not None:
                    sizes = independent_sizes(x, prediction(e.base))
                    assert stored[e.blob] == sizes[e.coding] == min(sizes.values()), (m.name, t.name, sizes)
                else:
                    bases = ["mean"] + [mm.name for mm, _ in members[:index]]
                    options = [independent_sizes(x, prediction(base)) for base in bases]
                    assert stored[e.blob] == options[0]["bits"]
                    assert any(o["bits"] <= min(o.values()) for o in options), (m.name, t.name, options)
                checked += 1
    assert checked > 0


def _bits(t: torch.Tensor) -> np.ndarray:
    return residual.as_bits(t.contiguous().view(_int_view(t)).numpy())


def _int_view(t: torch.Tensor) -> torch.dtype:
    return {4: torch.int32, 2: torch.int16, 8: torch.int64, 1: torch.uint8}[t.element_size()]


def test_info_shows_the_bytes_of_each_tier(lossless):
    bundle, _ = lossless
    result = run("info", bundle, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    with unipack.open(bundle) as b:
        residual_blobs = [e.blob for m in b.manifest.members for e in (m.exact or {}).values() if e.blob]
        stored = {name: e.nbytes for name, e in b._file.header.tensors.items()}
    assert doc["parts"]["residuals"] == sum(stored[r] for r in residual_blobs) > 0
    text = run("info", bundle).output
    assert "tiers" in text and "extract --exact" in text


def test_corrupt_residual_is_reported_by_verify_and_extract(lossless, tmp_path):
    bundle, _ = lossless
    with unipack.open(bundle) as b:
        member = b.manifest.members[1]
        blob = next(e.blob for e in (member.exact or {}).values() if e.blob)
    bad = tmp_path / "bad.upk"
    bad.write_bytes(bundle.read_bytes())
    start, end = blob_range(bad, blob)
    flip_byte(bad, (start + end) // 2)
    assert run("verify", bad).exit_code == 1
    result = run("extract", bad, "--member", member.name, "--exact", "-o", tmp_path / "x.safetensors")
    assert result.exit_code == 1 and "corrupt" in result.output and blob in result.output
    assert not (tmp_path / "x.safetensors").exists()
    # The lossy member never reads the residual.
    assert run("extract", bad, "--member", member.name, "-o", tmp_path / "y.safetensors").exit_code == 0


def test_extract_exact_without_a_tier_is_one_clear_line(tmp_path):
    paths = write_population(tmp_path / "in", standard_specs(), n=3).paths
    plain = tmp_path / "plain.upk"
    unipack.merge(paths, plain, lossless="off", baselines=False)
    result = run("extract", plain, "--member", "ft0", "--exact", "-o", tmp_path / "x.safetensors")
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "no lossless tier" in lines[0] and "--lossless" in lines[0]
    with unipack.open(plain) as b:
        assert b.manifest.format_version < 5 and not b.has_exact_tier
        with pytest.raises(unipack.UnipackError, match="no lossless tier"):
            b.load_numpy("ft0", exact=True)


def test_exact_with_another_format_is_a_usage_error(lossless, tmp_path):
    bundle, _ = lossless
    result = run("extract", bundle, "--all", "--exact", "--format", "hf", "-o", tmp_path / "hf")
    assert result.exit_code == 2 and "--exact applies to --format safetensors only" in result.output


def test_a_lossless_bundle_is_larger_only_by_its_residuals(tmp_path):
    """The tier is an addition: the lossy blobs are the same bytes with and without it."""
    paths = lossless_population(tmp_path / "in", "F32")
    a, b = tmp_path / "a.upk", tmp_path / "b.upk"
    unipack.merge(paths, a, lossless="off", baselines=False)
    unipack.merge(paths, b, lossless="off", baselines=False, exact_tier=True)
    with unipack.open(a) as lossy, unipack.open(b) as tiered:
        assert {k: v.sha256 for k, v in lossy.manifest.blobs.items()} == {
            k: v.sha256 for k, v in tiered.manifest.blobs.items() if not k.startswith("residual/")
        }
        assert tiered.summary().parts["residuals"] == tiered.summary().file_bytes - sum(
            v for k, v in tiered.summary().parts.items() if k not in ("residuals",)
        )


def test_large_tensors_choose_their_coding_on_evenly_spaced_blocks(tmp_path, monkeypatch):
    """Spec §9.4: above TRIAL_BYTES, the coding is the smallest on 16 evenly spaced blocks of
    TRIAL_BYTES in all (checked here with its own sampling), and only it is stored."""
    from unipack.pack import exact_tier

    monkeypatch.setattr(exact_tier, "TRIAL_BYTES", 256)  # every tensor of 64+ elements is "large"
    paths = lossless_population(tmp_path / "in", "F32")
    out = tmp_path / "b.upk"
    unipack.merge(paths, out, exact_tier=True, lossless="off", baselines=False, rank=0)
    checked = 0
    with unipack.open(out) as b:
        members = [(m, load_file(str(p))) for m, p in zip(b.manifest.members, paths)]
        for m, original in members:
            for t in b.manifest.tensors:
                e = (m.exact or {})[t.name]
                x = _bits(original[t.name])
                if e.blob is None or e.base is None or x.nbytes <= 256:
                    continue
                if e.base == "mean":
                    mean = unipack.format.dtypes.to_float(b.read_blob(t.mean), b.manifest.blobs[t.mean].dtype)
                    p = residual.as_bits(mean.astype(np.float32))
                else:
                    p = _bits(next(o for mm, o in members if mm.name == e.base)[t.name])
                block = 256 // 16 // 4
                starts = [round(j * (x.size - block) / 15) for j in range(16)]
                xs = np.concatenate([x[s : s + block] for s in starts])
                ps = np.concatenate([p[s : s + block] for s in starts])
                sizes = independent_sizes(xs, ps)
                assert sizes[e.coding] == min(sizes.values()), (m.name, t.name, sizes)
                assert b._file.header.tensors[e.blob].nbytes == independent_sizes(x, p)[e.coding]
                checked += 1
        exact = b.load_numpy(b.members[3], exact=True)
        assert {k: tensor_sha(torch.from_numpy(np.array(a))) for k, (_, a) in exact.items()} == {
            k: tensor_sha(v) for k, v in members[3][1].items()
        }
    assert checked > 5


# -- the fast path of exact extraction: in-place decoding, threads, byte planes ----------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("coding", residual.CODINGS)
def test_decoding_in_place_gives_the_original_bits_across_blocks(dtype, coding, monkeypatch):
    """``decode_in_place`` over several blocks (and a short last one) gives back ``x`` itself, the
    independent reference, and leaves the prediction untouched."""
    monkeypatch.setattr(residual, "BLOCK", 1000)
    x = special_values(dtype, 4321, seed=3)
    p = special_values(dtype, 4321, seed=4)
    p[::2] = x[::2] - 2e-3
    xb, pb = _bits(x), _bits(p)
    before = pb.copy()
    r = residual.encode(xb, pb, coding).copy()  # ``bits`` returns x itself: decode into a copy
    out = residual.decode_in_place(r, pb, coding)
    assert out is r and out.tobytes() == xb.tobytes()
    assert pb.tobytes() == before.tobytes()


@pytest.mark.parametrize("itemsize", [1, 2, 4, 8])
def test_byte_planes_match_an_independent_transpose(itemsize, monkeypatch):
    from unipack.format import codec

    monkeypatch.setattr(codec, "UNSHUFFLE_BLOCK", 100)  # several blocks and a short last one
    data = np.random.default_rng(itemsize).integers(0, 256, 1001 * itemsize, dtype=np.uint8).tobytes()
    planes = b"".join(data[j::itemsize] for j in range(itemsize))  # byte j of every element, then j+1
    assert bytes(codec.shuffle(data, itemsize)) == planes
    back = codec.unshuffle(planes, itemsize)
    assert bytes(back) == data
    np.frombuffer(back, np.uint8)[0] ^= 1  # a fresh buffer the reader may decode in place


def test_an_empty_zstd_blob_with_trailing_data_is_refused():
    from unipack.errors import FormatError
    from unipack.format import codec

    empty = zstandard.ZstdCompressor(write_content_size=True).compress(b"")
    assert codec.decode(empty, "zstd", False, 1, 0, "blob") == b""
    with pytest.raises(FormatError, match="trailing"):
        codec.decode(empty + empty, "zstd", False, 1, 0, "blob")


@pytest.fixture(scope="module")
def many_tensors(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A rank-0 lossless bundle of BF16 members with a dozen residual tensors (every tensor's
    prediction is the mean or a sibling), special values in some."""
    d = tmp_path_factory.mktemp("many")
    specs = {f"layer{i}.weight": TensorSpec((24, 16), kind="flat", rank=1) for i in range(12)}
    pop = write_population(d / "in", {**standard_specs(), **specs}, n=4, seed=5)
    for i, path in enumerate(pop.paths):
        tensors = load_file(str(path))
        tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()}
        tensors["layer3.weight"].view(-1)[:40] = special_values(torch.bfloat16, 40, seed=10 + i)
        save_file(tensors, str(path))
    out = d / "bundle.upk"
    unipack.merge(pop.paths, out, exact_tier=True, lossless="off", baselines=False, rank=0)
    return out, pop.paths


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_threads_give_every_member_bit_for_bit_in_manifest_order(many_tensors, threads):
    bundle, paths = many_tensors
    with unipack.open(bundle) as b:
        residuals = sum(1 for m in b.manifest.members for e in (m.exact or {}).values() if e.blob)
        assert residuals >= 4 * 12
        for name, path in zip(b.members, paths):
            got = list(b.iter_arrays(name, exact=True, threads=threads))
            assert [t.name for t, _, _ in got] == [t.name for t in b.manifest.tensors]
            original = load_file(str(path))
            names = {torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL"}
            for t, dtype, array in got:
                assert dtype == names[original[t.name].dtype]
                assert tensor_sha(torch.from_numpy(np.ascontiguousarray(array))) == tensor_sha(original[t.name])


def _damaging(b: unipack.Bundle, blobs: set[str]):
    """``b``'s blob reader, with one bit of each residual in ``blobs`` flipped after its checksum
    passed (a residual the writer got wrong), and every array read-only as zstd's own bytes are."""
    read = b._file.read_blob

    def read_blob(name: str) -> np.ndarray:
        array = np.array(read(name))
        if name in blobs:
            array.reshape(-1)[array.size // 2] ^= 1
        array.flags.writeable = False
        return array

    return read_blob


@pytest.mark.parametrize("threads", [1, 3])
def test_a_wrong_residual_fails_its_sha256_check_first_in_order(many_tensors, threads):
    from unipack.bundle.exact import ExactMember
    from unipack.errors import ChecksumError

    bundle, _ = many_tensors
    with unipack.open(bundle) as b:
        member = b.manifest.members[3]
        exact = member.exact or {}
        damaged = [t.name for t in b.manifest.tensors if exact[t.name].blob and exact[t.name].base == "mean"]
        first, later = damaged[1], damaged[-1]
        blobs = {str(exact[first].blob), str(exact[later].blob)}
        rebuilt = ExactMember(b.manifest, member, _damaging(b, blobs), "bundle", threads=threads)
        seen = []
        with pytest.raises(ChecksumError, match=f"tensor {first!r} does not match the sha256"):
            for t, _, _ in rebuilt.arrays():
                seen.append(t.name)
        assert seen == [t.name for t in b.manifest.tensors][: len(seen)]
        assert first not in seen
        # Undamaged, the read-only arrays decode in a copy and every tensor checks.
        whole = ExactMember(b.manifest, member, _damaging(b, set()), "bundle", threads=threads)
        assert len(list(whole.arrays())) == len(b.manifest.tensors)


def test_a_caller_that_stops_early_leaves_no_thread_running(many_tensors):
    import threading

    bundle, _ = many_tensors
    with unipack.open(bundle) as b:
        arrays = b.iter_arrays(b.members[1], exact=True, threads=4)
        next(arrays)
        arrays.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("unipack-exact")]


@pytest.mark.parametrize("checksum", [False, True])
def test_zstd_through_the_scratch_buffer_decodes_and_refuses_as_without_it(checksum):
    """Blobs decoded through a thread's scratch buffer are the same bytes, and every damaged
    frame is refused with the same message as without one."""
    from unipack.errors import FormatError
    from unipack.format import codec

    data = np.random.default_rng(7).normal(0, 0.02, 50_000).astype(np.float32).tobytes()
    planes = bytes(codec.shuffle(data, 4))
    frame = zstandard.ZstdCompressor(level=1, write_content_size=True, write_checksum=checksum).compress(planes)
    corrupt = bytearray(frame)
    corrupt[zstandard.frame_header_size(frame)] |= 0b110  # the first block's type: reserved
    damaged = {
        "trailing": frame + b"\0\0",
        "second frame": frame + zstandard.ZstdCompressor(write_content_size=True).compress(b"x" * 100),
        "truncated": frame[:-7],
        "corrupt": bytes(corrupt),
    }
    messages = {}
    for name, stored in damaged.items():
        with pytest.raises(FormatError) as plain:
            codec.decode(stored, "zstd", True, 4, len(data), "blob")
        messages[name] = str(plain.value)
    with codec.scratch_buffer():
        first = codec.decode(frame, "zstd", True, 4, len(data), "blob")
        second = codec.decode(frame, "zstd", True, 4, len(data), "blob")
        assert bytes(first) == bytes(second) == data
        assert codec._SCRATCH.buffer.size == len(data)  # decoded through the scratch buffer
        np.frombuffer(first, np.uint8)[:] = 0  # each result is its own array, not the scratch
        assert bytes(second) == data
        for name, stored in damaged.items():
            with pytest.raises(FormatError) as scratched:
                codec.decode(stored, "zstd", True, 4, len(data), "blob")
            assert str(scratched.value) == messages[name], name
    assert "trailing" in messages["trailing"] and "trailing" in messages["second frame"]


def test_a_lossless_bundle_is_the_same_bytes_on_every_run(tmp_path, monkeypatch):
    """Nothing run-dependent (a time, a path) goes into the file: two merges of the same inputs
    are byte-identical, with the tier's record free of timings, even when the tier takes longer."""
    import time

    import unipack.pack.exact_tier as exact_tier

    paths = lossless_population(tmp_path / "in", "F32")
    a, b = tmp_path / "a.upk", tmp_path / "b.upk"
    unipack.merge(paths, a, lossless="off", exact_tier=True)
    slow = exact_tier.tensor_entries

    def slower(*args, **kwargs):
        time.sleep(0.002)
        return slow(*args, **kwargs)

    monkeypatch.setattr(exact_tier, "tensor_entries", slower)
    unipack.merge(paths, b, lossless="off", exact_tier=True)
    assert a.read_bytes() == b.read_bytes()
    with unipack.open(a) as bundle:
        assert set(bundle.manifest.stats["exact_tier"]) == {"residual_bytes", "codec"}
