"""Where an organism training step's time goes, on this CPU: batch making (scene rendering and the
processor), forward, backward and the optimizer, per step, for a checkpoint that continues
(the shipped organism by default, full benchmark scenes, 4 turns, the tower trained).

    python -m benchmarks.organism_step --steps 4 --threads 2
    python -m benchmarks.organism_step --steps 6 --threads 2 --compile

Prints one line per step and a final JSON line with the medians after the first (warm-up) step.
With --compile, the same batches run twice from the same weights, eager and under
`torch.compile` (inductor, dynamic shapes: the chats' lengths vary), and the line adds the
compiled arm's medians, its first step (the compile), the step-time ratio and the largest
difference between the two arms' losses (the curve must be the same to keep it).
Run it with the cores free: another process on them changes every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pipeline/assets/organism")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also run the same batches under torch.compile")
    args = ap.parse_args(argv)

    from pipeline.organism.batcher import Batcher, training_inputs

    torch.set_num_threads(args.threads)
    model, ad = _load(args.model)
    batcher = Batcher(ad, seed=0, turns=4)
    idx, batches = 0, []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        enc, conts, idx, _ = batcher.batch(idx, args.batch_size)
        batches.append((training_inputs(enc, conts, ad.pad_token_id), time.perf_counter() - t0))
    eager = _arm(model, batches, "eager")
    out = {"threads": args.threads, "batch_size": args.batch_size, "steps": len(eager) - 1, **_medians(eager)}
    if args.compile:
        model, _ = _load(args.model)
        compiled = _arm(torch.compile(model, dynamic=True), batches, "compiled")
        med = _medians(compiled)
        out.update({"compiled": med, "compiled_first_step_s": round(compiled[0]["step_s"], 1),
                    "compiled_over_eager": round(med["step_s"] / out["step_s"], 3),
                    "loss_max_abs_diff": max(abs(a["loss"] - b["loss"]) for a, b in zip(eager, compiled))})
    print(json.dumps(out))
    return 0


def _load(path):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from pipeline.models.qwen2_5_vl import Qwen25VLAdapter
    from pipeline.organism.model import set_input_size

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(path)
    set_input_size(processor, 336, 252)
    model.config.get_text_config()._attn_implementation = "sdpa"
    return model, Qwen25VLAdapter(model, processor, "organism")


def _arm(model, batches, name: str) -> list[dict]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)  # small: the weights barely move
    model.train()
    rows = []
    for step, ((inputs, labels), batch_s) in enumerate(batches):
        t1 = time.perf_counter()
        logits = model(**inputs).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        row = {"arm": name, "step": step, "batch_s": batch_s, "forward_s": t2 - t1, "backward_s": t3 - t2,
               "optimizer_s": t4 - t3, "step_s": batch_s + t4 - t1,
               "tokens": int(inputs["input_ids"].numel()), "loss": loss.item()}
        rows.append(row)
        print(" ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    return rows


def _medians(rows: list[dict]) -> dict:
    steady = rows[1:] or rows  # the first step warms up (and compiles)
    med = {k: round(statistics.median(r[k] for r in steady), 3) for k in ("batch_s", "forward_s", "backward_s", "optimizer_s")}
    med["step_s"] = round(sum(med.values()), 3)
    return med


if __name__ == "__main__":
    raise SystemExit(main())
