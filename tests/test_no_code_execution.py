"""Property 13 of the "Safety" issue: nothing unipack reads can run code.

1. A static scan (``ast``, not grep) of every ``.py`` under ``unipack/`` for the ways Python
   turns bytes into code: pickle and friends, ``eval``/``exec``/``compile``/``__import__``,
   ``torch.load`` without ``weights_only=True``, ``np.load`` with ``allow_pickle=True``.
   One exception, listed in ``ALLOWED``: ``--eval SPEC`` imports the evaluation module the user
   named on the command line (never anything read from a bundle or a checkpoint).
2. A real pickle whose unpickling would create a marker file, disguised as ``evil.safetensors``
   and ``evil.bin`` (raw pickle, and torch.save's zip format), handed to ``unipack.merge`` and
   ``unipack.open``: a clean UnipackError, and the marker never appears. ``.bin``/``.pt`` inputs
   are PyTorch state dicts, read only with ``torch.load(weights_only=True)``: the payload must be
   refused there, also as the ``pytorch_model.bin`` (or one shard of it) of a Hugging Face folder,
   through ``merge``, ``add`` and the CLI.
"""

from __future__ import annotations

import ast
import os
import pickle  # noqa: S403 - the test builds a hostile pickle on purpose
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import unipack
from unipack import FormatError, InputError, UnipackError

PACKAGE = Path(unipack.__file__).resolve().parent

