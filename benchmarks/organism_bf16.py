"""bf16 autocast vs fp32 for organism training on this CPU, side by side in one run.

    python benchmarks/organism_bf16.py --steps 8 --batch-size 32

Both start from the same seeded weights and see the same batches (the recipe's first phase:
1-2 object scenes, tower frozen); reports seconds per step (after one warm-up step) and the loss
of each step, then one JSON line. Weights and the optimizer stay fp32 in both.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def run(bf16: bool, steps: int, batch_size: int, train_vision: bool) -> dict:
    from pipeline.models.qwen2_5_vl import Qwen25VLAdapter
    from pipeline.organism.batcher import Batcher, training_inputs
    from pipeline.organism.model import OrganismConfig, build_organism

    model, processor = build_organism(OrganismConfig(), seed=0)
    model.config.get_text_config()._attn_implementation = "sdpa"
    ad = Qwen25VLAdapter(model, processor, "organism")
    for n, p in model.named_parameters():
        p.requires_grad_(train_vision or ".visual." not in f".{n}")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batcher = Batcher(ad, seed=0, turns=4, max_objects=2)
    model.train()
    times, losses, index = [], [], 0
    for step in range(steps + 1):
        batcher.rng.seed(step)
        enc, conts, index, _ = batcher.batch(index, batch_size)
        inputs, labels = training_inputs(enc, conts, ad.pad_token_id)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(**inputs).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step:  # the first step pays one-off costs (kernel selection, allocation)
            times.append(time.perf_counter() - t0)
        losses.append(round(loss.item(), 4))
    return {"s_per_step": sum(times) / len(times), "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--train-vision", action="store_true", help="backward through the tower too")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = {name: run(name == "bf16", args.steps, args.batch_size, args.train_vision) for name in ("fp32", "bf16")}
    for name, r in res.items():
        print(f"{name}: {r['s_per_step']:.2f} s/step, losses {r['losses']}")
    res["speedup_bf16"] = res["fp32"]["s_per_step"] / res["bf16"]["s_per_step"]
    res["mean_abs_loss_diff"] = sum(abs(a - b) for a, b in zip(res["fp32"]["losses"], res["bf16"]["losses"])) / \
        len(res["fp32"]["losses"])
    print(json.dumps({"benchmark": "organism_bf16", "steps": args.steps, "batch_size": args.batch_size,
                      "train_vision": args.train_vision, **res}))


if __name__ == "__main__":
    main()
