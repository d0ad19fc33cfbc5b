"""Where an organism training step's time goes, on this CPU: batch making (scene rendering and the
processor), forward, backward and the optimizer, per step, for a checkpoint that continues
(the shipped organism by default, full benchmark scenes, 4 turns, the tower trained).

    python -m benchmarks.organism_step --steps 4 --threads 2

Prints one line per step and a final JSON line with the medians after the first (warm-up) step.
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
    args = ap.parse_args(argv)

    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from pipeline.models.qwen2_5_vl import Qwen25VLAdapter
    from pipeline.organism.batcher import Batcher, training_inputs
    from pipeline.organism.model import set_input_size

    torch.set_num_threads(args.threads)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(args.model)
    set_input_size(processor, 336, 252)
    model.config.get_text_config()._attn_implementation = "sdpa"
    ad = Qwen25VLAdapter(model, processor, "organism")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)  # small: the weights barely move
    batcher = Batcher(ad, seed=0, turns=4)
    model.train()
    idx, rows = 0, []
    for step in range(args.steps):
        t0 = time.perf_counter()
        enc, conts, idx = batcher.batch(idx, args.batch_size)
        inputs, labels = training_inputs(enc, conts, ad.pad_token_id)
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
        row = {"step": step, "batch_s": t1 - t0, "forward_s": t2 - t1, "backward_s": t3 - t2,
               "optimizer_s": t4 - t3, "tokens": int(inputs["input_ids"].numel()), "loss": loss.item()}
        rows.append(row)
        print(" ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    steady = rows[1:] or rows
    med = {k: round(statistics.median(r[k] for r in steady), 3) for k in ("batch_s", "forward_s", "backward_s", "optimizer_s")}
    med["step_s"] = round(sum(med.values()), 3)
    print(json.dumps({"threads": args.threads, "batch_size": args.batch_size, "steps": len(steady), **med}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
