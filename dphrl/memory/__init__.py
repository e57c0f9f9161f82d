"""The memory plan: what one rank holds on its GPU while sampling and while training.

Counted from the model's shape (its `config.json`, never its weights) and the config, before
anything loads, so a run that cannot fit stops in a second with the phase that overflows and
the knob to turn, instead of an out-of-memory error after the first rollout. Bytes per item,
with W ranks sharing an FSDP2 shard (W = 1 unsharded), P parameters, b the compute dtype's
bytes (`model.dtype`, or `model.autocast` over float32 weights), T tokens in one forward:

    weights, gradients, AdamW       4 P / W, 4 P / W, 8 P / W       (float32 masters and moments)
    online reference                b P / W                          (reverse_kl, js_full, dapo + KL)
    engine (vllm)                   gpu_memory_utilization x card    (weights + KV cache + graphs)
    gathered layers (FSDP2)         b (root + 2 layer) + b head + (b + 4) layer
    activations                     T (L a + n)  or, checkpointed,  T (L h b + a + n)
    log-prob head                   chunk V 8 (fp32 head)  or, full logits (FSDP),  2 T V b + 4 chunk V
    attention mask                  rows S^2 b  (shared-prefix rows of width S)

where a = 2 (4 + 2b) h + 5 b q + 4 heads + 4 b i is what autograd keeps per token of one HF
Llama-style layer (two RMSNorms: a float32 copy, the normalised input and the output; q, k
and v after RoPE, k and v repeated to q's heads as transformers' sdpa does under a mask, the
attention output and o_proj's input; the MLP's gate, SiLU, up and product), q the query
width, i the MLP width and n = (4 + 2b) h the final norm. The plan counts tensors the
allocator holds, plus a fixed 1 GiB for the CUDA context and library workspaces; the
allocator's caching and fragmentation come on top (README, "Memory plan": how far off it is).

`shape` reads the model's shape, `formulas` holds the arithmetic, `plan` the config -> lines,
the table, the check and the hook every command runs (`plan_before_launch`).
"""