#: Modules whose import alone means deserialising code-bearing data.
FORBIDDEN_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "pickletools",
    "marshal",
    "shelve",
    "dill",
    "cloudpickle",
    "joblib",
    "copyreg",
}
#: Builtins that run or import code given as data.
FORBIDDEN_BUILTINS = {"eval", "exec", "compile", "__import__"}
#: The only offences tolerated: (file under unipack's parent, offence) -> how many times exactly.
#: ``unipack/usercode.py`` imports the module the user names with ``--eval module:function``;
#: that name comes from the user's command line, never from data unipack reads. The exact count
#: makes a second dynamic import there (or a stale entry here) fail the test.
ALLOWED = {("unipack/usercode.py", "importlib.import_module(...) (dynamic import)"): 1}


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` for a Name/Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _kw_is_const(call: ast.Call, name: str, value: object) -> bool | None:
    """True/False whether keyword ``name`` is the constant ``value``; None if the keyword is absent."""
    for kw in call.keywords:
        if kw.arg == name:
            return isinstance(kw.value, ast.Constant) and kw.value.value is value
        if kw.arg is None:  # **kwargs: cannot prove anything
            return False
    return None


def scan_source(source: str, filename: str) -> list[str]:
    """Offences in one module, as ``file:line: what``."""
    tree = ast.parse(source, filename)
    found: list[str] = []
    # local names bound to torch.load / numpy.load / forbidden builtins via imports or aliases
    aliases = {"torch": "torch", "numpy": "numpy", "np": "numpy", "builtins": "builtins"}
    loaders: dict[str, str] = {}

    def bad(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{getattr(node, 'lineno', '?')}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                root = a.name.split(".")[0]
                if root in FORBIDDEN_MODULES:
                    bad(node, f"import {a.name}")
                if root in ("torch", "numpy"):
                    aliases[a.asname or root] = root if a.asname or "." not in a.name else root
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            root = mod.split(".")[0]
            if root in FORBIDDEN_MODULES:
                bad(node, f"from {mod} import ...")
            for a in node.names:
                if a.name in FORBIDDEN_MODULES:
                    bad(node, f"from {mod} import {a.name}")
                if root in ("torch", "numpy") and a.name == "load":
                    loaders[a.asname or a.name] = f"{root}.load"
                if mod == "builtins" and a.name in FORBIDDEN_BUILTINS:
                    bad(node, f"from builtins import {a.name}")
                if root == "torch" and a.name == "serialization":
                    aliases[a.asname or a.name] = "torch.serialization"
        elif isinstance(node, ast.Name) and node.id in FORBIDDEN_BUILTINS:
            bad(node, f"use of {node.id}")
        elif (
            isinstance(node, ast.Attribute)
            and node.attr in FORBIDDEN_BUILTINS
            and _dotted(node.value) in ("builtins", "__builtins__")
        ):
            bad(node, f"use of builtins.{node.attr}")  # (model.eval(), re.compile() are fine)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in FORBIDDEN_MODULES:
            # importlib.import_module("pickle") and getattr tricks start with the module name as data
            bad(node, f"string {node.value!r} (dynamic import of a forbidden module?)")

    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name is None:
            continue
        head, _, rest = name.partition(".")
        full = f"{aliases.get(head, head)}.{rest}" if rest else loaders.get(name, name)
        if full in ("torch.load", "torch.serialization.load"):
            if _kw_is_const(node, "weights_only", True) is not True:
                bad(node, f"{name}(...) without weights_only=True")
        elif full in ("numpy.load",):
            if _kw_is_const(node, "allow_pickle", False) is False:  # True, a variable, or **kwargs
                bad(node, f"{name}(...) with allow_pickle=True (or not provably False)")
            if len(node.args) >= 3:  # np.load(file, mmap_mode, allow_pickle, ...)
                bad(node, f"{name}(...) passes allow_pickle positionally")
        elif full in ("importlib.import_module", "importlib.__import__", "runpy.run_path", "runpy.run_module"):
            bad(node, f"{name}(...) (dynamic import)")
        elif full in ("numpy.ndarray.loads", "numpy.loads", "torch.jit.load", "torch.package.PackageImporter"):
            bad(node, f"{name}(...)")
        elif full.endswith(".loads") and head in FORBIDDEN_MODULES:
            bad(node, f"{name}(...)")
    return found


def python_files() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) >= 10, files
    return files


def test_p13_scanner_catches_every_pattern() -> None:
    """The scanner itself: each hostile snippet is found, each harmless one is not."""
    hostile = [
        "import pickle",
        "import pickle as p",
        "from pickle import loads",
        "import _pickle",
        "import marshal",
        "import shelve",
        "from dill import loads",
        "eval('1')",
        "exec('x = 1')",
        "x = __import__('os')",
        "f = eval",
        "import builtins\nbuiltins.eval('1')",
        "compile('1', 'f', 'eval')",
        "import torch\ntorch.load('f')",
        "import torch\ntorch.load('f', weights_only=False)",
        "import torch as t\nt.load('f', weights_only=flag)",
        "from torch import load\nload('f')",
        "from torch import load as L\nL('f')",
        "import numpy as np\nnp.load('f', allow_pickle=True)",
        "import numpy\nnumpy.load('f', allow_pickle=True)",
        "import numpy as np\nnp.load('f', None, True)",
        "import numpy as np\nnp.load('f', **kw)",
        "import importlib\nimportlib.import_module('pickle')",
    ]
    harmless = [
        "import torch\ntorch.load('f', weights_only=True)",
        "import numpy as np\nnp.load('f')",
        "import numpy as np\nnp.load('f', allow_pickle=False)",
        "import json\njson.loads('1')",
        "x = 'evaluate'",
        "def evaluate():\n    pass\nevaluate()",
        "import zstandard\nzstandard.ZstdDecompressor().decompress(b'')",
    ]
    for src in hostile:
        assert scan_source(src, "<snippet>"), f"scanner missed: {src!r}"
    for src in harmless:
        assert not scan_source(src, "<snippet>"), f"scanner false positive: {src!r}: {scan_source(src, 's')}"


def test_p13_no_code_execution_primitives_in_unipack_source() -> None:
    offences: list[str] = []
    allowed_seen = dict.fromkeys(ALLOWED, 0)
    for path in python_files():
        rel = path.relative_to(PACKAGE.parent).as_posix()
        for offence in scan_source(path.read_text(encoding="utf-8"), rel):
            key = (rel, offence.split(": ", 1)[1])  # "file:line: what" -> (file, what)
            if key in allowed_seen:
                allowed_seen[key] += 1
            else:
                offences.append(offence)
    assert not offences, "code-execution primitives in unipack/:\n" + "\n".join(offences)
    assert allowed_seen == ALLOWED, f"allowed offences changed (update ALLOWED deliberately): {allowed_seen}"


def test_p13_allowance_is_per_file_not_in_the_scanner() -> None:
    """The evaluation hook's import is still an offence to the scanner: only ALLOWED excuses it."""
    source = (PACKAGE / "usercode.py").read_text(encoding="utf-8")
    found = scan_source(source, "unipack/other.py")
    assert [f.split(": ", 1)[1] for f in found] == ["importlib.import_module(...) (dynamic import)"], found


# ------------------------------------------------------------------------------------------
# a pickle bomb dressed as a checkpoint
# ------------------------------------------------------------------------------------------


class _Evil:
    """Unpickling this runs ``touch MARKER`` (pickle calls os.system with the argument)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


class _EvilOpen:
    """The same without a shell: unpickling calls ``open(MARKER, 'w')``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


def _pickle_payloads(tmp_path: Path, marker: Path) -> dict[str, bytes]:
    out = {}
    for proto in (0, 2, pickle.HIGHEST_PROTOCOL):
        out[f"os_system_p{proto}"] = pickle.dumps({"weight": _Evil(marker)}, protocol=proto)
    out["open"] = pickle.dumps({"weight": _EvilOpen(marker)}, protocol=2)
    zipped = tmp_path / "torch_zip.bin"
    torch.save({"weight": _Evil(marker)}, zipped)  # torch's zip container with data.pkl inside
    out["torch_zip"] = zipped.read_bytes()
    zipped.unlink()
    legacy = tmp_path / "torch_legacy.bin"
    torch.save({"weight": _Evil(marker)}, legacy, _use_new_zipfile_serialization=False)
    out["torch_legacy"] = legacy.read_bytes()
    legacy.unlink()
    return out


def test_p13_payload_really_runs_code_when_unpickled(tmp_path: Path) -> None:
    """Guard against a toothless test: the payload does create the marker when unpickled."""
    marker = tmp_path / "MARKER"
    pickle.loads(_pickle_payloads(tmp_path, marker)["open"])  # noqa: S301 - on purpose
    assert marker.exists()
    marker.unlink()
    pickle.loads(_pickle_payloads(tmp_path, marker)["os_system_p2"])  # noqa: S301 - on purpose
    assert marker.exists()


#: What unipack says when torch.load(weights_only=True) refuses a pickle.
REFUSED = "not a plain state dict loadable with torch.load(weights_only=True) (refusing to unpickle arbitrary objects)"


@pytest.fixture
def good_inputs(tmp_path: Path) -> list[Path]:
    g = torch.Generator().manual_seed(1)
    paths = []
    for i in range(2):
        p = tmp_path / "in" / f"good{i}.safetensors"
        p.parent.mkdir(exist_ok=True)
        save_file({"weight": torch.randn(4, 4, generator=g)}, str(p))
        paths.append(p)
    return paths


@pytest.mark.parametrize("suffix", [".safetensors", ".bin", ".pt", ".upk"])
@pytest.mark.parametrize("kind", ["os_system_p0", "os_system_p2", "os_system_p5", "open", "torch_zip", "torch_legacy"])
def test_p13_pickle_disguised_as_checkpoint(tmp_path: Path, good_inputs: list[Path], kind: str, suffix: str) -> None:
    marker = tmp_path / "MARKER"
    payloads = _pickle_payloads(tmp_path, marker)
    key = kind if kind in payloads else f"os_system_p{pickle.HIGHEST_PROTOCOL}"
    evil = tmp_path / "in" / f"evil{suffix}"
    evil.write_bytes(payloads[key])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "x.upk"
    for order in ([evil, *good_inputs], [*good_inputs, evil]):
        with pytest.raises(UnipackError) as info:
            unipack.merge(order, out)
        assert isinstance(info.value, (InputError, FormatError)), repr(info.value)
        assert str(evil) in str(info.value), str(info.value)
        if suffix in (".bin", ".pt"):  # read as a PyTorch pickle: refused by weights_only's unpickler
            assert isinstance(info.value, InputError), repr(info.value)
            assert REFUSED in str(info.value) and "\n" not in str(info.value), str(info.value)
        assert not marker.exists(), "unipack.merge unpickled the input: the marker file was created"
        assert list(out_dir.iterdir()) == [], "a failed merge left files behind"
    with pytest.raises(UnipackError) as info:
        unipack.open(evil)
    assert isinstance(info.value, FormatError), repr(info.value)
    assert not marker.exists(), "unipack.open unpickled the file: the marker file was created"


def test_p13_cli_merge_and_info_do_not_unpickle(tmp_path: Path, good_inputs: list[Path]) -> None:
    from click.testing import CliRunner

    import unipack.cli

    marker = tmp_path / "MARKER"
    evil = tmp_path / "in" / "evil.bin"
    evil.write_bytes(_pickle_payloads(tmp_path, marker)["torch_zip"])
    runner = CliRunner()
    r = runner.invoke(unipack.cli.cli, ["merge", str(good_inputs[0]), str(evil), "-o", str(tmp_path / "x.upk")])
    assert r.exit_code != 0 and not isinstance(r.exception, (AttributeError, TypeError, KeyError)), r.output
    r = runner.invoke(unipack.cli.cli, ["info", str(evil)])
    assert r.exit_code != 0
    assert not marker.exists()


def _hostile_folder(root: Path, marker: Path, payload: bytes, sharded: bool) -> tuple[Path, Path]:
    """A Hugging Face folder whose pytorch_model.bin (or its second shard) is the payload."""
    import json

    folder = root / ("hostile-sharded" if sharded else "hostile")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "vit"}')
    if not sharded:
        evil = folder / "pytorch_model.bin"
        evil.write_bytes(payload)
        return folder, evil
    torch.save({"weight": torch.zeros(4, 4)}, folder / "pytorch_model-00001-of-00002.bin")
    evil = folder / "pytorch_model-00002-of-00002.bin"
    evil.write_bytes(payload)
    index = {"weight_map": {"weight": "pytorch_model-00001-of-00002.bin", "bias": evil.name}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return folder, evil


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("kind", ["torch_zip", "torch_legacy", "os_system_p2", "open"])
def test_p13_hostile_pytorch_model_bin_in_a_folder(
    tmp_path: Path, good_inputs: list[Path], kind: str, sharded: bool
) -> None:
    from click.testing import CliRunner

    import unipack.cli

    marker = tmp_path / "MARKER"
    folder, evil = _hostile_folder(tmp_path / "in", marker, _pickle_payloads(tmp_path, marker)[kind], sharded)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(InputError) as info:
        unipack.merge([*good_inputs, folder], out_dir / "x.upk")
    assert str(evil) in str(info.value) and REFUSED in str(info.value), str(info.value)
    assert not marker.exists(), "merge unpickled a folder's pytorch_model.bin: the marker file was created"
    r = CliRunner().invoke(
        unipack.cli.cli, ["merge", str(folder), *map(str, good_inputs), "-o", str(out_dir / "x.upk"), "-q"]
    )
    assert r.exit_code == 1 and r.output.startswith("Error: ") and REFUSED in r.output, r.output
    assert not marker.exists()
    assert list(out_dir.iterdir()) == []
    bundle = tmp_path / "good.upk"
    unipack.merge(good_inputs, bundle)
    before = bundle.read_bytes()
    with pytest.raises(InputError, match="refusing to unpickle arbitrary objects"):
        unipack.add(bundle, folder)
    assert not marker.exists(), "add unpickled a folder's pytorch_model.bin: the marker file was created"
    assert bundle.read_bytes() == before
