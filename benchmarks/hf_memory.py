"""Peak memory of one training step of a Hugging Face causal LM, patched vs unpatched.

A tiny-width Llama (1 layer, hidden 256) with a vocabulary where the logits dominate
(V = 32768) takes one training step (forward with labels, backward, SGD step) on a few hundred
tokens, on the CPU path (no TRITON_INTERPRET, no GPU: the fused op runs plain torch over row
chunks of 32 MiB of logits, ``linear_cross_entropy.CHUNK_BYTES``). Unpatched, HF's forward
builds the (tokens x V) float32 logits, and its loss and backward more of that size; patched
(``triton_softmax.integrations.transformers.patch``), the loss comes from the hidden states.

Each variant runs in a fresh process, which builds the model, warms up with one short step,
frees the gradients, resets its RSS high-water mark (``/proc/self/clear_refs``) and then runs
the measured step: peak extra = ``VmHWM`` after the step minus ``VmRSS`` just before it (as
benchmarks/cpu_linear_ce.py). The losses of the two variants are checked to agree.

Run from a clone: ``python -m benchmarks.hf_memory`` (writes
``benchmarks/results/hf_memory_<cpu>.md`` and ``.csv``, with the machine and load average).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys

from benchmarks import common

VARIANTS = ("unpatched", "patched")


def one_step(variant: str, tokens: int, vocab: int, hidden: int) -> dict:
    """In this (fresh) process: peak RSS of one training step of the ``variant`` model."""
    import torch
    import transformers

    from triton_softmax.integrations.transformers import patch

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max(tokens, 64),
    )
    model = transformers.LlamaForCausalLM(config)
    if variant == "patched":
        patch(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    batch = 2
    ids = torch.randint(0, vocab, (batch, tokens // batch))
    labels = ids.clone()
    labels[:, : tokens // (4 * batch)] = -100  # a prompt

    def step(ids, labels):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step(ids[:, :8], labels[:, :8])  # lazy allocations, thread pool, imports
    gc.collect()
    reset = common.reset_high_water_mark()
    rss_before = common.status_kib("VmRSS")
    loss = step(ids, labels)
    hwm_after = common.status_kib("VmHWM")
    grads_kib = sum(p.numel() * p.element_size() for p in model.parameters()) // 1024
    return dict(
        variant=variant,
        loss=loss,
        rss_before_kib=rss_before,
        hwm_after_kib=hwm_after,
        hwm_reset=reset,
        param_grads_kib=grads_kib,
    )


def measure(tokens: int, vocab: int, hidden: int, threads: int) -> list[dict]:
    """``one_step`` of each variant, one after the other, each in a fresh CPU-only process."""
    shape = ["--shape", str(tokens), str(vocab), str(hidden)]
    return [
        common.json_result(
            common.start_module(
                ["hf_memory", "--step-of", v, *shape], OMP_NUM_THREADS=str(threads)
            ),
            f"{v}: step",
        )
        for v in VARIANTS
    ]


def markdown(rows: list[dict], tokens: int, vocab: int, hidden: int, meta: dict) -> str:
    """The results table, with the machine, versions and load, as Markdown."""
    logits_mib, commit = tokens * vocab * 4 / 2**20, f"commit {meta['commit']}"
    by = {r["variant"]: r for r in rows}
    extra = {v: (r["hwm_after_kib"] - r["rss_before_kib"]) / 1024 for v, r in by.items()}
    # The step allocates the parameters' gradients (freed before it) in both variants.
    grads = by["patched"]["param_grads_kib"] / 1024
    beyond = {v: e - grads for v, e in extra.items()}
    peak = {v: r["hwm_after_kib"] / 1024 for v, r in by.items()}
    table = common.md_table(
        [
            "model",
            "loss",
            "RSS before (MiB)",
            "peak (MiB)",
            "peak extra (MiB)",
            "extra beyond the grads (MiB)",
            "that / logits",
        ],
        [
            [
                v,
                f"{by[v]['loss']:.6f}",
                f"{by[v]['rss_before_kib'] / 1024:.0f}",
                f"{peak[v]:.0f}",
                f"{extra[v]:.0f}",
                f"{beyond[v]:.0f}",
                f"{beyond[v] / logits_mib:.2f}x",
            ]
            for v in VARIANTS
        ],
    )
    lines = [
        "# One training step of a Hugging Face causal LM: peak memory, patched vs unpatched",
        "",
        f"LlamaForCausalLM, 1 layer, hidden {hidden}, vocabulary {vocab}, {tokens} tokens "
        f"(batch 2), float32; forward with labels, backward, SGD step. CPU path. The float32 "
        f"logits alone are {logits_mib:.0f} MiB; the parameters' gradients, which the step "
        f"allocates in both variants, {grads:.0f} MiB.",
        "",
        f"{common.measured_on(meta, threads=True, extra=[commit])}. "
        "Peak extra: VmHWM after the step minus "
        "VmRSS before it, each variant in a fresh process (high-water mark reset: "
        f"{all(r['hwm_reset'] for r in rows)}).",
        "",
        *table,
        "",
        f"Patched / unpatched: peak extra {extra['patched'] / extra['unpatched']:.2f}x "
        f"({beyond['patched'] / beyond['unpatched']:.2f}x beyond the gradients), "
        f"whole-process peak {peak['patched'] / peak['unpatched']:.2f}x.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run both variants and write the CSV and markdown."""
    parser = common.parser("hf_memory", __doc__)
    parser.add_argument(
        "--shape",
        nargs=3,
        type=int,
        default=(512, 32768, 256),
        metavar=("TOKENS", "VOCAB", "HIDDEN"),
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--step-of", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    tokens, vocab, hidden = args.shape
    if args.step_of:
        print(json.dumps(one_step(args.step_of, tokens, vocab, hidden)))
        return 0
    meta = dict(
        machine=common.cpu_description(),
        threads=args.threads,
        load_avg=common.load_average(),
        versions=common.versions(["torch", "transformers", "triton-softmax"]),
        commit=common.git_commit(),
    )
    rows = measure(tokens, vocab, hidden, args.threads)
    meta["load_avg_end"] = common.load_average()
    losses = [r["loss"] for r in rows]
    if abs(losses[0] - losses[1]) > 1e-5 * abs(losses[0]):
        raise RuntimeError(f"patched and unpatched losses differ: {losses}")
    text = markdown(rows, tokens, vocab, hidden, meta)
    csv_path = args.out / f"{common.stem('hf_memory', False)}.csv"
    write_md = lambda path: [common.write_markdown(path.with_suffix(".md"), [text])]  # noqa: E731
    common.write_results(csv_path, [r | meta for r in rows], write_md)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
