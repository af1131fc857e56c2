"""Dense, BTT and BTT-MoE small GPTs trained on CPU at the same training-FLOP allowance on a local text file.

    python examples/moe_gpt.py --data "$(python -c 'import pydoc_data.topics as t; print(t.__file__)')"
                                                  # ^ Python's own reference text; a few minutes on a CPU
    python examples/moe_gpt.py --data input.txt --train-flops 2e11 --dispatch dense

Character-level language modelling with the search's lm task (search.tasks.lm: 96 symbols, the last 10%
of the file held out) and its budgeted trainer (search.train: AdamW with muP parameter groups, warmup
then a constant rate). Every linear layer but the output head is structured: dense (nn.Linear), a
rank-1 BTT, or a BTT-MoE with 8 experts and top-2 routing (es.MoEConfig), whose training loss adds 0.01 x
the switch + z load-balancing loss. Each model gets the same allowance of training FLOPs, counted for
the path that runs (the sparse dispatch by default: the MoE pays for 2 of its 8 experts per token, plus
its routers), so steps differ by model. Prints the held-out loss and the compute of each.
"""

from __future__ import annotations

import argparse

import einstruct as es
from search import tasks, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a local text file (or a .bin file of uint16 tokens)")
    p.add_argument("--train-flops", type=float, default=1.5e11, help="training FLOPs allowed to each model")
    p.add_argument("--dispatch", choices=("sparse", "dense"), default="sparse", help="BTT-MoE path (and cost)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--active", type=int, default=2)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--dense-width", type=int, default=64)
    p.add_argument("--btt-width", type=int, default=128)
    p.add_argument("--moe-width", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    task = tasks.get(
        "lm", data=args.data, depth=args.depth, context=args.context, batch=args.batch, d_head=min(64, args.dense_width)
    )
    moe = es.MoEConfig(experts=args.experts, active=args.active, dispatch=args.dispatch)
    models = [
        ("dense", None, args.dense_width),
        ("btt (rank 1)", es.presets.btt(rank=1), args.btt_width),
        (f"btt_moe (E={args.experts}, k={args.active}, {args.dispatch})", moe, args.moe_width),
    ]
    print(
        f"data {args.data}: {len(task.train_tokens):,} training tokens; unigram entropy "
        f"{task.unigram_entropy():.3f} nats; {args.train_flops:.3g} training FLOPs per model\n"
    )
    head = (
        f"{'model':34s} {'width':>5s} {'params':>9s} {'FLOPs/step':>10s} {'steps':>6s} {'train FLOPs':>11s} "
        f"{'loss':>6s} {'seconds':>7s}"
    )
    print(head)
    print("-" * len(head))
    for name, spec, width in models:
        r = train.run(task, spec, width=width, train_flops=args.train_flops, seed=args.seed, device="cpu", evals=4)
        loss = "diverged" if r.diverged else f"{r.loss:.3f}"
        print(
            f"{name:34s} {width:5d} {r.params:9,d} {r.flops_per_step:10.3g} {r.steps:6d} {r.train_flops:11.4g} "
            f"{loss:>6s} {r.seconds:7.1f}"
        )
    print(
        "\nloss: held-out cross-entropy in nats per character; train FLOPs: forward + backward of the linear "
        "layers (routers included) and attention, as counted by search.flops"
    )


if __name__ == "__main__":
    main()
