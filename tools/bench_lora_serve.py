#!/usr/bin/env python
"""Serving a LoRA bundle's adapters without PEFT, on the real MiniLM adapter collection.

For each adapter of the collection ``tools/lora_population.py`` builds (22 PEFT adapters of
all-MiniLM-L6-v2 on real text tasks, cached under ``~/.cache/unipack/rd-minilm``), after one
default ``unipack merge`` of all of them:

* ``peft``: the held-out accuracy of ``extract --format peft`` through
  ``PeftModel.from_pretrained(base, adapter)``;
* ``folded``: the held-out accuracy of ``extract --format hf --base BASE`` loaded by
  ``BertForSequenceClassification.from_pretrained`` (no peft), BASE being the task's base model
  folder as ``save_pretrained`` writes it;
* the largest logit difference between the two on the held-out split;
* for the first adapter, ``export --onnx --base BASE`` and its ONNX Runtime check.

The issue's bar: the folded model scores what the adapter scores through PEFT, within 0.1 point.

    python tools/bench_lora_serve.py --workdir /tmp/lora-serve     # about 5 minutes here
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lora_population as pop  # noqa: E402  (a sibling tool: the collection, its tasks and base)
import rd_population as rd  # noqa: E402

import unipack  # noqa: E402


def base_folder(cache: Path, task: str, labels: list[str], work: Path) -> Path:
    """The task's base model (MiniLM with a classifier of the task's labels) as an HF folder."""
    out = work / "bases" / task
    if not (out / "config.json").exists():
        torch.manual_seed(0)
        pop._model(cache, labels).save_pretrained(out, safe_serialization=True)
    return out


def logits(model: torch.nn.Module, ids: list[list[int]], labels: list[int]) -> torch.Tensor:
    model.eval()
    order = list(range(len(ids)))
    out = []
    with torch.no_grad():
        for x, mask, _ in rd._batches(ids, labels, order, 64):
            out.append(model(input_ids=x, attention_mask=mask).logits)
    return torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=rd.default_cache_dir(), help="the population cache")
    parser.add_argument("--workdir", type=Path, default=Path("lora-serve"))
    parser.add_argument("--adapters", type=int, default=22)
    parser.add_argument("--json", type=Path)
    ns = parser.parse_args(argv)
    cache = ns.cache
    folders = [pop.lora_dir(cache) / s.name for s in pop.PLAN[: ns.adapters]]
    missing = [f for f in folders if not (f / "lora_member.json").is_file()]
    if missing:
        print(f"{missing[0]}: adapter not built; run python tools/lora_population.py --adapters {ns.adapters}")
        return 1
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    rd._quiet_transformers()
    ns.workdir.mkdir(parents=True, exist_ok=True)
    bundle_path = ns.workdir / "loras.upk"
    unipack.merge(folders, bundle_path, force=True)
    rows = []
    with unipack.open(bundle_path) as bundle:
        for folder in folders:
            task = pop.PLAN[[s.name for s in pop.PLAN].index(folder.name)].task
            split, ids = pop._tokenized(cache, task)
            labels = json.loads((cache / "tasks" / f"{task}.json").read_text())["labels"]
            truth = split["test"]["label"]
            base = base_folder(cache, task, labels, ns.workdir)
            member = folder.name
            peft_dir, hf_dir = ns.workdir / "peft" / member, ns.workdir / "hf" / member
            bundle.extract_peft(member, peft_dir, force=True)
            bundle.extract_hf(member, hf_dir, base=base, force=True)
            torch.manual_seed(0)
            through_peft = PeftModel.from_pretrained(pop._model(cache, labels), peft_dir)
            folded = BertForSequenceClassification.from_pretrained(hf_dir)
            a, b = logits(through_peft, ids["test"], truth), logits(folded, ids["test"], truth)
            y = torch.tensor(truth)
            acc_peft = 100.0 * float((a.argmax(-1) == y).float().mean())
            acc_folded = 100.0 * float((b.argmax(-1) == y).float().mean())
            row = {
                "adapter": member,
                "peft": acc_peft,
                "folded": acc_folded,
                "max_logit_diff": float((a - b).abs().max()),
                "max_logit": float(a.abs().max()),
            }
            if not rows:
                check = bundle.export_onnx(member, ns.workdir / f"{member}.onnx", base=base, force=True)
                row["onnx_passed"] = bool(check.passed)
            rows.append(row)
            print(json.dumps(row), flush=True)
    diffs = [abs(r["peft"] - r["folded"]) for r in rows]
    diff_logit = max(r["max_logit_diff"] for r in rows)
    onnx = "passed" if rows[0].get("onnx_passed") else "FAILED"
    mean_peft = sum(r["peft"] for r in rows) / len(rows)
    mean_folded = sum(r["folded"] for r in rows) / len(rows)
    print("| adapters | through PEFT, mean | folded, no PEFT, mean | largest difference | logits | ONNX |")
    print("|---|---|---|---|---|---|")
    print(f"| {len(rows)} | {mean_peft:.2f} | {mean_folded:.2f} | {max(diffs):.2f} pt | {diff_logit:.2e} | {onnx} |")
    if ns.json:
        ns.json.write_text(json.dumps(rows, indent=1))
    return 0 if max(diffs) <= 0.1 and rows[0].get("onnx_passed") else 1


if __name__ == "__main__":
    sys.exit(main())
