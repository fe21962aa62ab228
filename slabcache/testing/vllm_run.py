"""Run a real vLLM engine on CPU with slabcache as its storage tier.

    python -m slabcache.testing.vllm_run model DIR        # build a tiny random-weight model
    python -m slabcache.testing.vllm_run generate --model DIR --store PATH --out FILE.json

``generate`` runs fixed token prompts greedily with vLLM's OffloadingConnector
(the CPU tier of ``slabcache.testing.vllm_cpu`` plus slabcache as secondary
tier at PATH; ``--no-tier`` runs without any offloading) and writes the
tokens, their logprobs and the store's counters to FILE.  The tests run it
twice with one store, in two processes, to show that the second process
loads from slabcache what the first stored.  Needs vLLM (``vllm-cpu``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# The KV block of vLLM's CPU backend is 128 tokens: 600-token prompts have
# 4 full blocks to store and load.
PROMPT_TOKENS = 600
PROMPTS = 2
VOCAB = 512


def build_model(out: str) -> None:
    """A 2-layer Llama with random weights (a few MB), saved for vLLM to load."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                         max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                         torch_dtype="float32")
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)


def prompts() -> list[list[int]]:
    import random

    rng = random.Random(7)
    return [[rng.randrange(3, VOCAB) for _ in range(PROMPT_TOKENS)] for _ in range(PROMPTS)]


def tier_config(store: str, capacity: str, extra: dict) -> dict:
    return {
        "spec_name": "CPUTieringSpec",
        "spec_module_path": "slabcache.testing.vllm_cpu",
        "cpu_bytes_to_use": 8 << 20,
        "secondary_tiers": [{"type": "SlabCacheTier", "module_path": "slabcache.integrations.vllm",
                             "path": store, "capacity": capacity, **extra}],
    }


def generate(args) -> int:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kv = None
    if not args.no_tier:
        kv = KVTransferConfig(kv_connector="OffloadingConnector", kv_role="kv_both",
                              kv_connector_extra_config=tier_config(
                                  args.store, args.capacity, json.loads(args.tier_keys)))
    llm = LLM(model=args.model, skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
              enable_prefix_caching=False, max_model_len=1024, max_num_seqs=4, seed=0,
              kv_transfer_config=kv)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, logprobs=0, detokenize=False)
    results = []
    for p in prompts():  # one at a time: the second may hit what the first stored
        (out,) = llm.generate([TokensPrompt(prompt_token_ids=p)], params, use_tqdm=False)
        c = out.outputs[0]
        results.append({"tokens": list(c.token_ids),
                        "logprobs": [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)],
                        "cached_tokens": out.num_cached_tokens})
    # Let the engine finish the stores it queued (vLLM keeps stepping while
    # the tier has pending work) before the process ends.
    llm.generate([TokensPrompt(prompt_token_ids=[3, 4, 5])], SamplingParams(max_tokens=1, detokenize=False),
                 use_tqdm=False)
    # vLLM gives its engine process 5 s to exit before killing it: on a loaded
    # machine too little for the tier's shutdown, which writes the store's
    # last counters.  Wait for it, as an orderly server stop would.
    llm.llm_engine.engine_core.shutdown(timeout=120)
    del llm
    report = {"results": results}
    if not args.no_tier:
        from ..core import SlabStore

        with SlabStore.open(args.store, readonly=True) as s:
            st = s.stats()
            report["store"] = {k: st[k] for k in ("slots_used", "hits", "misses", "puts")}
    with open(args.out, "w") as f:
        json.dump(report, f)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m slabcache.testing.vllm_run")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("model")
    m.add_argument("dir")
    g = sub.add_parser("generate")
    g.add_argument("--model", required=True)
    g.add_argument("--store", default="")
    g.add_argument("--capacity", default="64M")
    g.add_argument("--tier-keys", default="{}", help="more tier keys, as JSON")
    g.add_argument("--out", required=True)
    g.add_argument("--max-tokens", type=int, default=12)
    g.add_argument("--no-tier", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "model":
        build_model(args.dir)
        return 0
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return generate(args)


if __name__ == "__main__":
    sys.exit(main())
